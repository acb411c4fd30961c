"""Per-partition transactional producers on a real broker: atomic slices and zombie fencing."""

from __future__ import annotations

from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from service_helpers import committed_offsets

from semroute_stream._service.records import OutRecord
from semroute_stream._service.transactions import PartitionFenced, PartitionTransactions

pytestmark = pytest.mark.kafka


def _factory(bootstrap: str) -> Any:
    def make(txn_id: str) -> AIOKafkaProducer:
        return AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=txn_id)

    return make


async def _values(bootstrap: str, topic: str, n: int) -> list[bytes]:
    """Committed values of a one-partition topic, in order (read_committed)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, isolation_level="read_committed", enable_auto_commit=False
    )
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        (end,) = (await consumer.end_offsets([tp])).values()
        values: list[bytes] = []
        while await consumer.position(tp) < end:
            got = await consumer.getmany(tp, timeout_ms=1000)
            values.extend(r.value for r in got.get(tp, []))
        assert len(values) == n, values
        return values
    finally:
        await consumer.stop()


async def _committed_reader(bootstrap: str, group: str) -> Any:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
    await consumer.start()
    return consumer


async def test_slice_and_offset_commit_atomically(kafka_bootstrap: str, new_topic: Any) -> None:
    src = await new_topic(partitions=2)
    out = await new_topic(partitions=1)
    group = f"g-{src}"
    reader = await _committed_reader(kafka_bootstrap, group)
    txns = PartitionTransactions(group, _factory(kafka_bootstrap), reader.committed)
    tp = TopicPartition(src, 1)
    txns.assign({tp})
    try:
        recs = [OutRecord(out, f"v{i}".encode(), b"k", [("h", b"1")]) for i in range(3)]
        await txns.publish(tp, recs, next_offset=3)
        await txns.publish(tp, recs[:1], next_offset=4)
    finally:
        await txns.close()
        await reader.stop()
    got = await _values(kafka_bootstrap, out, 4)
    assert got == [b"v0", b"v1", b"v2", b"v0"]
    assert (await committed_offsets(kafka_bootstrap, group, src)) == {0: -1, 1: 4}
    assert txns.transactions == 2


async def test_new_owner_fences_the_old_one(kafka_bootstrap: str, new_topic: Any) -> None:
    src = await new_topic(partitions=1)
    out = await new_topic(partitions=1)
    group = f"g-{src}"
    tp = TopicPartition(src, 0)
    reader = await _committed_reader(kafka_bootstrap, group)
    old = PartitionTransactions(group, _factory(kafka_bootstrap), reader.committed)
    new = PartitionTransactions(group, _factory(kafka_bootstrap), reader.committed)
    old.assign({tp})
    new.assign({tp})
    try:
        await old.publish(tp, [OutRecord(out, b"a", None, [])], next_offset=1)
        await new.publish(tp, [OutRecord(out, b"b", None, [])], next_offset=2)  # fences `old`
        with pytest.raises(PartitionFenced):
            await old.publish(tp, [OutRecord(out, b"zombie", None, [])], next_offset=2)
        await old.release({tp})
        with pytest.raises(PartitionFenced, match="revoked"):
            await old.publish(tp, [OutRecord(out, b"late", None, [])], next_offset=3)
    finally:
        await old.close()
        await new.close()
        await reader.stop()
    assert (await committed_offsets(kafka_bootstrap, group, src)) == {0: 2}
    assert await _values(kafka_bootstrap, out, 2) == [b"a", b"b"]  # no zombie write visible
