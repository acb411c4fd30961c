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
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError, ProducerFenced

from .records import OutRecord

__all__ = ["PartitionFenced", "PartitionTransactions", "transactional_id"]

log = logging.getLogger("semroute_stream")


def transactional_id(prefix: str, group_id: str, tp: TopicPartition) -> str:
    return f"{prefix}{group_id}.{tp.topic}.{tp.partition}"


class PartitionFenced(Exception):
    """This instance no longer owns the partition: its transactions are refused."""


class PartitionTransactions:
    """The transactional producers of the partitions this instance owns.

    ``make_producer(transactional_id)`` builds an unstarted producer; ``committed(tp)`` reads
    the group's committed offset from the broker. ``publish`` writes one slice; slices of a
    partition must be published in offset order (the caller chains them).
    """

    def __init__(
        self,
        group_id: str,
        make_producer: Callable[[str], AIOKafkaProducer],
        committed: Callable[[TopicPartition], Awaitable[int | None]],
        *,
        id_prefix: str = "semroute.",
    ) -> None:
        self._group_id = group_id
        self._make = make_producer
        self._committed = committed
        self._prefix = id_prefix
        self._producers: dict[TopicPartition, AIOKafkaProducer] = {}
        self._locks: dict[TopicPartition, asyncio.Lock] = {}
        self._owned: set[TopicPartition] = set()
        self.transactions = 0

    def assign(self, tps: set[TopicPartition]) -> None:
        """Partitions this instance now owns (their producers start on first use)."""
        self._owned |= tps

    async def _producer(self, tp: TopicPartition) -> AIOKafkaProducer:
        producer = self._producers.get(tp)
        if producer is None:
            producer = self._make(transactional_id(self._prefix, self._group_id, tp))
            await producer.start()  # InitProducerId: aborts and fences the previous owner
            self._producers[tp] = producer
        return producer

    async def _discard(self, tp: TopicPartition) -> None:
        producer = self._producers.pop(tp, None)
        if producer is not None:
            try:
                await producer.stop()
            except Exception as err:  # a broken producer may fail to close cleanly
                log.debug("closing the producer of %s: %r", tp, err)

    async def publish(self, tp: TopicPartition, records: list[OutRecord], next_offset: int) -> None:
        """Write ``records`` and commit ``tp`` at ``next_offset``, atomically.

        Retries retriable failures (with a fresh producer, which aborts the half-done
        transaction) until it succeeds; raises :class:`PartitionFenced` when another instance
        has taken the partition over, or the partition was released here.
        """
        lock = self._locks.setdefault(tp, asyncio.Lock())
        delay = 0.2
        retried = False
        async with lock:
            while True:
                if tp not in self._owned:
                    raise PartitionFenced(f"{tp} was revoked")
                try:
                    producer = await self._producer(tp)
                    done = await self._committed(tp) if retried else None
                    if done is not None and done >= next_offset:
                        # The failed attempt did commit (only its answer was lost); starting
                        # the new producer completed it. Publishing again would duplicate.
                        return
                    retried = True
                    async with producer.transaction():
                        futures = [
                            await producer.send(
                                r.topic,
                                r.value,
                                key=r.key,
                                headers=r.headers,
                                timestamp_ms=r.timestamp_ms,
                            )
                            for r in records
                        ]
                        await producer.send_offsets_to_transaction(
                            {tp: next_offset}, self._group_id
                        )
                    for fut in futures:
                        await fut  # already resolved once the commit succeeded
                    self.transactions += 1
                    return
                except ProducerFenced as err:
                    self._owned.discard(tp)  # never start another producer that would fence
                    await self._discard(tp)  # the new owner back; until assigned again
                    raise PartitionFenced(str(tp)) from err
                except (TimeoutError, KafkaError) as err:
                    log.warning("transaction for %s failed (%r); retrying in %.1fs", tp, err, delay)
                    await self._discard(tp)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)

    async def release(self, tps: set[TopicPartition]) -> None:
        """Close the producers of partitions this instance no longer owns.

        A publish still running for one of them fails (its transaction is aborted by the
        closing producer or fenced by the new owner) and does not retry.
        """
        self._owned -= tps
        for tp in tps:
            self._locks.pop(tp, None)
            await self._discard(tp)

    async def close(self) -> None:
        await self.release(set(self._producers) | self._owned)
