"""Exactly-once publishing: one transactional producer per input partition.

In ``delivery: exactly_once`` the outcome records of a partition's slice of a micro-batch
(responses and dead letters alike) and that partition's consumer offset are written in one Kafka
transaction (``send_offsets_to_transaction``). aiokafka speaks only the pre-KIP-447 transaction
protocol, where fencing is by transactional id, not by group generation: so each input
partition gets its own producer whose transactional id is derived from the group, the topic and
the partition (as faust does). When a partition moves to another instance, the new owner's
producer initialises the same id, which aborts anything the old owner left open and fences it.

LLM calls never run inside a transaction: a slice's records are computed first (in parallel),
then published in one short transaction, so slow LLM calls cannot hit the transaction timeout.
Slices of one partition commit in offset order. LLM side effects stay at-least-once: a slice
that was computed but not committed (crash, rebalance) is computed again by the next owner.

aiokafka does not fail a transaction whose batch the broker refused: ``EndTxn`` would commit
the other batches and the offsets. So every record of a transaction is acknowledged before its
offsets are added, and any refusal aborts it. A refused *record* (:data:`RECORD_ERRORS`) is
pinned down (the slice again, each record acknowledged before the next is sent) and reported as
:class:`RecordRefused`, for the caller to replace and publish again; nothing is committed
partially.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import (
    CorruptRecordException,
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    ProducerFenced,
    RecordListTooLargeError,
    RecordTooLargeError,
)

from .records import OutRecord

__all__ = [
    "RECORD_ERRORS",
    "PartitionFenced",
    "PartitionState",
    "PartitionTransactions",
    "RecordRefused",
    "TransactionFailed",
    "transactional_id",
]

log = logging.getLogger("semroute_stream")

#: Errors about one record (its size, its bytes, its topic's name): that outcome is replaced by
#: a minimal dead letter. Every other non-retriable error is the platform's (authorisation,
#: timestamps...): the write is retried until it works, visibly.
RECORD_ERRORS: tuple[type[KafkaError], ...] = (
    MessageSizeTooLargeError,
    RecordTooLargeError,
    RecordListTooLargeError,
    CorruptRecordException,
    InvalidTopicError,
)


def _read_exception(fut: asyncio.Future[object]) -> None:
    if not fut.cancelled():
        fut.exception()


def _raise_first(results: list[object], alone: bool, records: list[OutRecord]) -> None:
    """Raise what refused a transaction's records, most telling first: a fence, a record
    error, a platform error; out-of-order sequence numbers only follow an earlier refusal."""
    errors = [(i, r) for i, r in enumerate(results) if isinstance(r, BaseException)]
    if not errors:
        return
    for _, err in errors:
        if isinstance(err, ProducerFenced):
            raise err
    refused = [(i, err) for i, err in errors if isinstance(err, RECORD_ERRORS)]
    if refused:
        i, err = refused[0]
        if alone or len(refused) == 1:  # alone, or the only one: that record is the cause
            raise RecordRefused(i, err) from err
        size = sum(len(records[i].value) for i, _ in refused)
        raise _SharedRefusal(
            f"{records[i].topic} refused a batch of {len(refused)} records "
            f"(about {size} bytes): {err!r}"
        )
    for _, err in errors:
        if not isinstance(err, OutOfOrderSequenceNumber):
            raise err
    raise errors[0][1]


def transactional_id(prefix: str, group_id: str, tp: TopicPartition) -> str:
    return f"{prefix}{group_id}.{tp.topic}.{tp.partition}"


class PartitionState(enum.Enum):
    """A partition's exactly-once lifecycle here: ``OWNED`` → ``FENCED`` or ``RELEASED``.

    ``FENCED``: a newer producer holds its transactional id (a new owner took it over); nothing
    more is written. ``RELEASED``: revoked here. A transaction the broker aborted because it ran
    past ``transaction_timeout_ms`` also fences our producer, but the partition is still ours:
    that case re-initialises the producer and stays ``OWNED``.
    """

    OWNED = "owned"
    FENCED = "fenced"
    RELEASED = "released"


class PartitionFenced(Exception):
    """This instance no longer owns the partition: its transactions are refused."""


class RecordRefused(Exception):
    """The broker refused record ``index`` of a slice as a record (:data:`RECORD_ERRORS`).
    Its transaction was aborted: nothing of the slice, and no offset, was committed."""

    def __init__(self, index: int, error: KafkaError) -> None:
        super().__init__(index, error)
        self.index = index
        self.error = error


class _SharedRefusal(Exception):
    """A batch of several records was refused as a record: which one is to blame is unknown."""


class TransactionFailed(Exception):
    """A partition's transaction keeps failing (a non-retriable error, or retriable ones for
    longer than ``retry_for_s``): the partition is stalled until a later attempt succeeds."""


class PartitionTransactions:
    """The transactional producers of the partitions this instance owns.

    ``make_producer(transactional_id)`` builds an unstarted producer; ``committed(tp)`` reads
    the group's committed offset from the broker; ``still_ours(tp)`` (when given) tells a
    broker-side abort from a new owner after a fence. ``publish`` writes one slice; slices of a
    partition must be published in offset order (the caller chains them).
    """

    def __init__(
        self,
        group_id: str,
        make_producer: Callable[[str], AIOKafkaProducer],
        committed: Callable[[TopicPartition], Awaitable[int | None]],
        *,
        still_ours: Callable[[TopicPartition], Awaitable[bool]] | None = None,
        id_prefix: str = "semroute.",
        retry_for_s: float = 10.0,
    ) -> None:
        self._group_id = group_id
        self._make = make_producer
        self._committed = committed
        self._still_ours = still_ours
        self._prefix = id_prefix
        self._retry_for_s = retry_for_s
        self._producers: dict[TopicPartition, AIOKafkaProducer] = {}
        self._locks: dict[TopicPartition, asyncio.Lock] = {}
        self._state: dict[TopicPartition, PartitionState] = {}
        self._revoking: set[TopicPartition] = set()  # a fence there is never "still ours"
        self.transactions = 0

    def state(self, tp: TopicPartition) -> PartitionState | None:
        return self._state.get(tp)

    def assign(self, tps: set[TopicPartition]) -> None:
        """Partitions this instance now owns (see :meth:`start` to fence their old owners)."""
        for tp in tps:
            self._state[tp] = PartitionState.OWNED
        self._revoking -= tps

    def revoking(self, tps: set[TopicPartition]) -> None:
        """A revocation of ``tps`` has begun: their last commit may run, but a fence now means
        the new owner (never a broker-side abort to retry: that would fence the new owner back
        and write what it already wrote)."""
        self._revoking |= tps

    async def start(self, tps: set[TopicPartition]) -> None:
        """Start the producers of newly owned partitions now, before any of their records is
        processed: ``InitProducerId`` aborts what a previous owner left open and fences it, so
        a paused old owner that wakes up cannot commit a duplicate. A failure here is logged;
        the producer is then started on first use."""

        async def one(tp: TopicPartition) -> None:
            try:
                async with self._locks.setdefault(tp, asyncio.Lock()):
                    if self._state.get(tp) is PartitionState.OWNED:
                        await self._producer(tp)
            except (TimeoutError, KafkaError) as err:
                log.warning("starting the transactional producer of %s failed: %r", tp, err)
                await self._discard(tp)

        await asyncio.gather(*(one(tp) for tp in tps))

    async def _producer(self, tp: TopicPartition) -> AIOKafkaProducer:
        producer = self._producers.get(tp)
        if producer is None:
            producer = self._make(transactional_id(self._prefix, self._group_id, tp))
            try:
                await producer.start()  # InitProducerId: aborts and fences the previous owner
            except BaseException:
                await producer.stop()
                raise
            self._producers[tp] = producer
        return producer

    async def _discard(self, tp: TopicPartition) -> None:
        producer = self._producers.pop(tp, None)
        if producer is not None:
            try:
                await producer.stop()
            except Exception as err:  # a broken producer may fail to close cleanly
                log.debug("closing the producer of %s: %r", tp, err)

    async def publish(
        self,
        tp: TopicPartition,
        records: list[OutRecord],
        next_offset: int,
        *,
        retry_for_s: float | None = None,
        alone: bool = False,
    ) -> None:
        """Write ``records`` and commit ``tp`` at ``next_offset``, atomically (``alone``: each
        record acknowledged before the next is sent; after a :class:`RecordRefused`).

        Retries retriable failures (with a fresh producer, which aborts the half-done
        transaction) for up to ``retry_for_s``; raises :class:`PartitionFenced` when another
        instance has taken the partition over (or it was released here),
        :class:`RecordRefused` when the broker refused one of the records as a record, and
        :class:`TransactionFailed` when it keeps failing (the caller keeps the records and
        tries again later).
        """
        loop = asyncio.get_running_loop()
        give_up = loop.time() + (self._retry_for_s if retry_for_s is None else retry_for_s)
        delay = 0.2
        retried = False
        async with self._locks.setdefault(tp, asyncio.Lock()):
            while True:
                state = self._state.get(tp)
                if state is not PartitionState.OWNED:
                    what = "was revoked" if state is PartitionState.RELEASED else "is not ours"
                    raise PartitionFenced(f"{tp} {what} ({state})")
                try:
                    producer = await self._producer(tp)
                    done = await self._committed(tp) if retried else None
                    if done is not None and done >= next_offset:
                        # The failed attempt did commit (only its answer was lost); starting
                        # the new producer completed it. Publishing again would duplicate.
                        return
                    retried = True
                    await self._transact(producer, tp, records, next_offset, alone=alone)
                    self.transactions += 1
                    return
                except _SharedRefusal as err:  # pin the record down: each one alone
                    log.error("%s: %s; sending them record by record", tp, err)
                    await self._discard(tp)
                    alone = True
                except RecordRefused:
                    await self._discard(tp)  # its sequence numbers are off now
                    raise
                except ProducerFenced as err:
                    await self._discard(tp)
                    if await self._still_ours_after_fence(tp):
                        log.warning(
                            "%s: the broker aborted a transaction (longer than "
                            "transaction_timeout_ms?); the partition is still ours: retrying "
                            "with a new producer",
                            tp,
                        )
                        continue
                    self._state[tp] = PartitionState.FENCED  # never fence the new owner back
                    raise PartitionFenced(str(tp)) from err
                except (TimeoutError, KafkaError) as err:
                    await self._discard(tp)
                    # out of order: a refused batch left the old producer's sequence behind
                    retriable = isinstance(err, TimeoutError | OutOfOrderSequenceNumber)
                    if not (retriable or getattr(err, "retriable", False)):
                        raise TransactionFailed(f"{tp}: {err!r}") from err
                    if loop.time() + delay > give_up:
                        raise TransactionFailed(f"{tp}: {err!r}") from err
                    log.warning("transaction for %s failed (%r); retrying in %.1fs", tp, err, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)

    async def _still_ours_after_fence(self, tp: TopicPartition) -> bool:
        return (
            tp not in self._revoking
            and self._still_ours is not None
            and await self._still_ours(tp)
            and tp not in self._revoking
        )

    async def _transact(
        self,
        producer: AIOKafkaProducer,
        tp: TopicPartition,
        records: list[OutRecord],
        next_offset: int,
        *,
        alone: bool,
    ) -> None:
        """One transaction: every record acknowledged before the offset is added to it, any
        refusal aborts it. ``alone``: each record acknowledged before the next is sent (a
        batch of its own), so that a refusal names its record."""
        futures: list[asyncio.Future[object]] = []
        try:
            async with producer.transaction():
                for i, r in enumerate(records):
                    try:
                        fut = await producer.send(
                            r.topic,
                            r.value,
                            key=r.key,
                            headers=r.headers,
                            timestamp_ms=r.timestamp_ms,
                        )
                    except RECORD_ERRORS as err:  # refused here, before any round trip
                        raise RecordRefused(i, err) from err
                    futures.append(fut)
                    if alone:
                        await asyncio.wait([fut])
                        if not fut.cancelled() and fut.exception() is not None:
                            break
                results = await asyncio.gather(*futures, return_exceptions=True)
                _raise_first(results, alone, records)
                await producer.send_offsets_to_transaction({tp: next_offset}, self._group_id)
        except BaseException:
            for fut in futures:  # failed with the transaction: read them, or asyncio complains
                fut.add_done_callback(_read_exception)
            raise

    async def release(self, tps: set[TopicPartition]) -> None:
        """Close the producers of partitions this instance no longer owns.

        A publish still running for one of them fails (its transaction is aborted by the
        closing producer or fenced by the new owner) and does not retry.
        """
        self._revoking -= tps
        for tp in tps:
            self._state[tp] = PartitionState.RELEASED
            self._locks.pop(tp, None)
            await self._discard(tp)

    async def close(self) -> None:
        await self.release(set(self._producers) | set(self._state))
