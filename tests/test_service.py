"""The streaming service end to end on a real Kafka broker and a real HTTP LLM stand-in."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from llm_stub import LLMStub
from service_helpers import (
    BAD_INPUTS,
    QUERIES,
    committed_offsets,
    make_settings,
    outcome_counts,
    produce,
    query_message,
    read_topic,
    settings_yaml,
    wait_for_group,
)

from semroute_stream._service.app import run_service

pytestmark = pytest.mark.kafka

REPO = Path(__file__).resolve().parents[1]


def _key_of(rec: dict[str, Any]) -> str:
    return str(rec["idempotency_key"])


@pytest.mark.parametrize("delivery", ["at_least_once", "exactly_once"])
async def test_route_only_every_input_gets_one_outcome(
    kafka_bootstrap: str, new_topic: Any, tmp_path: Path, delivery: str
) -> None:
    topic = await new_topic(partitions=3)
    values: list[bytes | None] = [query_message(t, f"q{i}") for i, (t, _) in enumerate(QUERIES)]
    values += [v for v, _ in BAD_INPUTS]
    keys: list[bytes | None] = [f"k{i}".encode() for i in range(len(values))]
    headers = [[("trace", f"t{i}".encode()), ("bin", b"\xff\x01")] for i in range(len(values))]
    coords = await produce(kafka_bootstrap, topic, values, keys=keys, headers=headers)

    settings = make_settings(tmp_path, kafka_bootstrap, topic, mode="route_only", delivery=delivery)
    stats = await run_service(settings, idle_timeout_s=2.0, handle_signals=False)

    ok = await read_topic(kafka_bootstrap, f"{topic}.out", expect=len(QUERIES))
    dlq = await read_topic(kafka_bootstrap, f"{topic}.dlq", expect=len(BAD_INPUTS))
    assert stats.consumed == len(values)
    assert len(ok) == len(QUERIES) and len(dlq) == len(BAD_INPUTS)
    every = outcome_counts(ok + dlq)
    assert set(every.values()) == {1}
    assert set(every) == {f"{topic}/{p}/{o}" for p, o in coords}

    by_id = {r["id"]: r for r in ok}
    for i, (text, route) in enumerate(QUERIES):
        rec = by_id[f"q{i}"]
        assert rec["route"] == route, (text, rec["decision"])
        assert rec["is_fallback"] == (route == "fallback")
        assert rec["response"] is None and rec["endpoint"] is None
        assert rec["input"] == {"id": f"q{i}", "text": text}
        d = rec["decision"]
        assert {"score", "threshold", "runner_up", "margin", "top", "nearest_utterance"} <= set(d)
        assert d["model"] == "sentence-transformers/all-MiniLM-L6-v2"
        assert len(d["routes_version"]) >= 8
        assert set(rec["timings_ms"]) >= {"queue", "encode", "decide", "total"}
        # key and headers carried through, in the record and on the Kafka message
        n = i  # values[i] was produced with key k{i} and header t{i}
        assert rec["key"] == {"text": f"k{n}"}
        assert rec["headers"][0] == {"key": "trace", "text": f"t{n}"}
        assert base64.b64decode(rec["headers"][1]["base64"]) == b"\xff\x01"
        assert rec["_kafka"]["key"] == f"k{n}".encode()
        kafka_headers = dict(rec["_kafka"]["headers"])
        assert kafka_headers["trace"] == f"t{n}".encode()
        assert kafka_headers["semroute-route"] == route.encode()

    kinds = Counter(r["error"]["kind"] for r in dlq)
    assert kinds == Counter(kind for _, kind in BAD_INPUTS)
    for rec in dlq:
        assert rec["error"]["reason"] and rec["error"]["stage"] == "parse"
        i = len(QUERIES) + [k for _, k in BAD_INPUTS].index(rec["error"]["kind"])
        original = values[i]
        if original is None:
            assert rec["value"] is None
        elif "text" in rec["value"]:
            assert rec["value"]["text"].encode() == original
        else:
            assert base64.b64decode(rec["value"]["base64"]) == original
        assert rec["key"] == {"text": f"k{i}"}

    committed = await committed_offsets(kafka_bootstrap, settings.input.group_id, topic)
    ends = Counter(p for p, _ in coords)
    assert committed == {p: ends.get(p, 0) for p in range(3)}


async def test_llm_mode_routes_to_each_endpoint(
    kafka_bootstrap: str, new_topic: Any, tmp_path: Path
) -> None:
    topic = await new_topic(partitions=2)
    with (
        LLMStub(name="billing") as billing,
        LLMStub(name="support") as support,
        LLMStub(name="general") as general,
    ):
        settings = make_settings(
            tmp_path,
            kafka_bootstrap,
            topic,
            endpoints={"billing": billing.url, "support": support.url, "general": general.url},
        )
        await produce(
            kafka_bootstrap, topic, [query_message(t, f"q{i}") for i, (t, _) in enumerate(QUERIES)]
        )
        stats = await run_service(settings, idle_timeout_s=2.0, handle_signals=False)
        ok = await read_topic(kafka_bootstrap, f"{topic}.out", expect=len(QUERIES))
        assert stats.outcomes == len(QUERIES) and stats.dead_letters == 0
        assert len(ok) == len(QUERIES)
        expected_ep = {"billing": "billing", "tech": "support", "shipping": "support"}
        for rec in ok:
            text = rec["input"]["text"]
            route = rec["route"]
            endpoint = expected_ep.get(route, "general")
            assert rec["endpoint"] == endpoint
            content = rec["response"]["content"]
            assert content.startswith(f"[{endpoint}]") and content.endswith("echo: " + text)
            if route == "billing":
                assert "[system: You are the billing desk.]" in content
            assert rec["llm_model"] == (
                "shipping-model" if route == "shipping" else f"{endpoint}-model"
            )
            assert rec["response"]["finish_reason"] == "stop"
            assert rec["response"]["usage"]["total_tokens"] > 0
            assert rec["timings_ms"]["llm"] > 0
        assert billing.success_count == sum(r["route"] == "billing" for r in ok)
        assert general.success_count == sum(r["is_fallback"] for r in ok)


async def test_llm_5xx_retried_and_4xx_dead_lettered(
    kafka_bootstrap: str, new_topic: Any, tmp_path: Path
) -> None:
    topic = await new_topic(partitions=1)
    with LLMStub(name="flaky") as flaky, LLMStub(name="broken") as broken:
        flaky.fail_next(2, status=503)
        broken.fail_always(status=400, message="bad request: unknown model")
        settings = make_settings(
            tmp_path,
            kafka_bootstrap,
            topic,
            endpoints={"billing": flaky.url, "support": broken.url, "general": flaky.url},
        )
        texts = [QUERIES[0][0], QUERIES[2][0]]  # billing → flaky, tech → broken
        await produce(
            kafka_bootstrap, topic, [query_message(t, f"q{i}") for i, t in enumerate(texts)]
        )
        await run_service(settings, idle_timeout_s=2.0, handle_signals=False)
        ok = await read_topic(kafka_bootstrap, f"{topic}.out", expect=1)
        dlq = await read_topic(kafka_bootstrap, f"{topic}.dlq", expect=1)
        assert [r["id"] for r in ok] == ["q0"]
        assert ok[0]["response"]["attempts"] == 3
        assert [r["id"] for r in dlq] == ["q1"]
        err = dlq[0]["error"]
        assert err["kind"] == "llm_rejected" and err["stage"] == "llm"
        assert "400" in err["reason"]
        assert dlq[0]["route"] == "tech" and dlq[0]["decision"]["route"] == "tech"
        assert broken.request_count == 1  # a 4xx is never retried


async def test_backpressure_pauses_and_resumes(
    kafka_bootstrap: str, new_topic: Any, tmp_path: Path
) -> None:
    topic = await new_topic(partitions=2)
    n = 60
    with LLMStub(latency=0.2) as stub:
        settings = make_settings(
            tmp_path,
            kafka_bootstrap,
            topic,
            endpoints={"billing": stub.url, "support": stub.url, "general": stub.url},
            flow={"max_in_flight": 8},
        )
        texts = [QUERIES[i % len(QUERIES)][0] for i in range(n)]
        await produce(
            kafka_bootstrap, topic, [query_message(t, f"q{i}") for i, t in enumerate(texts)]
        )
        stats = await run_service(settings, idle_timeout_s=2.0, handle_signals=False)
        ok = await read_topic(kafka_bootstrap, f"{topic}.out", expect=n)
        assert stats.pauses >= 1
        assert stub.max_in_flight <= 8
        assert len(ok) == n and set(outcome_counts(ok).values()) == {1}


async def test_max_messages_bounds_the_run_and_restart_resumes(
    kafka_bootstrap: str, new_topic: Any, tmp_path: Path
) -> None:
    topic = await new_topic(partitions=1)
    await produce(
        kafka_bootstrap, topic, [query_message(t, f"q{i}") for i, (t, _) in enumerate(QUERIES)]
    )
    settings = make_settings(tmp_path, kafka_bootstrap, topic, mode="route_only")
    first = await run_service(settings, max_messages=3, handle_signals=False)
    assert first.consumed == 3
    assert await committed_offsets(kafka_bootstrap, settings.input.group_id, topic) == {0: 3}
    second = await run_service(settings, idle_timeout_s=1.5, handle_signals=False)
    assert second.consumed == len(QUERIES) - 3
    ok = await read_topic(kafka_bootstrap, f"{topic}.out", expect=len(QUERIES))
    assert sorted(r["id"] for r in ok) == sorted(f"q{i}" for i in range(len(QUERIES)))


@pytest.mark.parametrize("delivery", ["at_least_once", "exactly_once"])
async def test_second_instance_splits_partitions_without_loss_or_duplicates(
    kafka_bootstrap: str, new_topic: Any, tmp_path: Path, delivery: str
) -> None:
    topic = await new_topic(partitions=4)
    n_first, n_second = 80, 80
    with LLMStub(latency=0.05) as stub:
        settings = make_settings(
            tmp_path,
            kafka_bootstrap,
            topic,
            endpoints={"billing": stub.url, "support": stub.url, "general": stub.url},
            input={"session_timeout_ms": 10_000},
            delivery=delivery,
        )
        texts = [QUERIES[i % len(QUERIES)][0] for i in range(n_first + n_second)]
        msgs = [query_message(t, f"q{i}") for i, t in enumerate(texts)]
        keys: list[bytes | None] = [f"k{i}".encode() for i in range(len(msgs))]
        await produce(kafka_bootstrap, topic, msgs[:n_first], keys=keys[:n_first])
        a = asyncio.create_task(run_service(settings, idle_timeout_s=12.0, handle_signals=False))
        await asyncio.sleep(3.0)  # A owns every partition and is working
        b = asyncio.create_task(run_service(settings, idle_timeout_s=12.0, handle_signals=False))
        # B's start-up (encoder load) takes a variable time: produce once it owns partitions.
        await wait_for_group(kafka_bootstrap, settings.input.group_id, members=2)
        await produce(kafka_bootstrap, topic, msgs[n_first:], keys=keys[n_first:])
        stats_a, stats_b = await asyncio.gather(a, b)
        ok = await read_topic(kafka_bootstrap, f"{topic}.out", expect=len(msgs))
        counts = outcome_counts(ok)
        assert len(counts) == len(msgs)  # nothing lost
        assert set(counts.values()) == {1}  # a clean hand-over processes nothing twice
        assert stats_a.outcomes > 0 and stats_b.outcomes > 0  # both did work
        assert stats_a.outcomes + stats_b.outcomes == len(msgs)


def _run_cli(config: Path, *extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "semroute_stream", "run", "--config", str(config), *extra],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


async def test_sigterm_mid_stream_then_restart_loses_nothing(
    kafka_bootstrap: str, new_topic: Any, tmp_path: Path
) -> None:
    topic = await new_topic(partitions=2)
    n = 300
    with LLMStub(latency=0.1) as stub:
        settings = make_settings(
            tmp_path,
            kafka_bootstrap,
            topic,
            endpoints={"billing": stub.url, "support": stub.url, "general": stub.url},
            flow={"max_in_flight": 32},
        )
        config = settings_yaml(settings, tmp_path / "service.yaml")
        texts = [QUERIES[i % len(QUERIES)][0] for i in range(n)]
        await produce(
            kafka_bootstrap, topic, [query_message(t, f"q{i}") for i, t in enumerate(texts)]
        )
        proc = _run_cli(config, "--idle-timeout", "30")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 90
        while stub.success_count < 40 and loop.time() < deadline:  # mid-stream, calls in flight
            await asyncio.sleep(0.05)
        assert stub.success_count >= 40, proc.stdout.read().decode() if proc.stdout else ""
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.to_thread(proc.communicate, timeout=60)
        assert proc.returncode == 0, out.decode()
        first_outcomes = len(await read_topic(kafka_bootstrap, f"{topic}.out", expect=n, timeout=5))
        assert 0 < first_outcomes < n  # it really stopped mid-stream

        proc2 = _run_cli(config, "--idle-timeout", "3")
        out2, _ = await asyncio.to_thread(proc2.communicate, timeout=180)
        assert proc2.returncode == 0, out2.decode()
        ok = await read_topic(kafka_bootstrap, f"{topic}.out", expect=n)
        counts = outcome_counts(ok)
        assert len(counts) == n  # nothing lost
        assert set(counts.values()) == {1}  # the graceful stop drained and committed


async def test_per_route_topics_and_plain_text_input(
    kafka_bootstrap: str, new_topic: Any, tmp_path: Path
) -> None:
    topic = await new_topic(partitions=1)
    texts = [QUERIES[0][0], QUERIES[2][0], QUERIES[6][0]]  # billing, tech, fallback
    await produce(kafka_bootstrap, topic, [t.encode() for t in texts])
    settings = make_settings(
        tmp_path,
        kafka_bootstrap,
        topic,
        mode="route_only",
        input={"format": "text"},
        output={"per_route_topics": True},
    )
    stats = await run_service(settings, idle_timeout_s=2.0, handle_signals=False)
    assert stats.outcomes == 3
    for text, route in zip(texts, ["billing", "tech", "fallback"], strict=True):
        (rec,) = await read_topic(kafka_bootstrap, f"{topic}.out.{route}", expect=1)
        assert rec["route"] == route
        assert rec["input"] == text and rec["id"] is None
