"""Run bounds: when a run stops by itself (``max_messages``, an idle timeout, replay end offsets).

quix-streams' ``count=`` / ``timeout=`` in spirit: bounded runs for tests, replays and batch
jobs. The pipeline asks :meth:`RunBounds.stop_reason` after every batch; nothing here touches
the consumer except a replay pausing the partitions that reached their end.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

__all__ = ["RunBounds"]


class RunBounds:
    """Stop conditions of one run. ``replay`` maps partitions to ``(start, end)`` offsets."""

    def __init__(
        self,
        *,
        max_messages: int | None = None,
        idle_timeout_s: float | None = None,
        replay: dict[TopicPartition, tuple[int, int]] | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> None:
        self.max_messages = max_messages
        self.idle_timeout_s = idle_timeout_s
        self._start = {tp: start for tp, (start, _) in (replay or {}).items()}
        self._end = None if replay is None else {tp: end for tp, (_, end) in replay.items()}
        self._on_progress = on_progress
        self.finished: set[TopicPartition] = set()  # replay: partitions at their end offset
        self.complete = replay is not None and not replay  # replay: every outcome is wanted
        self._last_input = time.monotonic()

    @property
    def replaying(self) -> bool:
        return self._end is not None

    def cut(self, batch: list[ConsumerRecord[Any, Any]], consumed: int) -> list[Any]:
        """The part of a fetched batch this run may still take."""
        if self.max_messages is not None:
            batch = batch[: self.max_messages - consumed]
        if batch:
            self._last_input = time.monotonic()
        return batch

    def touch(self) -> None:
        """New work may be there (partitions assigned, consumption resumed after backpressure):
        the idle clock starts again."""
        self._last_input = time.monotonic()

    def wanted(self, rec: ConsumerRecord[Any, Any]) -> bool:
        """False for a replayed partition's records at or past its end offset."""
        return self._end is None or rec.offset < self._end[TopicPartition(rec.topic, rec.partition)]

    async def stop_reason(self, consumer: AIOKafkaConsumer, consumed: int) -> str | None:
        """Why the run should stop now, or None."""
        if self._end is not None:
            return await self._replay_check(consumer)
        if self.max_messages is not None and consumed >= self.max_messages:
            return f"max_messages={self.max_messages} reached"
        idle = self.idle_timeout_s
        if idle is not None and time.monotonic() - self._last_input >= idle:
            return f"no input for {idle:g}s"
        return None

    async def _replay_check(self, consumer: AIOKafkaConsumer) -> str | None:
        """Pause the partitions that reached their end offset; stop when all have."""
        assert self._end is not None
        covered = 0
        for tp, end in self._end.items():
            position = await consumer.position(tp)
            if position >= end and tp not in self.finished:
                self.finished.add(tp)
                consumer.pause(tp)
            covered += min(position, end) - self._start[tp]
        if self._on_progress is not None:
            self._on_progress(covered)
        if len(self.finished) == len(self._end):
            self.complete = True  # the drain then waits for every outcome
            return "replay reached its end offsets"
        return None
