"""Delivery: where outcomes go and when offsets are committed (the outbox).

An :class:`Outbox` takes every outcome of the partitions it owns and commits each partition's
offset only past messages whose outcome is durable. Two implementations:

* :class:`AtLeastOnceOutbox`: each outcome is sent and acknowledged (``acks=all``, idempotent
  producer) before its offset counts as finished; a commit loop commits the finished prefix of
  every partition. ``send`` is pluggable (the producer, or a file for replay, or a list in
  tests), as httpx's transports are.
* :class:`ExactlyOnceOutbox`: outcomes are queued per partition; the commit loop writes each
  partition's finished prefix and its next offset in one transaction
  (:class:`~.transactions.PartitionTransactions`).

The :class:`~.commit_tracker.CommitTracker` is the pure bookkeeping underneath both (LLM calls
finish out of order, the commit point never passes an unfinished message); the producer side of
at-least-once (batches per partition, :func:`~.batcher.producer_send`) lives in :mod:`.batcher`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from aiokafka import TopicPartition
from aiokafka.errors import (
    KafkaError,
)
from aiokafka.structs import OffsetAndMetadata

from .batcher import CLIENT_STOP_S, Send, producer_send
from .commit_tracker import CommitTracker
from .observe import Observer
from .records import Outcome, OutRecord
from .tracing import MESSAGING
from .transactions import (
    RECORD_ERRORS,
    PartitionFenced,
    PartitionTransactions,
    RecordRefused,
    TransactionFailed,
)

__all__ = [
    "CLIENT_STOP_S",
    "RECORD_ERRORS",
    "AtLeastOnceOutbox",
    "CommitTracker",
    "ExactlyOnceOutbox",
    "Outbox",
    "Send",
    "producer_send",
]

log = logging.getLogger("semroute_stream")


#: Commits consumer offsets (``AIOKafkaConsumer.commit``).
CommitOffsets = Callable[[dict[TopicPartition, OffsetAndMetadata]], Awaitable[None]]


# ---- bookkeeping ------------------------------------------------------------------------------


class Outbox(Protocol):
    """What the pipeline needs from delivery.

    ``on_lost`` is called with partitions another instance took over (exactly-once fencing):
    the pipeline stops taking their work. ``on_stall(tp, reason)`` says a partition's outcomes
    cannot be written for now (``reason``) or can again (None): the pipeline pauses it.
    ``in_flight`` counts unfinished messages; ``backlog`` the finished ones the outbox still
    holds (exactly-once: until their transaction commits); backpressure bounds both.
    """

    on_lost: Callable[[set[TopicPartition]], None]
    on_stall: Callable[[TopicPartition, str | None], None]

    def assign(self, tps: set[TopicPartition]) -> None: ...
    async def prepare(self, tps: set[TopicPartition]) -> None: ...
    def backlog(self) -> int: ...
    def unassign(self, tps: set[TopicPartition]) -> None: ...
    def track(self, tp: TopicPartition, offset: int) -> None: ...
    def in_flight(self, tp: TopicPartition | None = None) -> int: ...
    async def publish(self, outcome: Outcome) -> None: ...
    async def revoke(self, tps: set[TopicPartition]) -> None: ...
    def start(self) -> None: ...
    async def stop(self) -> None: ...


class _Committing:
    """The commit loop and the bounded final commit, shared by both outboxes.

    Subclasses implement :meth:`_commit_offsets`: write ``offsets`` (next offset per
    partition) and return those committed and the partitions that turned out not to be ours.
    """

    def __init__(self, observer: Observer, commit_interval_ms: int) -> None:
        self._observer = observer
        self._interval = commit_interval_ms / 1000
        self.tracker = CommitTracker()
        self.owned: set[TopicPartition] = set()
        self.on_lost: Callable[[set[TopicPartition]], None] = lambda tps: None
        self.on_stall: Callable[[TopicPartition, str | None], None] = lambda tp, why: None
        self._wanted = asyncio.Event()
        self._lock = asyncio.Lock()
        self._committer: asyncio.Task[None] | None = None

    def assign(self, tps: set[TopicPartition]) -> None:
        self.owned |= tps

    async def prepare(self, tps: set[TopicPartition]) -> None:
        """Get ready to write for newly assigned partitions (nothing to do by default)."""

    def backlog(self) -> int:
        return 0

    def unassign(self, tps: set[TopicPartition]) -> None:
        """Leave ``tps`` out of the periodic commits (a revocation has begun)."""
        self.owned -= tps

    def track(self, tp: TopicPartition, offset: int) -> None:
        self.tracker.start(tp, offset)

    def in_flight(self, tp: TopicPartition | None = None) -> int:
        return self.tracker.in_flight(tp)

    def _finished(self, outcome: Outcome) -> None:
        src = outcome.at
        self.tracker.finish(TopicPartition(src.topic, src.partition), src.offset)
        self._wanted.set()

    async def _commit_offsets(
        self, offsets: dict[TopicPartition, int]
    ) -> tuple[dict[TopicPartition, int], set[TopicPartition]]:
        raise NotImplementedError

    def _forget(self, tps: set[TopicPartition]) -> None:
        self.owned -= tps
        self.tracker.forget(tps)

    async def commit(self, only: set[TopicPartition] | None = None) -> None:
        """Commit the finished prefix of every owned partition (or of ``only``)."""
        async with self._lock:
            scope = self.owned if only is None else only
            offsets = {tp: o for tp, o in self.tracker.committable().items() if tp in scope}
            if not offsets:
                return
            offsets, lost = await self._commit_offsets(offsets)
            if lost:  # another instance owns them now: drop our state, write nothing more
                self._forget(lost)
                self.on_lost(lost)
            self.tracker.mark_committed(offsets)
            if offsets:  # a round whose every transaction failed committed nothing
                self._observer.stats.commits += 1

    async def revoke(self, tps: set[TopicPartition]) -> None:
        """Commit what is finished of ``tps``, then forget them: their new owner redoes the rest."""
        self.unassign(tps)
        try:
            await self.commit(only=tps)
        except KafkaError as err:
            log.warning("commit on revoke failed (%r): the new owner redoes the rest", err)
        self._forget(tps)

    def start(self) -> None:
        self._committer = asyncio.create_task(self._commit_loop(), name="semroute-commit")

    async def _commit_loop(self) -> None:
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            try:
                await self.commit()
            except KafkaError as err:  # e.g. a rebalance in progress: try again later
                log.info("commit deferred: %r", err)
                self._wanted.set()
            await asyncio.sleep(self._interval)

    async def stop(self) -> None:
        """Stop the commit loop and make the final commit, both bounded by ``CLIENT_STOP_S``.

        Never cancel the committer inside a commit: a transaction cancelled while it commits
        leaves its producer unusable for the final commit. Bounded: with the broker gone a
        commit would wait without end (then nothing more is committed and the uncommitted work
        is redelivered).
        """
        idle = False
        with contextlib.suppress(TimeoutError):
            idle = await asyncio.wait_for(self._lock.acquire(), CLIENT_STOP_S)
        if self._committer is not None:
            self._committer.cancel()
        if idle:
            self._lock.release()
        if self._committer is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._committer
        if not idle:
            log.warning("a commit was still running at shutdown: uncommitted work is redelivered")
            return
        try:
            await asyncio.wait_for(self.commit(), CLIENT_STOP_S)
        except (KafkaError, TimeoutError) as err:
            log.warning("final commit failed (%r): uncommitted work is redelivered", err)


# ---- at-least-once ----------------------------------------------------------------------------


class AtLeastOnceOutbox(_Committing):
    """Send each outcome and wait for its ack; commit consumer offsets past acked prefixes."""

    def __init__(
        self,
        send: Send,
        commit_offsets: CommitOffsets,
        *,
        observer: Observer | None = None,
        commit_interval_ms: int = 1000,
    ) -> None:
        super().__init__(observer or Observer(), commit_interval_ms)
        self._send = send
        self._commit_to = commit_offsets

    async def publish(self, outcome: Outcome) -> None:
        """Write one outcome and wait until it is durable, then mark its offset finished.

        A send that fails or is cancelled (drain timeout, revoked partition) leaves the offset
        unfinished, so it is never committed past: the message is redelivered.
        """
        topic = outcome.topic
        attributes = {
            **MESSAGING,
            "messaging.destination.name": topic,
            "messaging.operation.type": "send",
        }
        with self._observer.tracer.span(f"send {topic}", attributes, kind="producer"):
            if outcome.extras:  # sent in the same tick: they share the outcome's batches
                await asyncio.gather(
                    self._send(outcome.record()), *(self._extra(r) for r in outcome.extras)
                )
            else:
                await self._send(outcome.record())
        self._observer.published(outcome)
        self._finished(outcome)

    async def _extra(self, record: OutRecord) -> None:
        """A record riding with an outcome (review, shadow): one the broker refuses as a
        record is logged and left out; it never turns the outcome into a dead letter."""
        try:
            await self._send(record)
        except RECORD_ERRORS as err:
            log.error("a %s record was refused and left out: %r", record.topic, err)

    async def _commit_offsets(
        self, offsets: dict[TopicPartition, int]
    ) -> tuple[dict[TopicPartition, int], set[TopicPartition]]:
        await self._commit_to({tp: OffsetAndMetadata(o, "") for tp, o in offsets.items()})
        return offsets, set()


# ---- exactly-once -----------------------------------------------------------------------------


class ExactlyOnceOutbox(_Committing):
    """Queue outcomes per partition; commit each partition's finished prefix with its next
    offset in one transaction. Outcomes count as published when their transaction commits.

    Partitions fail on their own: a partition whose transactions keep failing keeps its
    outcomes queued and is stalled (``on_stall``) until an attempt succeeds; the others go on.
    """

    def __init__(
        self,
        transactions: PartitionTransactions,
        *,
        observer: Observer | None = None,
        commit_interval_ms: int = 1000,
    ) -> None:
        super().__init__(observer or Observer(), commit_interval_ms)
        self.transactions = transactions
        self._queued: dict[TopicPartition, list[Outcome]] = {}
        self._stalled: set[TopicPartition] = set()
        #: The dead letter of an outcome refused as a record (``Worker.unpublishable``).
        self.on_refused: Callable[[Outcome, Exception], Outcome] | None = None

    def assign(self, tps: set[TopicPartition]) -> None:
        super().assign(tps)
        self.transactions.assign(tps)

    async def prepare(self, tps: set[TopicPartition]) -> None:
        await self.transactions.start(tps)  # fence a previous owner before any record is read

    def unassign(self, tps: set[TopicPartition]) -> None:
        super().unassign(tps)
        self.transactions.revoking(tps)

    def backlog(self) -> int:
        return sum(len(q) for q in self._queued.values())

    async def publish(self, outcome: Outcome) -> None:
        src = outcome.at
        self._queued.setdefault(TopicPartition(src.topic, src.partition), []).append(outcome)
        self._finished(outcome)

    def _forget(self, tps: set[TopicPartition]) -> None:
        super()._forget(tps)
        for tp in tps:
            self._queued.pop(tp, None)
            self._stall(tp, None)

    async def revoke(self, tps: set[TopicPartition]) -> None:
        await super().revoke(tps)
        await self.transactions.release(tps)

    async def _commit_offsets(
        self, offsets: dict[TopicPartition, int]
    ) -> tuple[dict[TopicPartition, int], set[TopicPartition]]:
        done = await asyncio.gather(*(self._transact(tp, o) for tp, o in offsets.items()))
        committed = {tp: o for (tp, o), ok in zip(offsets.items(), done, strict=True) if ok}
        lost = {tp for tp, ok in zip(offsets, done, strict=True) if ok is None}
        return committed, lost

    async def _transact(self, tp: TopicPartition, next_offset: int) -> bool | None:
        """Write the queued outcomes below ``next_offset`` with that offset, in one
        transaction. True when committed, False when it failed (the outcomes stay queued for
        the next round), None when the partition's transactional id was fenced by a new owner.

        A record the broker refuses as a record aborts the transaction; its outcome becomes
        its minimal ``unpublishable`` dead letter (a review or shadow record is left out) and
        the transaction is made again, so the partition never stalls on one record."""
        ready = [o for o in self._queued.get(tp, []) if o.at.offset < next_offset]
        attributes = {**MESSAGING, "messaging.batch.message_count": len(ready)}
        try:
            with self._observer.tracer.span("transaction", attributes):
                alone = False  # after a refusal: each record acknowledged before the next
                while True:
                    owners = [(j, k) for j, o in enumerate(ready) for k in range(1 + len(o.extras))]
                    records = [r for o in ready for r in o.records()]
                    # A stalled partition gets one try a round: it must not hold up the others.
                    once = 0.0 if tp in self._stalled else None
                    try:
                        await self.transactions.publish(
                            tp, records, next_offset, retry_for_s=once, alone=alone
                        )
                        break
                    except RecordRefused as err:
                        self._replace(tp, ready, *owners[err.index], err.error)
                        alone = True
        except PartitionFenced as err:
            log.warning("%s: not committed here, its new owner redoes it (%s)", tp, err)
            return None
        except TransactionFailed as err:
            self._stall(tp, f"exactly-once transactions of {tp.topic}/{tp.partition} fail: {err}")
            self._wanted.set()  # try again next round
            return False
        self._queued[tp] = [o for o in self._queued.get(tp, []) if o.at.offset >= next_offset]
        self._stall(tp, None)
        for outcome in ready:
            self._observer.published(outcome)
        return True

    def _replace(
        self, tp: TopicPartition, ready: list[Outcome], j: int, k: int, err: KafkaError
    ) -> None:
        """Record ``k`` of outcome ``ready[j]`` was refused as a record: drop it (a record
        riding with the outcome) or turn the outcome into its minimal dead letter."""
        outcome = ready[j]
        if k > 0:
            extra = outcome.extras[k - 1]
            log.error("a %s record was refused and left out: %r", extra.topic, err)
            fixed = dataclasses.replace(
                outcome, extras=outcome.extras[: k - 1] + outcome.extras[k:]
            )
        elif outcome.kind == "unpublishable" or self.on_refused is None:
            raise TransactionFailed(f"{tp}: {outcome.topic} refused even a minimal record: {err!r}")
        else:
            fixed = self.on_refused(outcome, err)
        ready[j] = fixed
        queue = self._queued.get(tp, [])
        for i, queued in enumerate(queue):
            if queued is outcome:
                queue[i] = fixed

    def _stall(self, tp: TopicPartition, reason: str | None) -> None:
        if reason is not None:
            if tp not in self._stalled:
                log.error("%s stalled: %s", tp, reason)
            self._stalled.add(tp)
        elif tp in self._stalled:
            self._stalled.discard(tp)
            log.warning("%s: transactions work again", tp)
        else:
            return
        self.on_stall(tp, reason)
