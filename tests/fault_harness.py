"""The fault-injection harness: real broker, real router processes, a known set of N messages.

Each scenario produces N messages with ids ``m0..m{N-1}``, runs one or more router processes
(``python -m semroute_stream run``), injects its fault, lets the system recover, then reads back
every outcome and dead-letter record and counts, per input id, how many outcomes it got.
Results are appended to ``out/faults.jsonl`` (docs/delivery.md's table is built from it).
"""

from __future__ import annotations

import asyncio
import atexit
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from service_helpers import QUERIES, make_settings, open_reader, settings_yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "out" / "faults.jsonl"
N = int(os.environ.get("SEMROUTE_FAULT_N", "2000"))


def texts(n: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    return [f"{QUERIES[i % len(QUERIES)][0]} (#{rng.randrange(10**6)})" for i in range(n)]


def message(i: int, text: str) -> bytes:
    return orjson.dumps({"id": f"m{i}", "text": text})


@dataclass
class Result:
    scenario: str
    mode: str
    sent: int
    outcomes: int = 0
    ok: int = 0
    dead_letters: int = 0
    lost: int = 0
    duplicates: int = 0
    recovery_s: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def save(self) -> None:
        RESULTS.parent.mkdir(exist_ok=True)
        with RESULTS.open("ab") as f:
            f.write(orjson.dumps(asdict(self)) + b"\n")


_LIVE: list[subprocess.Popen[bytes]] = []


@atexit.register
def _kill_leftovers() -> None:
    """A failed test must not leave a router running after the session."""
    for proc in _LIVE:
        if proc.poll() is None:
            proc.kill()


class Router:
    """One ``semroute-stream run`` process (killed at exit if a test left it running)."""

    def __init__(
        self, config: Path, *args: str, log: Path, env: dict[str, str] | None = None
    ) -> None:
        self.log = log
        self._out = log.open("ab")
        environ = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "semroute_stream",
                "run",
                "--config",
                str(config),
                *args,
            ],
            cwd=REPO,
            env=environ,
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )
        _LIVE.append(self.proc)

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 300) -> int:
        code = await asyncio.to_thread(self.proc.wait, timeout)
        self._out.close()
        return code

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


async def end_offsets(bootstrap: str, topic: str, *, settle: float = 15.0) -> dict[int, int]:
    """End offsets a read_committed reader can reach, once no transaction is left open.

    A committed transaction's markers are written after the commit returns, so right after a
    router exits the last stable offset can still lag the high watermark for a moment."""
    deadline = time.monotonic() + settle
    while True:
        committed = await _end_offsets(bootstrap, topic, "read_committed")
        if time.monotonic() > deadline:
            return committed
        if committed == await _end_offsets(bootstrap, topic, "read_uncommitted"):
            return committed
        await asyncio.sleep(0.2)


async def _end_offsets(bootstrap: str, topic: str, isolation: str) -> dict[int, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (desc,) = await admin.describe_topics([topic])
        parts = sorted(p["partition"] for p in desc.get("partitions", []))
    finally:
        await admin.close()
    if not parts:
        return {}
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level=isolation)
    await consumer.start()
    try:
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in parts])
        return {tp.partition: off for tp, off in ends.items()}
    finally:
        await consumer.stop()


async def read_all(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    """Every committed record of ``topic`` (read_committed, up to the end offsets seen now)."""
    ends = await end_offsets(bootstrap, topic)
    if not any(ends.values()):
        return []
    tps = [TopicPartition(topic, p) for p, end in ends.items() if end > 0]
    consumer = await open_reader(bootstrap, tps)
    try:
        out: list[dict[str, Any]] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            positions = [await consumer.position(tp) for tp in tps]
            if all(pos >= ends[tp.partition] for pos, tp in zip(positions, tps, strict=True)):
                break
            got = await consumer.getmany(timeout_ms=500)
            out.extend(orjson.loads(r.value) for recs in got.values() for r in recs)
        return out
    finally:
        await consumer.stop()


async def count_outcomes(bootstrap: str, topic: str) -> int:
    """Records in the output topics (markers included: a progress gauge, not a tally)."""
    return sum((await end_offsets(bootstrap, f"{topic}.out", settle=0)).values()) + sum(
        (await end_offsets(bootstrap, f"{topic}.dlq", settle=0)).values()
    )


async def wait_for_outcomes(bootstrap: str, topic: str, n: int, timeout: float) -> int:
    """Poll the output topics' end offsets until ``n`` outcome records exist (or timeout)."""
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline:
        try:
            seen = await count_outcomes(bootstrap, topic)
        except Exception:  # topics not created yet, or the broker is down on purpose
            seen = 0
        if seen >= n:
            return seen
        await asyncio.sleep(0.25)
    return seen


async def tally(
    bootstrap: str, topic: str, result: Result, ids: set[str], *, bad_keys: set[str] | None = None
) -> Result:
    """Fill in outcomes / lost / duplicates from what the output and DLQ topics hold.

    Inputs are matched by ``id`` (good messages) or by source offset key (``bad_keys``, for
    messages that have no readable id)."""
    ok = await read_all(bootstrap, f"{topic}.out")
    dlq = await read_all(bootstrap, f"{topic}.dlq")
    per_input: Counter[str] = Counter()
    for rec in ok + dlq:
        per_input[rec["id"] if rec.get("id") else rec["idempotency_key"]] += 1
    expected = ids | (bad_keys or set())
    result.ok, result.dead_letters = len(ok), len(dlq)
    result.outcomes = len(ok) + len(dlq)
    result.lost = len(expected - set(per_input))
    result.duplicates = sum(c - 1 for k, c in per_input.items() if k in expected and c > 1)
    result.notes["unexpected"] = len(set(per_input) - expected)
    result.notes["dlq_kinds"] = dict(Counter(r["error"]["kind"] for r in dlq))
    return result


def config_for(
    tmp_path: Path,
    bootstrap: str,
    topic: str,
    *,
    mode: str,
    llm_url: str | None,
    delivery: str = "at_least_once",
    **sections: Any,
) -> Path:
    endpoints = {"billing": llm_url, "support": llm_url, "general": llm_url} if llm_url else None
    settings = make_settings(
        tmp_path, bootstrap, topic, mode=mode, endpoints=endpoints, delivery=delivery, **sections
    )
    return settings_yaml(settings, tmp_path / f"service-{mode}-{delivery}.yaml")
