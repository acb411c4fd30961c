"""Smoke tests of the real test broker and of the aiokafka behaviours the service relies on.

Run: ``python tests/kafka_local.py run -- python -m pytest -q tests/test_kafka_broker.py``
"""

from __future__ import annotations

import asyncio
import inspect
import uuid
from collections.abc import Iterable
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import RecordMetadata
from kafka_local import LocalKafka

pytestmark = pytest.mark.kafka


def _group() -> str:
    return f"g-{uuid.uuid4().hex[:10]}"


async def _drain(
    consumer: AIOKafkaConsumer, partitions: Iterable[TopicPartition], timeout: float = 30.0
) -> list[ConsumerRecord]:
    """Fetch until the consumer's position reaches the end of every partition (the last
    stable offset for read_committed); fail after ``timeout``."""
    parts = list(partitions)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    out: list[ConsumerRecord] = []
    while True:
        batches = await consumer.getmany(timeout_ms=200)
        for records in batches.values():
            out.extend(records)
        assignment = consumer.assignment()
        if set(parts) <= assignment:
            ends = await consumer.end_offsets(parts)
            positions = [await consumer.position(tp) for tp in parts]
            if all(pos >= ends[tp] for pos, tp in zip(positions, parts, strict=True)):
                return out
        if loop.time() > deadline:
            raise TimeoutError(f"drained {len(out)} records, not at the end after {timeout}s")


async def _consumer(bootstrap: str, *topics: str, **kwargs: object) -> AIOKafkaConsumer:
    consumer = AIOKafkaConsumer(*topics, bootstrap_servers=bootstrap, **kwargs)
    await consumer.start()
    return consumer


async def _produce(
    bootstrap: str, topic: str, values: list[bytes], **kwargs: object
) -> list[RecordMetadata]:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **kwargs)
    await producer.start()
    try:
        futs = [await producer.send(topic, v, key=v[-1:]) for v in values]
        return list(await asyncio.gather(*futs))
    finally:
        await producer.stop()


async def test_aiokafka_defaults_as_documented() -> None:
    """The defaults the service must override (see shared/notes/kafka-local.md)."""
    consumer = inspect.signature(AIOKafkaConsumer.__init__).parameters
    assert consumer["enable_auto_commit"].default is True
    assert consumer["auto_offset_reset"].default == "latest"
    assert consumer["isolation_level"].default == "read_uncommitted"
    producer = inspect.signature(AIOKafkaProducer.__init__).parameters
    assert producer["enable_idempotence"].default is False
    # acks is a sentinel that resolves to 1 without idempotence and to "all" (-1) with it
    plain = AIOKafkaProducer(bootstrap_servers="127.0.0.1:1")
    idem = AIOKafkaProducer(bootstrap_servers="127.0.0.1:1", enable_idempotence=True)
    try:
        assert plain._sender._acks == 1
        assert idem._sender._acks == -1
    finally:  # never started, but closed: no ResourceWarning under filterwarnings=error
        await plain.stop()
        await idem.stop()


async def test_idempotent_produce_manual_commit_and_resume(
    kafka_bootstrap: str, new_topic: Any
) -> None:
    topic = await new_topic(partitions=3)
    tps = [TopicPartition(topic, p) for p in range(3)]
    values = [f"msg-{i:03d}".encode() for i in range(90)]
    metas = await _produce(
        kafka_bootstrap, topic, values, enable_idempotence=True, acks="all", linger_ms=5
    )
    # every send acknowledged once, offsets dense per partition: no gaps, no duplicates
    per_partition: dict[int, list[int]] = {}
    for m in metas:
        per_partition.setdefault(m.partition, []).append(m.offset)
    assert len(per_partition) > 1, "keys should spread over several partitions"
    for offsets in per_partition.values():
        assert sorted(offsets) == list(range(len(offsets)))

    group = _group()
    c1 = await _consumer(
        kafka_bootstrap,
        topic,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    try:
        got = await _drain(c1, tps)
        assert sorted(r.value for r in got) == values  # everything, exactly once
        await c1.commit()
        for tp in tps:
            assert await c1.committed(tp) == len(per_partition.get(tp.partition, []))
    finally:
        await c1.stop()

    # a new member of the same group starts at the committed offsets: nothing old comes back
    await _produce(kafka_bootstrap, topic, [b"late-1", b"late-2"], acks="all")
    c2 = await _consumer(
        kafka_bootstrap,
        topic,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    try:
        got2 = await _drain(c2, tps)
        assert sorted(r.value for r in got2) == [b"late-1", b"late-2"]
    finally:
        await c2.stop()

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
        assert {tp: o.offset for tp, o in offsets.items()} == {
            tp: len(per_partition.get(tp.partition, [])) for tp in tps
        }
    finally:
        await admin.close()


async def test_default_consumer_starts_at_latest_and_autocommits(
    kafka_bootstrap: str, new_topic: Any
) -> None:
    topic = await new_topic(partitions=1)
    tp = TopicPartition(topic, 0)
    await _produce(kafka_bootstrap, topic, [b"before-1", b"before-2"])
    group = _group()
    c1 = await _consumer(kafka_bootstrap, topic, group_id=group, auto_commit_interval_ms=100)
    try:
        assert await _drain(c1, [tp]) == []  # auto_offset_reset="latest": old records skipped
        await _produce(kafka_bootstrap, topic, [b"after-1"])
        got = await _drain(c1, [tp])
        assert [r.value for r in got] == [b"after-1"]
    finally:
        await c1.stop()  # enable_auto_commit=True commits what getmany handed out
    c2 = await _consumer(kafka_bootstrap, topic, group_id=group, enable_auto_commit=False)
    try:
        assert await c2.committed(tp) == 3
    finally:
        await c2.stop()


async def test_transaction_with_offsets_commits_atomically(
    kafka_bootstrap: str, new_topic: Any
) -> None:
    src, dst = await new_topic(partitions=1), await new_topic(partitions=1)
    src_tp, dst_tp = TopicPartition(src, 0), TopicPartition(dst, 0)
    await _produce(kafka_bootstrap, src, [f"in-{i}".encode() for i in range(10)], acks="all")
    group = _group()

    consumer = await _consumer(
        kafka_bootstrap,
        src,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap, transactional_id=f"tx-{uuid.uuid4().hex[:10]}"
    )
    await producer.start()
    try:
        inputs = await _drain(consumer, [src_tp])
        assert len(inputs) == 10
        # committed transaction: outputs for inputs 0..4 plus the group offset 5
        async with producer.transaction():
            for rec in inputs[:5]:
                await producer.send(dst, b"ok:" + rec.value)
            await producer.send_offsets_to_transaction({src_tp: inputs[4].offset + 1}, group)
        # aborted transaction: outputs for inputs 5..9 plus the group offset 10
        await producer.begin_transaction()
        for rec in inputs[5:]:
            await producer.send(dst, b"aborted:" + rec.value)
        await producer.send_offsets_to_transaction({src_tp: inputs[9].offset + 1}, group)
        await producer.abort_transaction()
    finally:
        await producer.stop()
        await consumer.stop()

    committed_reader = await _consumer(
        kafka_bootstrap, dst, auto_offset_reset="earliest", isolation_level="read_committed"
    )
    raw_reader = await _consumer(kafka_bootstrap, dst, auto_offset_reset="earliest")
    try:
        seen = [r.value for r in await _drain(committed_reader, [dst_tp])]
        assert seen == [f"ok:in-{i}".encode() for i in range(5)]
        # the aborted records were written to the log; only isolation hides them
        raw = [r.value for r in await _drain(raw_reader, [dst_tp])]
        assert raw == seen + [f"aborted:in-{i}".encode() for i in range(5, 10)]
    finally:
        await committed_reader.stop()
        await raw_reader.stop()

    # only the committed transaction moved the group's offset
    resumed = await _consumer(
        kafka_bootstrap, src, group_id=group, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    try:
        assert await resumed.committed(src_tp) == 5
        rest = await _drain(resumed, [src_tp])
        assert [r.value for r in rest] == [f"in-{i}".encode() for i in range(5, 10)]
    finally:
        await resumed.stop()


@pytest.mark.slow
async def test_data_and_offsets_survive_a_broker_crash(
    kafka_bootstrap: str, local_kafka: LocalKafka, new_topic: Any
) -> None:
    """SIGKILL the local broker, restart it on its kept data: acked records and committed
    offsets are still there."""
    topic = await new_topic(partitions=2)
    tps = [TopicPartition(topic, p) for p in range(2)]
    values = [f"v-{i:02d}".encode() for i in range(20)]
    await _produce(kafka_bootstrap, topic, values, enable_idempotence=True)
    group = _group()
    c1 = await _consumer(
        kafka_bootstrap,
        topic,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    try:
        await _drain(c1, tps)
        await c1.commit({tps[0]: 3, tps[1]: 4})
    finally:
        await c1.stop()

    await asyncio.to_thread(local_kafka.restart, kill=True)

    c2 = await _consumer(
        kafka_bootstrap,
        topic,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    c3 = await _consumer(kafka_bootstrap, topic, auto_offset_reset="earliest")
    try:
        assert [await c2.committed(tp) for tp in tps] == [3, 4]
        assert sorted(r.value for r in await _drain(c3, tps)) == values
        rest = await _drain(c2, tps)
        assert len(rest) == len(values) - 7
    finally:
        await c2.stop()
        await c3.stop()
