"""Hostile inputs, a misconfigured endpoint, a zombie owner and late topics, with real router
processes on a real broker (run with the fault suite: ``-m faults``). Figures go to
``out/faults.jsonl`` like the other scenarios'."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from fault_harness import (
    N,
    Result,
    Router,
    config_for,
    end_offsets,
    message,
    read_all,
    tally,
    texts,
    wait_for_outcomes,
)
from llm_stub import LLMStub
from ops_helpers import http_get
from service_helpers import ROUTES, make_settings, produce, settings_yaml
from test_faults import DELIVERY, PARTITIONS, _port_below_ephemeral_range, _send_all

pytestmark = [pytest.mark.kafka, pytest.mark.faults]


async def _readyz_until(port: int, text: str, timeout: float) -> tuple[int, str]:
    """Poll ``/readyz`` until its answer holds ``text`` (or the timeout); the last answer."""
    status, why = 0, ""
    deadline = time.monotonic() + timeout
    while text not in why and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        with contextlib.suppress(OSError):  # the server is not up yet
            status, why = await http_get(port, "/readyz")
    return status, why


async def _wait_for_log(router: Router, text: str, timeout: float) -> None:
    """Until ``text`` is anywhere in the router's log (not only its last lines)."""
    deadline = time.monotonic() + timeout
    while text not in router.log.read_text(errors="replace"):
        assert time.monotonic() < deadline, router.output()
        await asyncio.sleep(0.2)


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
        status, why = await _readyz_until(port, "misconfigured", timeout=120)
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
    result.notes["exit_after_fix_s"] = round(time.monotonic() - t0, 1)  # idle timeout 8 s
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
        heir = Router(config, "--idle-timeout", "45", log=tmp_path / "heir.log")
        await _wait_for_log(heir, "partitions assigned", timeout=120)
        await asyncio.sleep(2)
        zombie.signal(signal.SIGSTOP)  # a GC pause, a VM freeze: the group moves on
        await _wait_for_log(heir, "partitions revoked", timeout=90)  # the rebalance
        await asyncio.sleep(15)
        zombie.signal(signal.SIGCONT)  # it wakes with work it believes is its own
        await wait_for_outcomes(kafka_bootstrap, topic, N, timeout=240)
        await asyncio.sleep(5)  # what the zombie might still write, it writes now
        heir.signal(signal.SIGTERM)
        zombie.signal(signal.SIGTERM)
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


async def test_one_endpoint_down_for_60s_while_the_other_routes_keep_flowing(
    kafka_bootstrap: str, new_topic: Any, tmp_path: Path
) -> None:
    topic = await new_topic(partitions=PARTITIONS)
    n, outage_s = 800, 60.0
    with LLMStub(latency=0.01) as ok, LLMStub(latency=0.01, name="billing") as down:
        down.fail_always(status=503)
        settings = make_settings(
            tmp_path,
            kafka_bootstrap,
            topic,
            mode="llm",
            endpoints={"billing": down.url, "support": ok.url, "general": ok.url},
            flow={"park_after_s": 5},
        )
        config = settings_yaml(settings, tmp_path / "service.yaml")
        ids = await _send_all(kafka_bootstrap, topic, n)
        # idle 45 s: retry rounds come at most 30 s apart, so it stays up through the outage
        router = Router(config, "--idle-timeout", "45", log=tmp_path / "r.log")
        t0 = time.monotonic()
        await asyncio.sleep(outage_s)
        during = await read_all(kafka_bootstrap, f"{topic}.out")
        parked = sum((await end_offsets(kafka_bootstrap, f"{topic}.retry.billing")).values())
        down.clear()  # the endpoint is back
        back = time.monotonic()
        assert await router.wait() == 0, router.output()
    result = await tally(
        kafka_bootstrap, topic, Result("one endpoint down 60 s (parking)", "at_least_once", n), ids
    )
    others = [r for r in during if r["route"] != "billing"]
    billing_sent = sum(1 for i in range(n) if i % 8 in (0, 1))  # QUERIES[0:2] are billing's
    billing_n = sum(
        1 for r in await read_all(kafka_bootstrap, f"{topic}.out") if r["route"] == "billing"
    )
    result.recovery_s = round(time.monotonic() - back - 45, 1)
    result.notes.update(
        outage_s=outage_s,
        other_routes_answered_during_outage=len(others),
        other_routes_sent=n - billing_sent,
        billing_answered_during_outage=len(during) - len(others),
        parked_records=parked,
        first_outcome_s=round(back - t0, 1),
    )
    result.save()
    # The outage's first calls (breaker threshold - 1) run out of retries before the breaker
    # opens: those are dead-lettered, as documented; every later one is parked.
    assert result.lost == 0 and result.duplicates == 0, result
    assert result.dead_letters <= 4 and result.ok + result.dead_letters == n, result
    assert set(result.notes["dlq_kinds"]) <= {"llm_retries_exhausted"}, result
    assert len(others) == n - billing_sent, result  # every other route answered meanwhile
    assert len(during) - len(others) == 0 and parked >= billing_n, result
    assert billing_n + result.dead_letters == billing_sent, result


# libfaketime preloaded into the router itself (not the faketime launcher, which would stand
# between the test's signals and the router): its clock reads two hours ahead.
_LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"
_CLOCK_2H_AHEAD = {"LD_PRELOAD": _LIBFAKETIME, "FAKETIME": "+2h", "DONT_FAKE_MONOTONIC": "1"}


@pytest.mark.parametrize("timestamps", ["input", "now"])
async def test_a_router_clock_two_hours_ahead_of_the_broker(
    kafka_bootstrap: str, new_topic: Any, tmp_path: Path, timestamps: str
) -> None:
    """Kafka 4 refuses records stamped more than ``log.message.timestamp.after.max.ms`` (1 h)
    ahead of the broker. Debian's libfaketime (``make system-deps``) moves the router's clock."""
    topic = await new_topic(partitions=PARTITIONS)
    n = 200
    ids = await _send_all(kafka_bootstrap, topic, n)
    port = _port_below_ephemeral_range()
    config = config_for(
        tmp_path,
        kafka_bootstrap,
        topic,
        mode="route_only",
        llm_url=None,
        output={"timestamps": timestamps},
        observability={"metrics_port": port},
    )
    skewed = Router(config, "--idle-timeout", "6", log=tmp_path / "skewed.log", env=_CLOCK_2H_AHEAD)
    why = ""
    if timestamps == "input":  # immune: outcomes carry their input's timestamp
        assert await skewed.wait() == 0, skewed.output()
    else:  # refused: a visible platform failure, nothing lost, nothing committed past it
        status, why = await _readyz_until(port, "platform failure", timeout=90)
        assert status == 503 and "platform failure" in why and "InvalidTimestamp" in why, (
            skewed.output()
        )
        skewed.signal(signal.SIGTERM)
        assert await skewed.wait() == 0, skewed.output()
        fixed = Router(config, "--idle-timeout", "6", log=tmp_path / "fixed.log")  # clock fixed
        assert await fixed.wait() == 0, fixed.output()
    result = await tally(
        kafka_bootstrap,
        topic,
        Result(f"router clock +2 h (timestamps: {timestamps})", "at_least_once", n),
        ids,
    )
    result.notes["readyz_while_refused"] = why.strip()[:160]
    result.save()
    assert result.lost == 0 and result.ok == n and result.dead_letters == 0, result
    assert result.duplicates == 0, result
