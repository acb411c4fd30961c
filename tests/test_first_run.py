"""The first-run commands on a real broker: ``topics create`` and ``publish``."""

from __future__ import annotations

import io
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from aiokafka.admin import AIOKafkaAdminClient
from service_helpers import open_reader, write_routes

from semroute_stream._cli.app import main

pytestmark = pytest.mark.kafka


@pytest.fixture
async def prefix(kafka_bootstrap: str) -> AsyncIterator[str]:
    """A unique topic name prefix; every topic starting with it is deleted afterwards."""
    name = f"fr-{uuid.uuid4().hex[:8]}"
    yield name
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        mine = [t for t in await admin.list_topics() if t.startswith(name)]
        if mine:
            await admin.delete_topics(mine)
    finally:
        await admin.close()


def _config(tmp_path: Path, bootstrap: str, topic: str, **extra: Any) -> Path:
    data: dict[str, Any] = {
        "routes": str(write_routes(tmp_path)),
        "kafka": {"bootstrap_servers": bootstrap},
        "input": {"topic": topic},
        "output": {"responses_topic": f"{topic}.out", "dlq_topic": f"{topic}.dlq"},
        **extra,
    }
    path = tmp_path / "service.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


async def _partitions(bootstrap: str, prefix: str) -> dict[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        mine = sorted(t for t in await admin.list_topics() if t.startswith(prefix))
        described = await admin.describe_topics(mine)
    finally:
        await admin.close()
    return {d["topic"]: len(d["partitions"]) for d in described}


async def test_topics_create_every_topic_then_reports_them(
    kafka_bootstrap: str, prefix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(
        tmp_path,
        kafka_bootstrap,
        prefix,
        output={
            "responses_topic": f"{prefix}.out",
            "dlq_topic": f"{prefix}.dlq",
            "per_route_topics": True,
        },
        endpoints={
            name: {"base_url": "http://127.0.0.1:9/v1", "model": "m"}
            for name in ("billing", "support", "general")
        },
    )
    args = ["topics", "create", "--config", str(config), "--partitions", "2"]
    assert await _in_thread(main, [*args, "--replication-factor", "1"]) == 0
    first = capsys.readouterr().out.splitlines()
    routes = ("billing", "tech", "shipping", "fallback")
    expected = {
        prefix: "input",
        **{f"{prefix}.out.{r}": f"responses of route {r}" for r in routes},
        f"{prefix}.dlq": "dead letters",
        **{
            f"{prefix}.retry.{e}": f"parked messages of endpoint {e}"
            for e in ("billing", "general", "support")
        },
    }
    assert sorted(first) == sorted(f"{'created':<24} {t} ({role})" for t, role in expected.items())
    assert await _partitions(kafka_bootstrap, prefix) == dict.fromkeys(expected, 2)

    # Idempotent: a second run (other flags) reports them and changes nothing.
    assert await _in_thread(main, [*args[:-1], "5"]) == 0
    second = capsys.readouterr().out.splitlines()
    assert sorted(second) == sorted(
        f"{'exists (2 partitions)':<24} {t} ({role})" for t, role in expected.items()
    )
    assert await _partitions(kafka_bootstrap, prefix) == dict.fromkeys(expected, 2)


async def test_publish_json_lines_and_text(
    kafka_bootstrap: str,
    prefix: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = _config(tmp_path, kafka_bootstrap, prefix)
    assert await _in_thread(main, ["topics", "create", "--config", str(config)]) == 0
    capsys.readouterr()

    lines = tmp_path / "in.jsonl"
    lines.write_text('{"id": 7, "text": "refund please"}\n\n{"text": "no id here"}\n')
    assert await _in_thread(main, ["publish", "--config", str(config), str(lines)]) == 0
    assert orjson.loads(capsys.readouterr().out) == {
        "topic": prefix,
        "messages": 2,
        "acknowledged": 2,
    }

    monkeypatch.setattr("sys.stdin", io.StringIO("where is my parcel\nhi there\n"))
    other = f"{prefix}.other"
    code = await _in_thread(
        main, ["publish", "--config", str(config), "--text", "--topic", other, "-"]
    )
    assert code == 0
    assert orjson.loads(capsys.readouterr().out)["acknowledged"] == 2

    # A bad line: nothing is sent, exit 2 naming the line.
    lines.write_text('{"text": "fine"}\n{not json\n')
    assert await _in_thread(main, ["publish", "--config", str(config), str(lines)]) == 2
    assert "line 2" in capsys.readouterr().err

    got = await _read(kafka_bootstrap, prefix, 2)
    assert got == sorted(
        [(b"7", {"id": 7, "text": "refund please"}), (None, {"text": "no id here"})], key=repr
    )
    got = await _read(kafka_bootstrap, other, 2)
    assert got == sorted(
        [(None, {"text": "where is my parcel"}), (None, {"text": "hi there"})], key=repr
    )


async def _read(bootstrap: str, topic: str, expect: int) -> list[tuple[bytes | None, Any]]:
    from aiokafka import TopicPartition

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (desc,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    tps = [TopicPartition(topic, p["partition"]) for p in desc["partitions"]]
    consumer = await open_reader(bootstrap, tps)
    try:
        records: list[Any] = []
        for _ in range(40):
            for batch in (await consumer.getmany(timeout_ms=250)).values():
                records += batch
            if len(records) >= expect:
                break
        for batch in (await consumer.getmany(timeout_ms=300)).values():
            records += batch  # anything more would be a bug
    finally:
        await consumer.stop()
    return sorted(((r.key, orjson.loads(r.value)) for r in records), key=repr)


async def _in_thread(fn: Any, argv: list[str]) -> int:
    """Run a command (it calls asyncio.run) off this test's event loop."""
    import asyncio

    code: int = await asyncio.to_thread(fn, argv)
    return code
