"""Helpers for the service tests: a small routes file, settings, producing and reading back."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from semroute_stream._service.settings import Settings

ROUTES: dict[str, Any] = {
    "default_threshold": 0.45,
    "method": "max",
    "fallback": {"name": "fallback", "endpoint": "general"},
    "routes": [
        {
            "name": "billing",
            "endpoint": "billing",
            "system_prompt": "You are the billing desk.",
            "utterances": [
                "I was charged twice for my subscription",
                "how do I get a refund for my last invoice",
                "my credit card payment failed",
                "why is my bill higher this month",
            ],
        },
        {
            "name": "tech",
            "endpoint": "support",
            "utterances": [
                "the app crashes when I open it",
                "I cannot log in, the password reset email never arrives",
                "the website shows a 500 error",
                "uploading a file fails with an error",
            ],
        },
        {
            "name": "shipping",
            "endpoint": "support",
            "model": "shipping-model",
            "utterances": [
                "where is my package",
                "my order has not arrived yet",
                "can I change the delivery address of my order",
                "the parcel tracking number does not work",
            ],
        },
    ],
}

# (text, expected route) — the fallback texts match no route.
QUERIES: list[tuple[str, str]] = [
    ("I got charged two times for the same subscription", "billing"),
    ("please refund my invoice from last month", "billing"),
    ("the application crashes every time I start it", "tech"),
    ("password reset email is not arriving so I can't log in", "tech"),
    ("where is my parcel, it has not been delivered", "shipping"),
    ("I want to change the delivery address for my order", "shipping"),
    ("what is the capital of mongolia", "fallback"),
    ("recommend a good recipe for banana bread", "fallback"),
]

BAD_INPUTS: list[tuple[bytes | None, str]] = [
    (None, "null_value"),
    (b"\xff\xfe\xfa not utf8", "invalid_utf8"),
    (b"{not json", "invalid_json"),
    (b"[1, 2]", "not_an_object"),
    (b'{"body": "no text field"}', "missing_text"),
    (b'{"text": 12}', "text_not_string"),
    (b'{"text": "   "}', "empty_text"),
    (b'{"text": "' + b"x" * 5000 + b'"}', "oversized"),
]


def write_routes(tmp_path: Path, **overrides: Any) -> Path:
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump({**ROUTES, **overrides}))
    return path


def make_settings(
    tmp_path: Path,
    bootstrap: str,
    topic: str,
    *,
    mode: str = "llm",
    endpoints: dict[str, str] | None = None,
    **sections: Any,
) -> Settings:
    """Settings for one test: input ``topic``, outputs ``<topic>.out`` and ``<topic>.dlq``."""
    eps = {
        name: {
            "base_url": url,
            "model": f"{name}-model",
            "max_attempts": 3,
            "backoff_initial_s": 0.01,
            "backoff_max_s": 1.0,  # caps Retry-After too
            "timeout_s": 5,
            "circuit_reset_s": 2,
        }
        for name, url in (endpoints or {}).items()
    }
    data: dict[str, Any] = {
        "routes": write_routes(tmp_path),
        "mode": mode,
        "kafka": {"bootstrap_servers": bootstrap},
        "input": {
            "topic": topic,
            "group_id": f"g-{topic}",
            "max_message_bytes": 4096,
            "session_timeout_ms": 10_000,
        },
        "output": {"responses_topic": f"{topic}.out", "dlq_topic": f"{topic}.dlq"},
        "batching": {"max_size": 16, "linger_ms": 20},
        "flow": {"commit_interval_ms": 100, "drain_timeout_s": 20},
        "encoder": {"intra_op_threads": 1},
        "endpoints": eps,
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return Settings(**data)


def settings_yaml(settings: Settings, path: Path) -> Path:
    """Write ``settings`` as a config file for the ``semroute-stream run`` subprocess."""
    data = settings.model_dump(mode="json", exclude_defaults=False)
    path.write_text(yaml.safe_dump(data))
    return path


async def produce(
    bootstrap: str,
    topic: str,
    values: Sequence[bytes | None],
    *,
    keys: Sequence[bytes | None] | None = None,
    headers: Sequence[list[tuple[str, bytes]]] | None = None,
    partition: int | None = None,
) -> list[tuple[int, int]]:
    """Produce and return the (partition, offset) of each message."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        futures = []
        for i, value in enumerate(values):
            futures.append(
                await producer.send(
                    topic,
                    value,
                    key=keys[i] if keys else None,
                    headers=headers[i] if headers else None,
                    partition=partition,
                )
            )
        metas = await asyncio.gather(*futures)
        return [(m.partition, m.offset) for m in metas]
    finally:
        await producer.stop()


def query_message(text: str, ident: str) -> bytes:
    return orjson.dumps({"id": ident, "text": text})


async def _partitions(bootstrap: str, topic: str, deadline: float) -> list[int]:
    """The topic's partition numbers, waiting (until ``deadline``) for it to exist."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        loop = asyncio.get_running_loop()
        while True:
            (desc,) = await admin.describe_topics([topic])
            if desc.get("error_code") == 0 and desc.get("partitions"):
                return sorted(p["partition"] for p in desc["partitions"])
            if loop.time() > deadline:
                return []
            await asyncio.sleep(0.2)
    finally:
        await admin.close()


async def open_reader(bootstrap: str, tps: list[TopicPartition]) -> AIOKafkaConsumer:
    """A started read_committed consumer assigned to ``tps`` from their beginning (no group)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level="read_committed"
    )
    await consumer.start()
    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)
    return consumer


async def read_topic(
    bootstrap: str, topic: str, *, expect: int, timeout: float = 60.0
) -> list[dict[str, Any]]:
    """Read a topic from the beginning (committed data only) until ``expect`` records or timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    parts = await _partitions(bootstrap, topic, deadline)
    if not parts:
        return []
    consumer = await open_reader(bootstrap, [TopicPartition(topic, p) for p in parts])
    try:
        out: list[dict[str, Any]] = []
        while len(out) < expect and loop.time() < deadline:
            got = await consumer.getmany(timeout_ms=500)
            for recs in got.values():
                for r in recs:
                    rec = orjson.loads(r.value)
                    rec["_kafka"] = {"key": r.key, "headers": list(r.headers), "topic": r.topic}
                    out.append(rec)
        return out
    finally:
        await consumer.stop()


async def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        parts = await _partitions(bootstrap, topic, asyncio.get_running_loop().time() + 10)
        result = {}
        for p in parts:
            off = await consumer.committed(TopicPartition(topic, p))
            result[p] = -1 if off is None else off
        return result
    finally:
        await consumer.stop()


async def group_state(bootstrap: str, group: str) -> tuple[str, int]:
    """A consumer group's state (``Stable``, ``PreparingRebalance``, ...) and member count."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (response,) = await admin.describe_consumer_groups([group])
        _error, _group, state, _ptype, _protocol, members, *_ = response.groups[0]
        return str(state), len(members)
    finally:
        await admin.close()


async def wait_for_group(bootstrap: str, group: str, members: int, timeout: float = 60.0) -> None:
    """Until ``group`` is Stable with ``members`` members (TimeoutError after ``timeout``)."""
    async with asyncio.timeout(timeout):
        while await group_state(bootstrap, group) != ("Stable", members):
            await asyncio.sleep(0.2)


def outcome_counts(records: list[dict[str, Any]]) -> Counter[str]:
    """How many outcome records each input (by idempotency key) got."""
    return Counter(r["idempotency_key"] for r in records)
