"""The at-least-once send path batches the records of one event-loop tick per partition
(``batcher._Batcher``): same partitions as ``producer.send``, every record acknowledged, order
kept within a partition, and a refused record refused alone. On the real broker."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord
from conftest import NewTopicFactory
from fakes import FakeEncoder
from service_helpers import make_settings, open_reader

from semroute_stream._routing.router import Router
from semroute_stream._routing.schema import load_routes
from semroute_stream._service.delivery import RECORD_ERRORS, AtLeastOnceOutbox, producer_send
from semroute_stream._service.observe import Observer
from semroute_stream._service.pipeline import Pipeline
from semroute_stream._service.records import Outcome, OutRecord, Source
from semroute_stream._service.worker import Worker

pytestmark = pytest.mark.kafka


async def _read(
    bootstrap: str, topic: str, partitions: int, expect: int, timeout: float = 60.0
) -> list[ConsumerRecord[bytes, bytes]]:
    consumer = await open_reader(bootstrap, [TopicPartition(topic, p) for p in range(partitions)])
    out: list[ConsumerRecord[bytes, bytes]] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < expect and time.monotonic() < deadline:
            for recs in (await consumer.getmany(timeout_ms=500)).values():
                out.extend(recs)
        await asyncio.sleep(0.5)  # anything more (duplicates) shows up too
        for recs in (await consumer.getmany(timeout_ms=500)).values():
            out.extend(recs)
    finally:
        await consumer.stop()
    return out


def _producer(bootstrap: str, *, idempotent: bool = True, **extra: Any) -> AIOKafkaProducer:
    """A producer as the service's (``kafka.make_producer``), or a non-idempotent one."""
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=idempotent,
        linger_ms=5,
        **extra,
    )


async def test_batched_records_land_where_producer_send_puts_them_in_order(
    kafka_bootstrap: str, new_topic: NewTopicFactory
) -> None:
    plain_topic = await new_topic(3)
    batched_topic = await new_topic(3)
    keys = [f"key-{i}".encode() for i in range(60)] + [b"", bytes(range(256))]
    producer = _producer(kafka_bootstrap)
    await producer.start()
    try:
        acks = [await producer.send(plain_topic, b"x", key=k) for k in keys]
        await asyncio.gather(*acks)
        send = producer_send(producer)
        # every key three times, the records of each round sent concurrently, rounds
        # overlapping (sent while the previous round's batches are still on their way)
        records = [
            OutRecord(batched_topic, orjson.dumps({"seq": n}), keys[n % len(keys)], [("h", b"v")])
            for n in range(3 * len(keys))
        ] + [OutRecord(batched_topic, orjson.dumps({"seq": -1}), None, [])]  # keyless
        tasks: list[asyncio.Future[None]] = []
        for start in range(0, len(records), 50):
            tasks += [asyncio.ensure_future(send(r)) for r in records[start : start + 50]]
            await asyncio.sleep(0)
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
    finally:
        await producer.stop()

    plain = await _read(kafka_bootstrap, plain_topic, 3, len(keys))
    where = {r.key: r.partition for r in plain}
    assert len(where) == len(keys)
    batched = await _read(kafka_bootstrap, batched_topic, 3, len(records))
    assert len(batched) == len(records)  # each once
    seen: dict[int, list[int]] = {}
    for r in sorted(batched, key=lambda r: (r.partition, r.offset)):
        seq = orjson.loads(r.value)["seq"]
        assert list(r.headers) == ([("h", b"v")] if seq >= 0 else [])
        if seq < 0:
            assert r.key is None
            continue
        assert r.key == keys[seq % len(keys)] and r.partition == where[r.key]
        seen.setdefault(r.partition, []).append(seq)
    assert sorted(s for seqs in seen.values() for s in seqs) == list(range(3 * len(keys)))
    for seqs in seen.values():  # sent in order, so written in order within the partition
        assert seqs == sorted(seqs)


async def test_a_record_refused_in_a_shared_batch_is_retried_alone(
    kafka_bootstrap: str, new_topic: NewTopicFactory
) -> None:
    # 2 KiB per batch: the ten good records do not fit in one batch together, one does.
    # Not idempotent: aiokafka's idempotent producer does not recover from a batch the broker
    # refuses (its sequence numbers keep the refused batch, every later batch of that partition
    # fails with OutOfOrderSequenceNumber), with or without batching; this tests the fallback.
    topic = await new_topic(1, config={"max.message.bytes": "2048"})
    producer = _producer(kafka_bootstrap, idempotent=False)
    await producer.start()
    try:
        send = producer_send(producer)
        records = [OutRecord(topic, b"g%d" % i + b"." * 400, b"k", []) for i in range(10)]
        records.insert(4, OutRecord(topic, b"big" + b"." * 3000, b"k", []))
        results = await asyncio.wait_for(
            asyncio.gather(*(send(r) for r in records), return_exceptions=True), 60
        )
    finally:
        await producer.stop()
    refused = [i for i, res in enumerate(results) if res is not None]
    assert refused == [4] and isinstance(results[4], RECORD_ERRORS)
    written = await _read(kafka_bootstrap, topic, 1, 10)
    assert sorted(r.value[:3] for r in written) == sorted(b"g%d." % i for i in range(10))


def _pipeline(tmp_path: Path, bootstrap: str, topic: str, outbox: Any) -> Pipeline:
    settings = make_settings(tmp_path, bootstrap, topic, mode="route_only")
    observer = outbox._observer
    pipeline = Pipeline(
        settings,
        Router(load_routes(settings.routes), FakeEncoder()),
        object(),
        outbox,
        Worker(settings, None, observer),
        targets={},
        observer=observer,
    )
    pipeline.on_assigned({TopicPartition(topic, 0)})
    return pipeline


async def test_an_oversized_outcome_among_good_ones_is_dead_lettered_alone(
    tmp_path: Path, kafka_bootstrap: str, new_topic: NewTopicFactory
) -> None:
    # The record over the producer's max_request_size is refused before it reaches a batch (as
    # producer.send refuses it); the others share batches and are all acknowledged.
    inp = await new_topic(1)
    admin_topics: dict[str, dict[str, str]] = {f"{inp}.out": {}, f"{inp}.dlq": {}}
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(n, 1, 1, topic_configs=c) for n, c in admin_topics.items()]
        )
        producer = _producer(kafka_bootstrap, max_request_size=20_000)
        await producer.start()
        committed: dict[TopicPartition, int] = {}

        async def commit(offsets: dict[TopicPartition, Any]) -> None:
            committed.update({tp: o.offset for tp, o in offsets.items()})

        outbox = AtLeastOnceOutbox(producer_send(producer), commit, observer=Observer())
        pipeline = _pipeline(tmp_path, kafka_bootstrap, inp, outbox)
        outbox.assign({TopicPartition(inp, 0)})
        try:
            outcomes = []
            for offset in range(12):
                src = Source(inp, 0, offset, None, b"k%d" % offset, ())
                size = 30_000 if offset == 5 else 2_000
                value = orjson.dumps({"offset": offset, "pad": "." * size})
                outbox.track(TopicPartition(inp, 0), offset)
                outcomes.append(Outcome(src, f"{inp}.out", value, time.time(), route="r"))
            await asyncio.wait_for(asyncio.gather(*(pipeline._deliver(o) for o in outcomes)), 60)
            await outbox.commit()
        finally:
            await producer.stop()
        assert committed == {TopicPartition(inp, 0): 12}
        good = await _read(kafka_bootstrap, f"{inp}.out", 1, 11)
        assert sorted(orjson.loads(r.value)["offset"] for r in good) == [
            o for o in range(12) if o != 5
        ]
        (letter,) = await _read(kafka_bootstrap, f"{inp}.dlq", 1, 1)
        error = orjson.loads(letter.value)["error"]
        assert error["kind"] == "unpublishable" and error["stage"] == "publish"
        assert pipeline.stats.dead_letters == 1
    finally:
        await admin.delete_topics(list(admin_topics))
        await admin.close()
