"""Learning's faults with real router processes on a real broker (run with the fault suite:
``-m faults``): corrections too large for the dead-letter topic, and a router SIGKILLed in
the middle of a retrain. Figures go to ``out/faults.jsonl`` like the other scenarios'."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from fault_harness import Result, Router, config_for, end_offsets, read_all
from ops_helpers import http_get
from service_helpers import committed_offsets, produce, write_routes
from test_faults import _port_below_ephemeral_range
from test_faults_hostile import _wait_for_log

pytestmark = [pytest.mark.kafka, pytest.mark.faults]

LEARNING = {"enabled": True, "retrain_debounce_s": 0.1, "retrain_min_interval_s": 0}
LABELS = ["billing", "tech", "shipping", None]

#: (what, value, key): each used to make a dead letter over the broker's 1 MB record limit
HOSTILE: list[tuple[str, bytes, bytes | None]] = [
    (
        "450 KB text of backslashes",
        orjson.dumps({"id": "h1", "text": "\\" * 450_000, "label": "billing"}),
        None,
    ),
    ("200 KB of 0x01 bytes", bytes([1]) * 200_000, None),
    ("600 KB key", orjson.dumps({"id": "h3", "text": "hi", "label": None}), b"k" * 600_000),
]


def _correction(i: int) -> bytes:
    text = f"question {i} about my gym membership and its yearly fee"
    return orjson.dumps({"id": f"c{i}", "text": text, "label": LABELS[i % 4]})


async def _committed_within(
    bootstrap: str, group: str, topic: str, end: dict[int, int], timeout: float
) -> dict[int, int]:
    """The group's committed offsets once they reach ``end`` (after ``timeout``: as they are)."""
    deadline = time.monotonic() + timeout
    while True:
        committed = await committed_offsets(bootstrap, group, topic)
        if committed == end or time.monotonic() > deadline:
            return committed
        await asyncio.sleep(0.5)


async def test_corrections_too_large_for_the_dlq_are_dead_lettered_and_learning_goes_on(
    kafka_bootstrap: str, new_topic: Any, tmp_path: Path
) -> None:
    topic = await new_topic(partitions=1)
    port = _port_below_ephemeral_range()
    config = config_for(
        tmp_path,
        kafka_bootstrap,
        topic,
        mode="route_only",
        llm_url=None,
        learning=LEARNING,
        observability={"metrics_port": port},
    )
    router = Router(config, log=tmp_path / "r.log")
    await _wait_for_log(router, "starting:", timeout=120)
    good = [_correction(i) for i in range(40)]
    values = [*good[:20], *(v for _, v, _ in HOSTILE), *good[20:]]
    keys = [None] * 20 + [k for *_, k in HOSTILE] + [None] * 20
    corrections = f"{topic}.corrections"
    coords = await produce(kafka_bootstrap, corrections, values, keys=keys)
    hostile_at = {f"{corrections}/{p}/{o}" for p, o in coords[20:23]}
    end = await end_offsets(kafka_bootstrap, corrections)
    group = f"g-{topic}.corrections"
    committed = await _committed_within(kafka_bootstrap, group, corrections, end, timeout=60)
    status, why = await http_get(port, "/readyz")
    router.signal(signal.SIGTERM)
    code = await router.wait()
    lag = sum(e - max(0, committed.get(p, 0)) for p, e in end.items())
    dlq = await read_all(kafka_bootstrap, f"{topic}.dlq")
    overlay = await read_all(kafka_bootstrap, f"{topic}.overlay")
    per_input = Counter([r["idempotency_key"] for r in dlq] + [e["source"] for e in overlay])
    expected = {f"{corrections}/{p}/{o}" for p, o in coords}
    result = Result(
        "corrections too large for the DLQ (learning)",
        "at_least_once",
        len(values),
        outcomes=len(dlq) + len(overlay),
        ok=len(overlay),
        dead_letters=len(dlq),
        lost=len(expected - set(per_input)),
        duplicates=sum(c - 1 for c in per_input.values() if c > 1),
    )
    result.notes.update(
        hostile=[what for what, *_ in HOSTILE],
        corrections_lag_at_end=lag,
        exit_code=code,
        readyz=f"{status} {why.strip()}",
        dlq_kinds=dict(Counter(r["error"]["kind"] for r in dlq)),
    )
    result.save()
    out = router.output()
    assert lag == 0, (result, out)
    assert code == 0 and "Traceback" not in out, out
    assert orjson.loads(out.strip().splitlines()[-1])["stopped_by"], out  # the summary line
    assert status == 200, why
    assert {r["idempotency_key"] for r in dlq} == hostile_at, result
    assert result.lost == 0 and result.duplicates == 0 and result.ok == len(good), result
    assert set(result.notes["dlq_kinds"]) == {"oversized", "oversized_key"}, result
    for letter in dlq:  # bounded like the main DLQ's: the copy that did not fit is cut
        kind = letter["error"]["kind"]
        cut = letter["key"] if kind == "oversized_key" else letter["value"]
        assert cut["cut"] is True and cut["bytes"] > 190_000, letter["error"]


# ---- SIGKILL mid-retrain ----------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """``/proc/PID/stat``'s fields after the command name (None: no such process)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw.rpartition(")")[2].split()


def _descendants(root: int) -> dict[int, str]:
    """Every process below ``root`` (children, their children...), with its command line."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(int(entry))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found: dict[int, str] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        with contextlib.suppress(OSError):
            found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        todo += children.get(pid, [])
    return found


def _alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"  # a zombie has died (its parent reaps it)


def _cpu_s(pid: int) -> float:
    fields = _stat(pid)
    return 0.0 if fields is None else (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _until(cond: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.2)
    return True


async def test_sigkill_mid_retrain_leaves_no_process_behind(
    kafka_bootstrap: str, new_topic: Any, tmp_path: Path
) -> None:
    topic = await new_topic(partitions=1)
    config = config_for(
        tmp_path, kafka_bootstrap, topic, mode="route_only", llm_url=None, learning=LEARNING
    )
    write_routes(tmp_path, method="head")  # the retrain trains a head: in the training process
    router = Router(config, log=tmp_path / "r.log")
    await _wait_for_log(router, "starting:", timeout=120)
    below = _descendants(router.proc.pid)
    trainer = [p for p, cmd in below.items() if "spawn_main" in cmd]
    tracker = [p for p, cmd in below.items() if "resource_tracker" in cmd]
    assert len(trainer) == 1 and len(tracker) == 1, below
    idle_cpu = _cpu_s(trainer[0])
    values = [_correction(i) for i in range(300)]
    await produce(kafka_bootstrap, f"{topic}.corrections", values)
    # mid-retrain: the training process is computing (its CPU time grows)
    training = await _until(lambda: _cpu_s(trainer[0]) > idle_cpu + 0.5, timeout=120)
    assert training, router.output()
    t0 = time.monotonic()
    router.signal(signal.SIGKILL)
    assert await router.wait() == -signal.SIGKILL
    await _until(lambda: not any(_alive(p) for p in below), timeout=30)
    survivors = {p: cmd for p, cmd in below.items() if _alive(p)}
    gone_s = round(time.monotonic() - t0, 1)
    for pid in survivors:  # the test's own orphans: never left running
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    result = Result("SIGKILL mid-retrain (learning)", "at_least_once", len(values))
    result.recovery_s = None if survivors else gone_s
    result.notes.update(
        descendants=len(below),
        survivors=len(survivors),
        trainer_cpu_s_at_kill=round(_cpu_s(trainer[0]), 1) if survivors else None,
    )
    result.save()
    assert not survivors, survivors
