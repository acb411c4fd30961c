"""The exactly-once lifecycle: producers start at assignment (a paused old owner is fenced
before it can commit), a broker-side timeout abort is told from a new owner, and a partition
whose transactions keep failing stalls alone with its outcomes kept."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from test_transactions import _committed_reader, _values

from semroute_stream._service.delivery import ExactlyOnceOutbox
from semroute_stream._service.records import Outcome, OutRecord, Source
from semroute_stream._service.transactions import (
    PartitionFenced,
    PartitionState,
    PartitionTransactions,
    TransactionFailed,
)


def _factory(bootstrap: str, **kwargs: Any) -> Any:
    def make(txn_id: str) -> AIOKafkaProducer:
        return AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=txn_id, **kwargs)

    return make


@pytest.mark.kafka
async def test_a_new_owner_fences_the_old_one_at_assignment(
    kafka_bootstrap: str, new_topic: Any
) -> None:
    topic = await new_topic(partitions=1)
    out = await new_topic(partitions=1)
    tp, group = TopicPartition(topic, 0), f"g-{uuid.uuid4().hex[:8]}"
    reader = await _committed_reader(kafka_bootstrap, group)
    old = PartitionTransactions(group, _factory(kafka_bootstrap), reader.committed)
    new = PartitionTransactions(group, _factory(kafka_bootstrap), reader.committed)
    try:
        old.assign({tp})
        await old.publish(tp, [OutRecord(out, b"a", None, [])], next_offset=1)
        # The group moves the partition while `old` is paused (GC, SIGSTOP): the new owner
        # starts its producer at assignment, before it has processed anything ...
        new.assign({tp})
        await new.start({tp})
        # ... so the old owner, waking up, cannot commit what it was doing.
        with pytest.raises(PartitionFenced):
            await old.publish(tp, [OutRecord(out, b"zombie", None, [])], next_offset=2)
        assert old.state(tp) is PartitionState.FENCED
        await new.publish(tp, [OutRecord(out, b"b", None, [])], next_offset=2)
        assert await _values(kafka_bootstrap, out, 2) == [b"a", b"b"]
    finally:
        await old.close()
        await new.close()
        await reader.stop()


class _SlowCommit:
    """A real producer whose first transaction takes longer than its transaction timeout."""

    def __init__(self, producer: AIOKafkaProducer, delay_s: float) -> None:
        self._producer = producer
        self._delay_s = delay_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self._producer, name)

    async def send_offsets_to_transaction(self, *args: Any) -> None:
        if self._delay_s:
            delay, self._delay_s = self._delay_s, 0.0
            await asyncio.sleep(delay)
        await self._producer.send_offsets_to_transaction(*args)


@pytest.mark.kafka
@pytest.mark.slow
async def test_a_transaction_timeout_abort_is_retried_when_the_partition_is_still_ours(
    kafka_bootstrap: str, new_topic: Any
) -> None:
    topic = await new_topic(partitions=1)
    out = await new_topic(partitions=1)
    tp, group = TopicPartition(topic, 0), f"g-{uuid.uuid4().hex[:8]}"
    reader = await _committed_reader(kafka_bootstrap, group)
    made: list[str] = []

    def make(txn_id: str) -> Any:
        made.append(txn_id)
        producer = AIOKafkaProducer(
            bootstrap_servers=kafka_bootstrap,
            transactional_id=txn_id,
            transaction_timeout_ms=1000,
        )
        # The broker looks for timed-out transactions every 10 s (its default cleanup interval).
        return _SlowCommit(producer, delay_s=12.0 if len(made) == 1 else 0.0)

    async def still_ours(tp: TopicPartition) -> bool:
        return True  # no rebalance happened: the group still gives us the partition

    txns = PartitionTransactions(group, make, reader.committed, still_ours=still_ours)
    txns.assign({tp})
    try:
        records = [OutRecord(out, b"x", None, []), OutRecord(out, b"y", None, [])]
        await txns.publish(tp, records, next_offset=2)
        assert txns.state(tp) is PartitionState.OWNED
        assert len(made) >= 2  # the aborted producer was replaced
        assert await _values(kafka_bootstrap, out, 2) == [b"x", b"y"]  # once, not twice
        assert await reader.committed(tp) == 2
    finally:
        await txns.close()
        await reader.stop()


# ---- a failing partition stalls alone (no broker: a scripted PartitionTransactions) ---------


class _Flaky(PartitionTransactions):
    def __init__(self) -> None:
        async def committed(tp: TopicPartition) -> int | None:
            return None

        super().__init__("g", lambda txn_id: None, committed)
        self.broken: set[TopicPartition] = set()
        self.written: dict[TopicPartition, list[bytes]] = {}

    async def publish(
        self,
        tp: TopicPartition,
        records: list[OutRecord],
        next_offset: int,
        *,
        retry_for_s: float | None = None,
        alone: bool = False,
    ) -> None:
        if tp in self.broken:
            raise TransactionFailed(f"{tp}: TransactionalIdAuthorizationFailed")
        self.written.setdefault(tp, []).extend(r.value for r in records)


def _outcome(tp: TopicPartition, offset: int) -> Outcome:
    src = Source(tp.topic, tp.partition, offset, None, None, ())
    return Outcome(src, "out", f"{tp.partition}:{offset}".encode(), 0.0, "r")


async def test_a_partition_whose_transactions_fail_stalls_alone_and_keeps_its_outcomes() -> None:
    a, b = TopicPartition("in", 0), TopicPartition("in", 1)
    txns = _Flaky()
    txns.broken.add(a)
    outbox = ExactlyOnceOutbox(txns)
    stalls: list[tuple[TopicPartition, str | None]] = []
    outbox.on_stall = lambda tp, why: stalls.append((tp, why))
    outbox.assign({a, b})
    for tp in (a, b):
        for offset in range(3):
            outbox.track(tp, offset)
            await outbox.publish(_outcome(tp, offset))
    assert outbox.in_flight() == 0 and outbox.backlog() == 6  # finished, not yet committed

    await outbox.commit()
    assert txns.written == {b: [b"1:0", b"1:1", b"1:2"]}  # b went on
    assert outbox.backlog() == 3  # a's outcomes are kept, not dropped
    assert stalls[-1][0] == a and "TransactionalIdAuthorizationFailed" in str(stalls[-1][1])

    txns.broken.clear()  # fixed (e.g. the ACL granted)
    await outbox.commit()
    assert txns.written[a] == [b"0:0", b"0:1", b"0:2"]
    assert outbox.backlog() == 0 and stalls[-1] == (a, None)
