"""``semroute-stream replay``: a bounded re-run of the input topic with the service's own code."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from service_helpers import (
    QUERIES,
    committed_offsets,
    make_settings,
    produce,
    query_message,
    read_topic,
    settings_yaml,
)

from semroute_stream._errors import ConfigError
from semroute_stream._service.app import open_service, run_service
from semroute_stream._service.replay import ReplayStart, parse_partitions, parse_timestamp, plan

REPO = Path(__file__).resolve().parents[1]


def test_timestamps_and_partition_lists_parse() -> None:
    assert parse_timestamp("1764000000000") == 1_764_000_000_000
    assert parse_timestamp("2025-11-24T16:00:00Z") == 1_764_000_000_000
    assert parse_timestamp("2025-11-24T16:00:00") == 1_764_000_000_000  # no zone: UTC
    assert parse_timestamp("2025-11-24T17:00:00+01:00") == 1_764_000_000_000
    assert parse_partitions("3,0-2, 5") == [0, 1, 2, 3, 5]
    for bad in ("yesterday", "24/11/2025"):
        with pytest.raises(ConfigError, match="--from-timestamp"):
            parse_timestamp(bad)
    with pytest.raises(ConfigError, match="--partitions"):
        parse_partitions("0,a")


async def _produce_at(bootstrap: str, topic: str, values: list[bytes], timestamp_ms: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for v in values:
            await (await producer.send(topic, v, timestamp_ms=timestamp_ms))
    finally:
        await producer.stop()


@pytest.mark.kafka
async def test_replay_from_a_timestamp_reproduces_the_live_decisions(
    kafka_bootstrap: str, new_topic: Any, tmp_path: Path
) -> None:
    topic = await new_topic(partitions=2)
    now = int(time.time() * 1000)
    old = [query_message(t, f"old{i}") for i, (t, _) in enumerate(QUERIES)]
    new = [query_message(t, f"new{i}") for i, (t, _) in enumerate(QUERIES)] + [b"{not json"]
    await _produce_at(kafka_bootstrap, topic, old, now - 3_600_000)
    await _produce_at(kafka_bootstrap, topic, new, now)
    settings = make_settings(tmp_path, kafka_bootstrap, topic, mode="route_only")
    await run_service(settings, idle_timeout_s=1.5, handle_signals=False)  # the live run
    live = {r["id"]: r for r in await read_topic(kafka_bootstrap, f"{topic}.out", expect=16)}
    committed = await committed_offsets(kafka_bootstrap, settings.input.group_id, topic)

    since = datetime.fromtimestamp((now - 1_800_000) / 1000, UTC).isoformat()
    output = tmp_path / "replay.jsonl"
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "semroute_stream", "replay"),
            *("--config", str(settings_yaml(settings, tmp_path / "service.yaml"))),
            *("--from-timestamp", since, "--output", str(output)),
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    assert b"\r" not in proc.stderr  # no progress bar when stderr is not a terminal
    summary = orjson.loads(proc.stdout.splitlines()[-1])
    assert summary["consumed"] == len(new) and summary["stopped_by"].startswith("replay reached")
    replayed = [orjson.loads(line) for line in output.read_bytes().splitlines()]
    ok = [r for r in replayed if r["status"] == "ok"]
    assert sorted(r["id"] for r in ok) == sorted(f"new{i}" for i in range(len(QUERIES)))
    assert [r["error"]["kind"] for r in replayed if r["status"] == "error"] == ["invalid_json"]
    for r in ok:
        before = live[r["id"]]
        assert r["idempotency_key"] == before["idempotency_key"]
        for key in ("route", "is_fallback", "routes_version", "threshold", "method"):
            assert r["decision"][key] == before["decision"][key]
        assert r["decision"]["score"] == pytest.approx(before["decision"]["score"], abs=1e-5)
    # the live group's offsets are untouched: the replay commits to a group of its own
    assert await committed_offsets(kafka_bootstrap, settings.input.group_id, topic) == committed


@pytest.mark.kafka
async def test_replay_stops_at_the_end_offsets_it_saw_when_it_started(
    kafka_bootstrap: str, new_topic: Any, tmp_path: Path
) -> None:
    topic = await new_topic(partitions=2)
    first = [query_message(t, f"a{i}") for i, (t, _) in enumerate(QUERIES)]
    await produce(kafka_bootstrap, topic, first, partition=1)
    await produce(kafka_bootstrap, topic, first[:3], partition=0)
    settings = make_settings(tmp_path, kafka_bootstrap, topic, mode="route_only")
    async with open_service(settings, group_id=f"{topic}.replay", serve_http=False) as pipeline:
        ranges = await plan(settings, pipeline.consumer, ReplayStart(offset=2), [1])
        assert ranges == {TopicPartition(topic, 1): (2, len(first))}
        later = [query_message("where is my package", f"late{i}") for i in range(5)]
        await produce(kafka_bootstrap, topic, later, partition=1)  # after the start: left alone
        seen: list[int] = []
        stats = await pipeline.replay(ranges, seen.append)
    assert stats.consumed == len(first) - 2
    assert seen[-1] == len(first) - 2  # progress reached the total
    out = await read_topic(kafka_bootstrap, f"{topic}.out", expect=len(first) - 2)
    assert sorted(r["id"] for r in out) == sorted(f"a{i}" for i in range(2, len(first)))
    with pytest.raises(ConfigError, match="no partition"):
        async with open_service(settings, group_id=f"{topic}.r2", serve_http=False) as pipeline:
            await plan(settings, pipeline.consumer, ReplayStart(beginning=True), [7])
