"""Fault injection on a real broker with real router processes (run alone: ``-m faults``).

Every scenario sends N known messages (``SEMROUTE_FAULT_N``, default 2000), injects a fault,
lets the system recover, reads back every outcome and dead-letter record and checks that each
input has an outcome (none lost); duplicates are counted and, where the scenario allows no
duplicate, asserted to be zero. Figures go to ``out/faults.jsonl``.
"""

from __future__ import annotations

import asyncio
import random
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from fault_harness import (
    N,
    Result,
    Router,
    config_for,
    message,
    tally,
    texts,
    wait_for_outcomes,
)
from llm_stub import LLMStub
from service_helpers import BAD_INPUTS, committed_offsets, produce

pytestmark = [pytest.mark.kafka, pytest.mark.faults]

PARTITIONS = 4


async def _send_all(bootstrap: str, topic: str, n: int = N) -> set[str]:
    await produce(bootstrap, topic, [message(i, t) for i, t in enumerate(texts(n))])
    return {f"m{i}" for i in range(n)}


def _port_below_ephemeral_range() -> int:
    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(20000, 30000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-30000")


def _retry_delays(stub: LLMStub) -> list[float]:
    """Seconds between each 429 and the next request carrying the same idempotency key."""
    reqs = stub.requests
    delays = []
    for i, failed in enumerate(reqs[: stub.failure_count]):
        key = failed.headers.get("idempotency-key")
        later = [r for r in reqs[i + 1 :] if r.headers.get("idempotency-key") == key]
        if later:
            delays.append(later[0].received_at - failed.received_at)
    return delays


async def _wait_for_log(router: Router, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in router.output():
        assert time.monotonic() < deadline, router.output()
        await asyncio.sleep(0.2)


DELIVERY = pytest.mark.parametrize("delivery", ["at_least_once", "exactly_once"])


@DELIVERY
async def test_kill_9_mid_stream_then_restart(
    kafka_bootstrap: str, new_topic: Any, tmp_path: Path, delivery: str
) -> None:
    topic = await new_topic(partitions=PARTITIONS)
    ids = await _send_all(kafka_bootstrap, topic)
    config = config_for(
        tmp_path, kafka_bootstrap, topic, mode="route_only", llm_url=None, delivery=delivery
    )
    first = Router(config, "--idle-timeout", "60", log=tmp_path / "r1.log")
    await wait_for_outcomes(kafka_bootstrap, topic, N // 3, timeout=180)
    first.signal(signal.SIGKILL)
    assert await first.wait() == -signal.SIGKILL
    t0 = time.monotonic()
    second = Router(config, "--idle-timeout", "4", log=tmp_path / "r2.log")
    assert await second.wait() == 0, second.output()
    result = await tally(kafka_bootstrap, topic, Result("kill -9 + restart", delivery, N), ids)
    result.recovery_s = round(time.monotonic() - t0 - 4, 1)
    result.save()
    assert result.lost == 0, result
    assert result.ok - result.duplicates == N, result
    if delivery == "exactly_once":
        assert result.duplicates == 0, result
    else:  # what ran after the last commit is redone, bounded by the in-flight window
        assert result.duplicates <= 512 + 64, result


async def test_sigterm_with_llm_calls_in_flight_then_restart(
    kafka_bootstrap: str, new_topic: Any, tmp_path: Path
) -> None:
    topic = await new_topic(partitions=PARTITIONS)
    ids = await _send_all(kafka_bootstrap, topic)
    with LLMStub(latency=0.05) as stub:
        config = config_for(
            tmp_path,
            kafka_bootstrap,
            topic,
            mode="llm",
            llm_url=stub.url,
            flow={"max_in_flight": 64},
        )
        first = Router(config, "--idle-timeout", "60", log=tmp_path / "r1.log")
        await wait_for_outcomes(kafka_bootstrap, topic, N // 3, timeout=180)
        in_flight = stub.in_flight
        first.signal(signal.SIGTERM)
        assert await first.wait() == 0, first.output()
        t0 = time.monotonic()
        second = Router(config, "--idle-timeout", "4", log=tmp_path / "r2.log")
        assert await second.wait() == 0, second.output()
    result = await tally(
        kafka_bootstrap, topic, Result("SIGTERM + restart", "at_least_once", N), ids
    )
    result.recovery_s = round(time.monotonic() - t0 - 4, 1)
    result.notes["llm_in_flight_at_signal"] = in_flight
    result.save()
    assert result.lost == 0 and result.ok == N, result
    assert result.duplicates == 0, result  # a graceful stop drains and commits


@DELIVERY
async def test_broker_restart_mid_stream(
    kafka_bootstrap: str, new_topic: Any, local_kafka: Any, tmp_path: Path, delivery: str
) -> None:
    topic = await new_topic(partitions=PARTITIONS)
    ids = await _send_all(kafka_bootstrap, topic)
    config = config_for(
        tmp_path, kafka_bootstrap, topic, mode="route_only", llm_url=None, delivery=delivery
    )
    router = Router(config, "--idle-timeout", "20", log=tmp_path / "r.log")
    await wait_for_outcomes(kafka_bootstrap, topic, N // 4, timeout=180)
    local_kafka.stop(keep_data=True)
    await asyncio.sleep(5)
    t0 = time.monotonic()
    await asyncio.to_thread(local_kafka.start)
    done = await wait_for_outcomes(kafka_bootstrap, topic, N, timeout=240)
    recovery = time.monotonic() - t0
    assert await router.wait() == 0, router.output()
    result = await tally(kafka_bootstrap, topic, Result("broker restart", delivery, N), ids)
    result.recovery_s = round(recovery, 1)
    result.notes["outcomes_when_done"] = done
    result.save()
    assert result.lost == 0 and result.ok == N, result
    if delivery == "exactly_once":
        assert result.duplicates == 0, result


async def test_llm_endpoint_down_then_back_and_429_retry_after(
    kafka_bootstrap: str, new_topic: Any, tmp_path: Path
) -> None:
    topic = await new_topic(partitions=PARTITIONS)
    n = min(N, 1000)
    ids = await _send_all(kafka_bootstrap, topic, n)
    # A fixed port below the ephemeral range: while the stub is down, the router reconnecting
    # to an ephemeral port could connect to itself and keep the stub from binding it again.
    with LLMStub(port=_port_below_ephemeral_range()) as stub:
        stub.fail_next(2, status=429, retry_after=0.5)
        config = config_for(tmp_path, kafka_bootstrap, topic, mode="llm", llm_url=stub.url)
        router = Router(config, "--idle-timeout", "15", log=tmp_path / "r.log")
        await wait_for_outcomes(kafka_bootstrap, topic, n // 4, timeout=180)
        throttled = _retry_delays(stub)
        stub.stop()  # connection refused from now on
        await asyncio.sleep(6)
        t0 = time.monotonic()
        stub.start()
        await wait_for_outcomes(kafka_bootstrap, topic, n, timeout=240)
        recovery = time.monotonic() - t0
        assert await router.wait() == 0, router.output()
    result = await tally(
        kafka_bootstrap, topic, Result("LLM down 6s + 429 Retry-After", "at_least_once", n), ids
    )
    result.recovery_s = round(recovery, 1)
    result.save()
    assert result.lost == 0, result
    # Calls that ran out of retries before a breaker opened are dead-lettered: at most
    # threshold - 1 = 4 per endpoint (3 endpoints here); once open, calls wait instead.
    assert result.dead_letters <= 3 * 4, result
    assert {k for k in result.notes["dlq_kinds"]} <= {"llm_retries_exhausted"}
    assert result.duplicates == 0, result
    assert len(throttled) == 2 and all(d >= 0.45 for d in throttled), throttled


async def test_llm_slower_than_max_poll_interval(
    kafka_bootstrap: str, new_topic: Any, tmp_path: Path
) -> None:
    topic = await new_topic(partitions=2)
    n = 60
    ids = await _send_all(kafka_bootstrap, topic, n)
    with LLMStub(latency=2.5) as stub:
        config = config_for(
            tmp_path,
            kafka_bootstrap,
            topic,
            mode="llm",
            llm_url=stub.url,
            input={"max_poll_interval_ms": 1500, "session_timeout_ms": 6000},
        )
        router = Router(config, "--idle-timeout", "6", log=tmp_path / "r.log")
        assert await router.wait() == 0, router.output()
    result = await tally(
        kafka_bootstrap, topic, Result("LLM slower than max.poll.interval", "at_least_once", n), ids
    )
    log = router.output()
    result.notes["rejoins"] = log.count("(Re-)joining group")
    result.save()
    assert result.lost == 0 and result.ok == n, result
    assert result.duplicates == 0, result  # no endless redelivery loop
    assert log.count("(Re-)joining group") <= 1, log  # no rebalance storm


@DELIVERY
async def test_second_instance_joins_then_one_leaves(
    kafka_bootstrap: str, new_topic: Any, tmp_path: Path, delivery: str
) -> None:
    topic = await new_topic(partitions=PARTITIONS)
    ids = await _send_all(kafka_bootstrap, topic)
    with LLMStub(latency=0.02) as stub:
        config = config_for(
            tmp_path, kafka_bootstrap, topic, mode="llm", llm_url=stub.url, delivery=delivery
        )
        a = Router(config, "--idle-timeout", "30", log=tmp_path / "a.log")
        await wait_for_outcomes(kafka_bootstrap, topic, N // 5, timeout=180)
        b = Router(config, "--idle-timeout", "15", log=tmp_path / "b.log")
        await _wait_for_log(b, "partitions assigned", timeout=120)
        await wait_for_outcomes(kafka_bootstrap, topic, N // 3, timeout=180)
        a.signal(signal.SIGTERM)  # one leaves: B takes over its partitions
        assert await a.wait() == 0, a.output()
        assert await b.wait() == 0, b.output()
        assert "partitions assigned" in a.log.read_text()
    result = await tally(
        kafka_bootstrap, topic, Result("rebalance: join then leave", delivery, N), ids
    )
    result.save()
    assert result.lost == 0 and result.ok == N, result
    assert result.duplicates == 0, result  # clean hand-overs drain and commit first


async def test_poison_input_mixed_into_the_stream(
    kafka_bootstrap: str, new_topic: Any, tmp_path: Path
) -> None:
    topic = await new_topic(partitions=PARTITIONS)
    rng = random.Random(1234)
    good = texts(N)
    values: list[bytes | None] = []
    kinds: list[str | None] = []
    for i, text in enumerate(good):
        values.append(message(i, text))
        kinds.append(None)
        if i % 10 == 0:  # a poison message after every tenth good one
            bad, kind = BAD_INPUTS[(i // 10) % len(BAD_INPUTS)]
            if (i // 10) % 3 == 0:
                bad, kind = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))), "random"
            values.append(bad)
            kinds.append(kind)
    keys: list[bytes | None] = [f"k{i}".encode() for i in range(len(values))]
    coords = await produce(kafka_bootstrap, topic, values, keys=keys)
    bad_keys = {f"{topic}/{p}/{o}" for (p, o), k in zip(coords, kinds, strict=True) if k}
    config = config_for(tmp_path, kafka_bootstrap, topic, mode="route_only", llm_url=None)
    router = Router(config, "--idle-timeout", "4", log=tmp_path / "r.log")
    assert await router.wait() == 0, router.output()
    result = await tally(
        kafka_bootstrap,
        topic,
        Result("poison input", "at_least_once", len(values)),
        {f"m{i}" for i in range(N)},
        bad_keys=bad_keys,
    )
    result.save()
    assert result.lost == 0, result
    assert result.ok == N and result.dead_letters == len(bad_keys), result
    assert result.duplicates == 0
    assert result.notes["unexpected"] == 0


async def test_config_error_at_start_up_commits_nothing(
    kafka_bootstrap: str, new_topic: Any, tmp_path: Path
) -> None:
    topic = await new_topic(partitions=1)
    await _send_all(kafka_bootstrap, topic, 10)
    config = config_for(tmp_path, kafka_bootstrap, topic, mode="route_only", llm_url=None)
    (tmp_path / "routes.yaml").write_text("routes:\n  - {name: a, utterances: []}\n")
    router = Router(config, "--idle-timeout", "2", log=tmp_path / "r.log")
    assert await router.wait(timeout=60) == 2
    out = router.output()
    assert "routes.yaml" in out and "utterances" in out and "Traceback" not in out
    group = f"g-{topic}"
    assert await committed_offsets(kafka_bootstrap, group, topic) == {0: -1}
    Result("routes error at start-up", "at_least_once", 10, notes={"exit_code": 2}).save()
