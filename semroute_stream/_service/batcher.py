"""The producer side of at-least-once delivery: :func:`producer_send` makes a :data:`Send` through
an ``AIOKafkaProducer``, and :class:`_Batcher` coalesces the records of one event-loop tick into
one batch per partition, sized to the output topics' limit (a refused batch is sent again record
by record and a producer poisoned by it is replaced)."""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    KafkaError,
    KafkaTimeoutError,
    OutOfOrderSequenceNumber,
    RecordTooLargeError,
    TopicAuthorizationFailedError,
)
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from .observe import Observer
from .records import OutRecord
from .transactions import (
    RECORD_ERRORS,
)

__all__ = ["CLIENT_STOP_S", "Send", "producer_send"]

log = logging.getLogger("semroute_stream")

#: How long a shutdown step that talks to the broker may take (a final commit, a client stop).
CLIENT_STOP_S = 30.0

#: Writes one record and returns once it is durable.
Send = Callable[[OutRecord], Awaitable[None]]


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
