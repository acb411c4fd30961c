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

The :class:`CommitTracker` is the pure bookkeeping underneath both: LLM calls finish out of
order, the commit point never passes an unfinished message.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from typing import Any, Protocol

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import (
    KafkaError,
    KafkaTimeoutError,
    OutOfOrderSequenceNumber,
    RecordTooLargeError,
    TopicAuthorizationFailedError,
)
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.structs import OffsetAndMetadata

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

#: How long a shutdown step that talks to the broker may take (a final commit, a client stop).
CLIENT_STOP_S = 30.0

#: Writes one record and returns once it is durable.
Send = Callable[[OutRecord], Awaitable[None]]
#: Commits consumer offsets (``AIOKafkaConsumer.commit``).
CommitOffsets = Callable[[dict[TopicPartition, OffsetAndMetadata]], Awaitable[None]]


# ---- bookkeeping ------------------------------------------------------------------------------


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


def _refusal(topic: str, err: KafkaError) -> str:
    if isinstance(err, TopicAuthorizationFailedError):
        return (
            f"topic authorization failed for {topic}: this principal may not write to it "
            f"(check the topic's ACLs); its outcomes wait and are retried, no offset past "
            f"them is committed ({err!r})"
        )
    return f"writes to {topic} refused: {err!r}"


class _Pending:
    """One record waiting for its batch, and the future its sender awaits."""

    __slots__ = ("alone", "fut", "record")

    def __init__(self, record: OutRecord, fut: asyncio.Future[None], alone: bool) -> None:
        self.record = record
        self.fut = fut
        self.alone = alone  # sent in a batch of its own (its shared batch was refused)


class _Lane:
    """The records waiting for one topic-partition, and whether a flush is on its way."""

    __slots__ = ("flush", "pending")

    def __init__(self) -> None:
        self.pending: list[_Pending] = []
        self.flush: asyncio.Task[None] | None = None


class _Batcher:
    """Coalesces the records sent within one event-loop tick into one batch per partition.

    ``producer.send`` costs a coroutine, a partitioner call, a batch append and a
    ``RecordMetadata`` per record; here the records published in the same tick (a
    micro-batch's outcomes are) are appended to a ``producer.create_batch()`` builder per
    partition and handed over with one ``send_batch``, one future per batch. Each record's own
    future is resolved when its batch is acknowledged, or fails with the batch's error.

    * The partition is the one ``producer.send`` would choose: the default partitioner
      (murmur2 of the key; the ``partitioner`` option is reserved) over the same metadata; a
      keyless record gets a random available partition, the same one for every keyless record
      of a topic within one tick (sticky), so that the tick's records stay in one batch.
    * Order within a partition is kept: one flush at a time per partition, batches in the
      order their records were sent.
    * A batch refused with a record error (:data:`RECORD_ERRORS`) is sent again record by
      record, each in a batch of its own, so that only the offending record is refused.
    * A record over ``max_request_size`` goes through ``producer.send``, which refuses it
      (``MessageSizeTooLargeError``) without a round trip, as before.
    * aiokafka's idempotent producer does not rewind a partition's sequence number after a
      refused batch: every later batch there is refused with ``OutOfOrderSequenceNumber``.
      Such a producer is replaced (``renew`` makes an unstarted one; the old one is stopped)
      and the sends it failed are made again.
    """

    def __init__(
        self,
        producer: AIOKafkaProducer,
        renew: Callable[[], AIOKafkaProducer] | None = None,
    ) -> None:
        self._producer = producer
        self._renew = renew
        self._renewing = asyncio.Lock()
        self._lanes: dict[tuple[str, int], _Lane] = {}
        self._sticky: dict[str, int] = {}
        self._partitioner = DefaultPartitioner()

    async def send(self, record: OutRecord) -> None:
        """Send ``record``; return once it is acknowledged (raise what refused it). After
        ``OutOfOrderSequenceNumber`` the producer has been replaced: send it again."""
        producer = self._producer
        try:
            await self._send(producer, record)
        except OutOfOrderSequenceNumber:
            await self._replace(producer)
            raise

    async def _replace(self, poisoned: AIOKafkaProducer) -> None:
        if self._renew is None:
            return
        async with self._renewing:
            if self._producer is not poisoned:  # replaced already, by another send
                return
            fresh = self._renew()
            await fresh.start()
            self._producer = fresh
        log.warning(
            "a refused batch left the idempotent producer's sequence numbers behind "
            "(OutOfOrderSequenceNumber): replaced it with a new producer"
        )
        try:
            await asyncio.wait_for(poisoned.stop(), CLIENT_STOP_S)
        except Exception as err:  # its own sends fail, and are made again
            log.debug("closing the replaced producer: %r", err)

    async def _send(self, producer: AIOKafkaProducer, record: OutRecord) -> None:
        size = DefaultRecordBatchBuilder.estimate_size_in_bytes(
            record.key, record.value, record.headers
        )
        if size > producer._max_request_size:  # aiokafka's own check (no public accessor)
            await (
                await producer.send(
                    record.topic,
                    record.value,
                    key=record.key,
                    headers=record.headers,
                    timestamp_ms=record.timestamp_ms,
                )
            )
            return
        topic = record.topic
        partitions = producer.client.cluster.partitions_for_topic(topic)
        if partitions is None:  # first record for this topic: as producer.send, wait for it
            partitions = await producer.partitions_for(topic)
        partition = self._partition(topic, record.key, partitions)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._enqueue(topic, partition, _Pending(record, fut, False))
        await fut

    def _partition(self, topic: str, key: bytes | None, partitions: Any) -> int:
        if key is not None:  # as AIOKafkaProducer._partition with the default partitioner
            chosen: int = self._partitioner(key, list(partitions), [])
            return chosen
        sticky = self._sticky.get(topic)
        if sticky is None:
            cluster = self._producer.client.cluster
            available = list(cluster.available_partitions_for_topic(topic) or ())
            sticky = self._partitioner(None, list(partitions), available)
            if not self._sticky:  # a new random choice next tick
                asyncio.get_running_loop().call_soon(self._sticky.clear)
            self._sticky[topic] = sticky
        return sticky

    def _enqueue(self, topic: str, partition: int, item: _Pending) -> None:
        lane = self._lanes.get((topic, partition))
        if lane is None:
            lane = self._lanes[(topic, partition)] = _Lane()
        lane.pending.append(item)
        if lane.flush is None:  # runs next tick: what else is sent in this tick joins
            lane.flush = asyncio.get_running_loop().create_task(
                self._flush(topic, partition, lane), name="semroute-send"
            )

    def _batches(self, items: list[_Pending]) -> Iterator[tuple[Any, list[_Pending]]]:
        """Closed batch builders, each with its records, in order."""
        builder: Any = None
        members: list[_Pending] = []
        for item in items:
            if item.fut.done():  # its publish was cancelled before it was sent
                continue
            if members and (item.alone or members[-1].alone):
                yield builder, members
                builder, members = None, []
            rec = item.record
            for _ in range(2):
                if builder is None:
                    builder = self._producer.create_batch()
                try:
                    meta = builder.append(
                        key=rec.key,
                        value=rec.value,
                        timestamp=rec.timestamp_ms,
                        headers=rec.headers,
                    )
                except Exception as err:  # the record's error (its headers...), not the batch's
                    item.fut.set_exception(err)
                    break
                if meta is not None:
                    members.append(item)
                    break
                if not members:  # cannot happen: an empty batch takes any record
                    item.fut.set_exception(RecordTooLargeError("record does not fit a batch"))
                    break
                yield builder, members  # full: start the next batch
                builder, members = None, []
        if members:
            yield builder, members

    async def _flush(self, topic: str, partition: int, lane: _Lane) -> None:
        unsent: list[_Pending] = []
        try:
            while lane.pending:
                batches = list(self._batches(lane.pending))
                lane.pending = []
                unsent = [item for _, members in batches for item in members]
                for builder, members in batches:
                    builder.close()  # coalesced already: no linger, nothing more joins it
                    try:
                        fut = await self._producer.send_batch(builder, topic, partition=partition)
                    except Exception as err:  # no room in time, producer closed: as send() would
                        _fail(members, err)
                    else:
                        done = partial(self._acked, topic, partition, members, builder.size())
                        fut.add_done_callback(done)
                    del unsent[: len(members)]
        except BaseException:  # cancelled (the loop is closing): what was not handed over fails
            for item in (*unsent, *lane.pending):
                item.fut.cancel()
            lane.pending = []
            raise
        finally:
            lane.flush = None

    def _acked(
        self,
        topic: str,
        partition: int,
        members: list[_Pending],
        size: int,
        fut: asyncio.Future[Any],
    ) -> None:
        if fut.cancelled():
            for item in members:
                item.fut.cancel()
            return
        err = fut.exception()
        if isinstance(err, RECORD_ERRORS):
            log.error(
                "%s/%d refused a batch of %d record(s), %d bytes: %r",
                topic,
                partition,
                len(members),
                size,
                err,
            )
        if err is None:
            for item in members:
                if not item.fut.done():
                    item.fut.set_result(None)
        elif isinstance(err, RECORD_ERRORS) and len(members) > 1:
            # one of them may be the cause: send each alone, only that one is refused
            for item in members:
                if not item.fut.done():
                    item.alone = True
                    self._enqueue(topic, partition, item)
        else:
            _fail(members, err)


def _fail(members: list[_Pending], err: BaseException) -> None:
    for item in members:
        if not item.fut.done():
            item.fut.set_exception(copy.copy(err))  # a copy each: tracebacks do not pile up


def producer_send(
    producer: AIOKafkaProducer,
    observer: Observer | None = None,
    *,
    renew: Callable[[], AIOKafkaProducer] | None = None,
) -> Send:
    """A :data:`Send` through an ``AIOKafkaProducer``. Retriable broker errors are retried
    without end (the offset stays unfinished meanwhile, so nothing is committed past it);
    :data:`RECORD_ERRORS` are raised; platform errors are retried too, reported to
    ``observer`` while they last. Records sent in the same event-loop tick share batches
    (:class:`_Batcher`); each send still returns only once its own record is acknowledged.
    ``renew`` makes the producer that replaces one poisoned by a refused batch."""
    watcher = observer or Observer()
    batcher = _Batcher(producer, renew)

    async def send(record: OutRecord) -> None:
        delay = 0.1
        while True:
            try:
                await batcher.send(record)
                if watcher.platform_failure is not None:
                    watcher.platform_failing(None)
                return
            except RECORD_ERRORS:
                raise
            except (KafkaTimeoutError, KafkaError) as err:
                if isinstance(err, OutOfOrderSequenceNumber) and renew is not None:
                    continue  # the producer was replaced: send it again
                if not (isinstance(err, KafkaTimeoutError) or getattr(err, "retriable", False)):
                    watcher.platform_failing(_refusal(record.topic, err))
                    delay = max(delay, 1.0)
                log.warning(
                    "publish to %s failed (%r); retrying in %.1fs", record.topic, err, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0 if watcher.platform_failure else 5.0)

    return send


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
