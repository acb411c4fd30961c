"""The commit point of each partition: LLM calls finish out of order, the commit point never
passes an unfinished message (pure bookkeeping, no I/O; used by both outboxes in
:mod:`.delivery`)."""

from __future__ import annotations

from collections import deque

from aiokafka import TopicPartition

__all__ = ["CommitTracker"]


class _Partition:
    __slots__ = ("done", "next_offset", "pending")

    def __init__(self) -> None:
        self.pending: deque[int] = deque()  # offsets handed out, in consumption order
        self.done: set[int] = set()  # finished offsets still behind an unfinished one
        self.next_offset: int | None = None  # what to commit: everything below it is finished


class CommitTracker:
    """Per-partition progress of messages whose outcomes may finish out of order.

    ``start`` each offset in consumption order, ``finish`` it once its outcome record is
    acknowledged; ``committable`` then gives, for each partition, the offset to commit (one past
    the longest finished prefix). Pure bookkeeping: no Kafka calls.
    """

    def __init__(self) -> None:
        self._parts: dict[TopicPartition, _Partition] = {}
        self._committed: dict[TopicPartition, int] = {}

    def start(self, tp: TopicPartition, offset: int) -> None:
        self._parts.setdefault(tp, _Partition()).pending.append(offset)

    def finish(self, tp: TopicPartition, offset: int) -> None:
        part = self._parts.get(tp)
        if part is None:  # the partition was revoked meanwhile: its new owner redoes it
            return
        part.done.add(offset)
        while part.pending and part.pending[0] in part.done:
            first = part.pending.popleft()
            part.done.discard(first)
            part.next_offset = first + 1

    def in_flight(self, tp: TopicPartition | None = None) -> int:
        if tp is not None:
            part = self._parts.get(tp)
            return len(part.pending) if part else 0
        return sum(len(p.pending) for p in self._parts.values())

    def committable(self) -> dict[TopicPartition, int]:
        """Offsets that moved since the last ``mark_committed``."""
        return {
            tp: p.next_offset
            for tp, p in self._parts.items()
            if p.next_offset is not None and self._committed.get(tp) != p.next_offset
        }

    def mark_committed(self, offsets: dict[TopicPartition, int]) -> None:
        self._committed.update(offsets)

    def forget(self, tps: set[TopicPartition]) -> None:
        """Drop revoked partitions: late completions for them are ignored."""
        for tp in tps:
            self._parts.pop(tp, None)
            self._committed.pop(tp, None)


# ---- the seam ---------------------------------------------------------------------------------
