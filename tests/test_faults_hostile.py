"""Hostile inputs, a misconfigured endpoint, a zombie owner and late topics, with real router
processes on a real broker (run with the fault suite: ``-m faults``). Figures go to
``out/faults.jsonl`` like the other scenarios'."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from fault_harness import N, Result, Router, config_for, message, tally, texts, wait_for_outcomes
from llm_stub import LLMStub
from ops_helpers import http_get
from service_helpers import ROUTES, produce
from test_faults import DELIVERY, PARTITIONS, _port_below_ephemeral_range, _send_all, _wait_for_log

pytestmark = [pytest.mark.kafka, pytest.mark.faults]


def _deep(levels: int) -> bytes:
    return b'{"text": "hi", "x": ' + b"[" * levels + b"]" * levels + b"}"


HOSTILE: list[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]] | None, str]] = [
    # (what, value, key, headers, expected error kind)
    ("deep JSON (618 bytes)", _deep(300), None, None, "too_deep"),
    ("800 KB binary", bytes(range(256)) * 3200, None, None, "oversized"),
    ("200 KB of control bytes", bytes([1, 2, 27]) * 70_000, None, None, "oversized"),
    ("700 KB key", b'{"text": "hi"}', b"k" * 700_000, None, "oversized_key"),
    ("50,000 headers", b'{"text": "hi"}', None, [("h", b"")] * 50_000, "too_many_headers"),
    ("a field 253 deep", _deep(253), None, None, "too_deep"),
]


@DELIVERY
async def test_hostile_records_mixed_into_the_stream(
    kafka_bootstrap: str, new_topic: Any, tmp_path: Path, delivery: str
) -> None:
    topic = await new_topic(partitions=PARTITIONS)
    n = N // 4
    values: list[bytes | None] = [message(i, t) for i, t in enumerate(texts(n))]
    keys: list[bytes | None] = [None] * n
    headers: list[list[tuple[str, bytes]]] = [[] for _ in range(n)]
    for j, (_, value, key, hdrs, _) in enumerate(HOSTILE * 3):
        at = (j + 1) * n // (len(HOSTILE) * 3 + 1) + j
        values.insert(at, value)
        keys.insert(at, key)
        headers.insert(at, hdrs or [])
    coords = await produce(kafka_bootstrap, topic, values, keys=keys, headers=headers)
    hostile_at = {
        f"{topic}/{p}/{o}"
        for (p, o), v in zip(coords, values, strict=True)
        if b'"id"' not in (v or b"")
    }
    config = config_for(
        tmp_path, kafka_bootstrap, topic, mode="route_only", llm_url=None, delivery=delivery
    )
    router = Router(config, "--idle-timeout", "5", log=tmp_path / "r.log")
    assert await router.wait() == 0, router.output()  # no crash, no crash loop
    result = await tally(
        kafka_bootstrap,
        topic,
        Result("hostile records", delivery, len(values)),
        {f"m{i}" for i in range(n)},
        bad_keys=hostile_at,
    )
    result.notes["hostile"] = [what for what, *_ in HOSTILE]
    result.save()
    assert result.lost == 0 and result.duplicates == 0, result
    assert result.ok == n and result.dead_letters == len(hostile_at), result
    expected = {kind for *_, kind in HOSTILE}
    assert set(result.notes["dlq_kinds"]) == expected, result


async def test_a_revoked_api_key_pauses_the_endpoint_instead_of_dead_lettering(
    kafka_bootstrap: str, new_topic: Any, tmp_path: Path
) -> None:
    topic = await new_topic(partitions=PARTITIONS)
    n = 200
    ids = await _send_all(kafka_bootstrap, topic, n)
    port = _port_below_ephemeral_range()
    with LLMStub(latency=0.01) as stub:
        stub.fail_always(status=401)
        config = config_for(
            tmp_path,
            kafka_bootstrap,
            topic,
            mode="llm",
            llm_url=stub.url,
            observability={"metrics_port": port},
        )
        router = Router(config, "--idle-timeout", "8", log=tmp_path / "r.log")
        status, why = 0, ""
        deadline = time.monotonic() + 120
        while "misconfigured" not in why and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            try:
                status, why = await http_get(port, "/readyz")
            except OSError:
                continue
        assert status == 503 and "misconfigured" in why and "401" in why, router.output()
        requests_while_broken = stub.request_count
        await asyncio.sleep(3)
        # paused: a trial call now and then, not the whole stream at full speed
        assert stub.request_count - requests_while_broken < 20
        stub.clear()  # the key is fixed
        t0 = time.monotonic()
        assert await router.wait() == 0, router.output()
    result = await tally(
        kafka_bootstrap, topic, Result("LLM endpoint 401 (revoked key)", "at_least_once", n), ids
    )
    result.recovery_s = round(time.monotonic() - t0 - 8, 1)
    result.notes["readyz_while_broken"] = why.strip()
    result.save()
    assert result.lost == 0 and result.ok == n and result.dead_letters == 0, result


async def test_exactly_once_zombie_paused_then_woken(
    kafka_bootstrap: str, new_topic: Any, tmp_path: Path
) -> None:
    topic = await new_topic(partitions=PARTITIONS)
    ids = await _send_all(kafka_bootstrap, topic)
    with LLMStub(latency=0.02) as stub:
        config = config_for(
            tmp_path,
            kafka_bootstrap,
            topic,
            mode="llm",
            llm_url=stub.url,
            delivery="exactly_once",
        )
        zombie = Router(config, "--idle-timeout", "40", log=tmp_path / "zombie.log")
        await wait_for_outcomes(kafka_bootstrap, topic, N // 5, timeout=180)
        heir = Router(config, "--idle-timeout", "15", log=tmp_path / "heir.log")
        await _wait_for_log(heir, "partitions assigned", timeout=120)
        await asyncio.sleep(2)
        zombie.signal(signal.SIGSTOP)  # a GC pause, a VM freeze: the group moves on
        await _wait_for_log(heir, "partitions revoked", timeout=60)  # the rebalance
        await asyncio.sleep(15)
        zombie.signal(signal.SIGCONT)  # it wakes with work it believes is its own
        assert await heir.wait() == 0, heir.output()
        assert await zombie.wait() == 0, zombie.output()
    result = await tally(
        kafka_bootstrap,
        topic,
        Result("zombie: SIGSTOP the owner, SIGCONT", "exactly_once", N),
        ids,
    )
    result.save()
    assert result.lost == 0 and result.ok == N, result
    assert result.duplicates == 0, result  # read_committed: the zombie's work never shows


async def test_an_invalid_per_route_topic_fails_at_start_up(
    kafka_bootstrap: str, new_topic: Any, tmp_path: Path
) -> None:
    topic = await new_topic(partitions=1)
    config = config_for(
        tmp_path,
        kafka_bootstrap,
        topic,
        mode="route_only",
        llm_url=None,
        output={"per_route_topics": True},
    )
    routes = {**ROUTES, "routes": [{**ROUTES["routes"][0], "name": "billing refunds"}]}
    (tmp_path / "routes.yaml").write_text(orjson.dumps(routes).decode())
    router = Router(config, "--idle-timeout", "2", log=tmp_path / "r.log")
    assert await router.wait(timeout=60) == 2
    out = router.output()
    assert "billing refunds" in out and "topic name" in out and "Traceback" not in out
    Result("invalid per-route topic", "at_least_once", 0, notes={"exit_code": 2}).save()


async def test_an_input_topic_created_after_the_router_started(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = f"late-{time.time_ns()}"
    config = config_for(tmp_path, kafka_bootstrap, topic, mode="route_only", llm_url=None)
    router = Router(config, "--idle-timeout", "30", log=tmp_path / "r.log")
    await _wait_for_log(router, "starting:", timeout=120)
    await asyncio.sleep(3)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:  # (a broker with auto.create.topics.enable may have made it on the router's request)
        await admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
    except Exception as err:
        print(f"create_topics: {err!r}")
    finally:
        await admin.close()
    t0 = time.monotonic()
    ids = await _send_all(kafka_bootstrap, topic, 100)
    seen = await wait_for_outcomes(kafka_bootstrap, topic, 100, timeout=90)
    first_outcomes_s = round(time.monotonic() - t0, 1)
    router.signal(signal.SIGTERM)
    assert await router.wait() == 0, router.output()
    result = await tally(
        kafka_bootstrap, topic, Result("input topic created late", "at_least_once", 100), ids
    )
    result.recovery_s = first_outcomes_s
    result.save()
    assert seen >= 100 and result.lost == 0, result
    assert first_outcomes_s < 40, result  # metadata_max_age_ms (10 s), not aiokafka's 5 min
