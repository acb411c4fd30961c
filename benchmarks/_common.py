"""Shared pieces of the Kafka benchmarks (``pipeline.py`` and ``soak.py``).

* the broker: ``--bootstrap``, else ``KAFKA_BOOTSTRAP_SERVERS``, else a private LocalKafka
  (``tests/kafka_local.py``) in a temporary state dir on a free port, stopped at the end;
* workloads: CLINC150 short queries and synthetic tickets (the same generators as
  ``benchmarks/encoder.py``, so the encoder and pipeline figures are on the same texts);
* the service config: ``config/service.example.yaml`` (the product's recommended settings)
  with the broker, topics, batching size and LLM endpoints replaced;
* a paced (open-loop) producer, an output collector, consumer-lag and RSS probes, the router
  as a subprocess (``python -m semroute_stream run``) and the LLM stub as a subprocess.

Everything talks to loopback only, and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for _p in (str(REPO), str(BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)
if str(REPO / "tests") not in sys.path:
    sys.path.append(str(REPO / "tests"))  # kafka_local.py and llm_stub.py (meant to be reused)

import numpy as np  # noqa: E402
import orjson  # noqa: E402
import yaml  # noqa: E402
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition  # noqa: E402
from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # noqa: E402
from encoder import DATASETS, dev_texts, short_queries, tickets  # noqa: E402  (benchmarks/encoder.py)

SERVICE_CONFIG = REPO / "config" / "service.example.yaml"
ROUTES_FILE = REPO / "config" / "routes.example.yaml"
EXAMPLE_TICKETS = REPO / "semroute_stream" / "examples" / "tickets.jsonl"

__all__ = [
    "DATASETS",
    "EXAMPLE_TICKETS",
    "REPO",
    "ROUTES_FILE",
    "SERVICE_CONFIG",
    "LagProbe",
    "OutputCollector",
    "RouterProcess",
    "StubProcess",
    "create_topics",
    "dev_texts",
    "free_port",
    "kafka_bootstrap",
    "log",
    "paced_produce",
    "percentiles",
    "produce_all",
    "read_rss_kib",
    "short_queries",
    "tickets",
    "write_service_config",
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def provenance() -> dict[str, Any]:
    """Which code was measured: HEAD, the changed product files, a hash of the package."""
    import hashlib

    def git(*args: str) -> str:
        proc = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return proc.stdout.strip()

    digest = hashlib.sha256()
    for path in sorted((REPO / "semroute_stream").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    changed = git("status", "--porcelain", "--", "semroute_stream", "config").splitlines()
    return {
        "git_head": git("rev-parse", "--short", "HEAD"),
        "uncommitted_product_changes": changed,
        "semroute_stream_sha256": digest.hexdigest()[:16],
    }


def thread_env() -> dict[str, str | None]:
    """Thread-count variables of the native libraries (numpy's OpenBLAS spins on idle cores)."""
    names = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "TOKENIZERS_PARALLELISM")
    return {name: os.environ.get(name) for name in names}


# --------------------------------------------------------------------------------------------
# The broker


def free_port(pair: bool = False) -> int:
    """A free TCP port on 127.0.0.1 (and, with ``pair``, the next one free too)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if not pair or port >= 65535:
            if not pair:
                return port
            continue
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair found on 127.0.0.1")


@contextlib.contextmanager
def kafka_bootstrap(bootstrap: str | None) -> Iterator[tuple[str, str]]:
    """Yield ``(bootstrap, how)``: the given address, ``KAFKA_BOOTSTRAP_SERVERS``, or a
    LocalKafka started here (state dir ``KAFKA_LOCAL_HOME`` or a temp dir; port
    ``KAFKA_LOCAL_PORT`` or a free one) and stopped on exit if this call started it."""
    if bootstrap:
        yield bootstrap, "--bootstrap"
        return
    env = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if env:
        yield env, "KAFKA_BOOTSTRAP_SERVERS"
        return
    from kafka_local import LocalKafka

    home_env = os.environ.get("KAFKA_LOCAL_HOME")
    home = Path(home_env) if home_env else Path(tempfile.mkdtemp(prefix="semroute-bench-kafka-"))
    port_env = os.environ.get("KAFKA_LOCAL_PORT")
    port = int(port_env) if port_env else free_port(pair=True)
    kafka = LocalKafka(home=home, port=port)
    log(f"starting a local Kafka broker in {home} on 127.0.0.1:{port}")
    started = kafka.start(timeout=180)
    try:
        yield kafka.bootstrap, f"LocalKafka started by the benchmark ({home})"
    finally:
        if started:
            log("stopping the local Kafka broker")
            kafka.stop()
            if not home_env:
                shutil.rmtree(home, ignore_errors=True)


async def create_topics(bootstrap: str, names: Sequence[str], partitions: int = 1) -> None:
    """Create ``names`` (fresh topics) and wait until their metadata is visible."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(n, num_partitions=partitions, replication_factor=1) for n in names]
        )
        deadline = time.monotonic() + 30
        while True:
            descs = await admin.describe_topics(list(names))
            if all(d.get("error_code") == 0 and d.get("partitions") for d in descs):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"topics not ready after 30 s: {descs}")
            await asyncio.sleep(0.1)
    finally:
        await admin.close()


def new_topic_base(kind: str) -> str:
    return f"bench.{kind}.{time.strftime('%H%M%S')}.{uuid.uuid4().hex[:6]}"


# --------------------------------------------------------------------------------------------
# The service config


def write_service_config(
    path: Path,
    *,
    bootstrap: str,
    topic: str,
    mode: str = "route_only",
    max_size: int | None = None,
    llm_url: str | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Write ``config/service.example.yaml`` with the broker, topics (input ``topic``, outputs
    ``<topic>.out`` / ``<topic>.dlq``), group, mode, batch size and LLM base URLs replaced.
    Returns the config as written."""
    raw: dict[str, Any] = yaml.safe_load(SERVICE_CONFIG.read_text(encoding="utf-8"))
    raw["routes"] = str(ROUTES_FILE)
    raw["mode"] = mode
    raw["kafka"]["bootstrap_servers"] = bootstrap
    raw["kafka"]["client_id"] = "semroute-bench"
    raw["input"]["topic"] = topic
    raw["input"]["group_id"] = f"g-{topic}"
    raw["output"]["responses_topic"] = f"{topic}.out"
    raw["output"]["dlq_topic"] = f"{topic}.dlq"
    if max_size is not None:
        raw["batching"]["max_size"] = max_size
    if llm_url is not None:
        for ep in raw.get("endpoints", {}).values():
            ep["base_url"] = llm_url
    if isinstance(raw.get("observability"), dict) and raw["observability"].get("metrics_port"):
        raw["observability"]["metrics_port"] = 0  # any free port: runs must not collide
    for section, values in (overrides or {}).items():
        if isinstance(raw.get(section), dict):
            raw[section].update(values)
        else:
            raw[section] = values
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return raw


def payload(ident: str, text: str) -> bytes:
    return orjson.dumps({"id": ident, "text": text})


def example_tickets() -> list[str]:
    with EXAMPLE_TICKETS.open(encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh if line.strip()]


# --------------------------------------------------------------------------------------------
# Producing


async def produce_all(bootstrap: str, topic: str, values: Sequence[bytes]) -> float:
    """Produce every value (acks=all) and wait for all acks; returns the seconds taken."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_batch_size=256 * 1024
    )
    await producer.start()
    t0 = time.perf_counter()
    try:
        futures = [await producer.send(topic, v) for v in values]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return time.perf_counter() - t0


@dataclass
class PacedResult:
    sent: list[tuple[str, float]] = field(default_factory=list)  # (id, wall time of send())
    max_behind_s: float = 0.0  # how late the most late send() was against its schedule


async def paced_produce(
    producer: AIOKafkaProducer,
    topic: str,
    make: Callable[[int], tuple[str, bytes]],
    *,
    rate: float,
    duration: float,
    result: PacedResult | None = None,
) -> PacedResult:
    """Open-loop producer: message ``i`` is sent at ``start + i / rate`` (never waits for the
    consumer; a late loop catches up at once). ``make(i)`` gives (id, value). Waits for acks."""
    result = result or PacedResult()
    loop = asyncio.get_running_loop()
    total = max(1, round(rate * duration))
    start = loop.time()
    futures = []
    i = 0
    while i < total:
        due = start + i / rate
        now = loop.time()
        if due > now:
            await asyncio.sleep(due - now)
            now = loop.time()
        while i < total and start + i / rate <= now:
            result.max_behind_s = max(result.max_behind_s, now - (start + i / rate))
            ident, value = make(i)
            result.sent.append((ident, time.time()))
            futures.append(await producer.send(topic, value))
            i += 1
        if len(futures) >= 1000:
            await asyncio.gather(*futures)
            futures.clear()
    await asyncio.gather(*futures)
    return result


# --------------------------------------------------------------------------------------------
# Reading outcomes


@dataclass(frozen=True)
class Outcome:
    ident: str | None
    key: str  # idempotency key: topic/partition/offset of the input
    status: str  # "ok" or "error" (dead letter)
    route: str | None
    source_ts_ms: int  # the input record's Kafka timestamp (producer CreateTime)
    processed_ms: int  # processed_at_ms of the outcome record
    out_ts_ms: int  # the outcome record's own Kafka timestamp
    received: float  # time.time() when this benchmark's consumer got it


class OutputCollector:
    """Reads the responses and dead-letter topics from the beginning in the background."""

    def __init__(self, bootstrap: str, topics: Sequence[str]) -> None:
        self.bootstrap = bootstrap
        self.topics = list(topics)
        self.outcomes: list[Outcome] = []
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None
        self.changed = asyncio.Event()

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=50,
        )
        await self._consumer.start()
        tps = []
        for topic in self.topics:
            parts = self._consumer.partitions_for_topic(topic)
            deadline = time.monotonic() + 30
            while not parts:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"topic {topic} has no partitions")
                await self._consumer._client.force_metadata_update()
                parts = self._consumer.partitions_for_topic(topic)
            tps += [TopicPartition(topic, p) for p in sorted(parts)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_beginning(*tps)
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        assert self._consumer is not None
        while not self._stop.is_set():
            got = await self._consumer.getmany(timeout_ms=100, max_records=2000)
            now = time.time()
            for recs in got.values():
                for r in recs:
                    rec = orjson.loads(r.value)
                    src = rec.get("source") or {}
                    self.outcomes.append(
                        Outcome(
                            ident=rec.get("id"),
                            key=rec.get("idempotency_key", ""),
                            status=rec.get("status", "?"),
                            route=rec.get("route"),
                            source_ts_ms=int(src.get("timestamp_ms") or 0),
                            processed_ms=int(rec.get("processed_at_ms") or 0),
                            out_ts_ms=int(r.timestamp),
                            received=now,
                        )
                    )
            if got:
                self.changed.set()

    async def wait_for(self, count: int, timeout: float) -> bool:
        """Wait until at least ``count`` outcomes arrived (bounded by ``timeout``)."""
        deadline = time.monotonic() + timeout
        while len(self.outcomes) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(left, 1.0))
        return True

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._task, 5)
        if self._consumer is not None:
            await self._consumer.stop()


def percentiles(values: Sequence[float], ps: Sequence[float] = (50, 90, 99)) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    arr = np.asarray(values, dtype=np.float64)
    out: dict[str, Any] = {"n": len(values)}
    for p in ps:
        out[f"p{p:g}"] = round(float(np.percentile(arr, p)), 1)
    out["max"] = round(float(arr.max()), 1)
    out["mean"] = round(float(arr.mean()), 1)
    return out


def delivery_check(produced_ids: Sequence[str], outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """lost (produced ids without an outcome), duplicates, dead letters."""
    by_id: dict[str, int] = {}
    by_key: dict[str, int] = {}
    for o in outcomes:
        if o.ident is not None:
            by_id[o.ident] = by_id.get(o.ident, 0) + 1
        by_key[o.key] = by_key.get(o.key, 0) + 1
    lost = [i for i in produced_ids if i not in by_id]
    return {
        "produced": len(produced_ids),
        "outcome_records": len(outcomes),
        "lost": len(lost),
        "lost_sample": lost[:5],
        "duplicate_inputs": sum(1 for n in by_key.values() if n > 1),
        "duplicate_records": sum(n - 1 for n in by_key.values() if n > 1),
        "dead_letters": sum(1 for o in outcomes if o.status != "ok"),
        "unexpected_ids": sum(1 for i in by_id if i not in set(produced_ids)),
    }


# --------------------------------------------------------------------------------------------
# Consumer lag


class LagProbe:
    """Consumer lag of a group on a topic: end offsets minus the group's committed offsets."""

    def __init__(self, bootstrap: str, group: str, topic: str) -> None:
        self.bootstrap, self.group, self.topic = bootstrap, group, topic
        self._admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        self._consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        self._tps: list[TopicPartition] = []

    async def start(self) -> None:
        await self._admin.start()
        await self._consumer.start()
        parts = self._consumer.partitions_for_topic(self.topic)
        deadline = time.monotonic() + 30
        while not parts:
            if time.monotonic() > deadline:
                raise RuntimeError(f"topic {self.topic} has no partitions")
            await self._consumer._client.force_metadata_update()
            parts = self._consumer.partitions_for_topic(self.topic)
        self._tps = [TopicPartition(self.topic, p) for p in sorted(parts)]

    async def lag(self) -> dict[str, int]:
        """``{"end": sum of end offsets, "committed": sum committed, "lag": end - committed}``."""
        ends = await self._consumer.end_offsets(self._tps)
        committed = await self._admin.list_consumer_group_offsets(self.group)
        end = sum(int(ends[tp]) for tp in self._tps)
        done = 0
        for tp in self._tps:
            meta = committed.get(tp)
            if meta is not None and meta.offset is not None and meta.offset >= 0:
                done += int(meta.offset)
        return {"end": end, "committed": done, "lag": end - done}

    async def stop(self) -> None:
        await self._consumer.stop()
        await self._admin.close()


# --------------------------------------------------------------------------------------------
# Processes: the router and the LLM stub


def read_rss_kib(pid: int) -> dict[str, int] | None:
    """VmRSS / VmHWM (KiB), thread count and open fds of ``pid`` (None if it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    out: dict[str, int] = {}
    for name in ("VmRSS", "VmHWM", "Threads"):
        m = re.search(rf"^{name}:\s+(\d+)", status, re.M)
        if m:
            out[name] = int(m.group(1))
    with contextlib.suppress(OSError):
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class RouterProcess:
    """``python -m semroute_stream run --config CONFIG`` as a child process.

    stderr goes to ``log_path`` (read by a thread that spots ``partitions assigned``); the
    last stdout line is the run's statistics JSON.
    """

    def __init__(self, config: Path, log_path: Path, extra_args: Sequence[str] = ()) -> None:
        self.config = config
        self.log_path = log_path
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.assigned = threading.Event()
        self._reader: threading.Thread | None = None
        self.stdout = b""

    def start(self) -> None:
        cmd = [sys.executable, "-m", "semroute_stream", "run", "--config", str(self.config)]
        self.proc = subprocess.Popen(
            [*cmd, *self.extra_args],
            cwd=REPO,
            env=_child_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()

    def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        with self.log_path.open("wb") as fh:
            for line in self.proc.stderr:
                fh.write(line)
                fh.flush()
                if b"partitions assigned: [" in line and b"TopicPartition" in line:
                    self.assigned.set()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.assigned.wait(0.2):
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"the router exited with {self.proc.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the router got no partitions in {timeout:.0f}s:\n{self.tail()}"
                )

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 60.0) -> dict[str, Any] | None:
        """SIGTERM (drain, commit, exit); SIGKILL after ``timeout``. Returns the stats JSON."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            log(f"router pid {self.proc.pid} ignored SIGTERM for {timeout:.0f}s: SIGKILL")
            self.proc.kill()
            out, _ = self.proc.communicate(timeout=10)
        if self._reader is not None:
            self._reader.join(timeout=5)
        self.stdout = out or b""
        for line in reversed(self.stdout.decode(errors="replace").splitlines()):
            with contextlib.suppress(ValueError):
                stats = json.loads(line)
                if isinstance(stats, dict):
                    return stats
        return None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode


_STUB_LAUNCHER = """
import sys
sys.path.insert(0, {tests!r})
import llm_stub
if {tuned!r}:
    # Benchmark tuning of the reused stub (see StubProcess): no Nagle delay on the response's
    # second write, and a listen backlog that takes a burst of new connections.
    llm_stub._Handler.disable_nagle_algorithm = True
    llm_stub._Server.request_queue_size = 1024
sys.exit(llm_stub.main(sys.argv[1:]))
"""


class StubProcess:
    """``tests/llm_stub.py`` (an OpenAI-compatible ThreadingHTTPServer) in a child process.

    ``tuned=True`` sets two socket options of the stub's classes before it starts: TCP_NODELAY
    on its connections (the stock handler writes the headers and the body in two sends; with
    Nagle on, the body waits for the client's delayed ACK, ~40 ms on Linux loopback) and a
    listen backlog of 1024 (socketserver's default 5 makes a burst of new connections fail with
    resets). ``tuned=False`` runs the stub exactly as shipped.
    """

    def __init__(self, latency_s: float, *, tuned: bool = True) -> None:
        self.latency_s = latency_s
        self.tuned = tuned
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout: float = 30.0) -> None:
        code = _STUB_LAUNCHER.format(tests=str(REPO / "tests"), tuned=self.tuned)
        args = ["--host", "127.0.0.1", "--port", str(self.port)]
        args += ["--latency-ms", f"{self.latency_s * 1000:g}"]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # the stub prints one line once it listens
            line = self.proc.stdout.readline()
            if b"listening" in line:
                return
            if not line and self.proc.poll() is not None:
                break
        raise RuntimeError(f"the LLM stub did not start (exit {self.proc.poll()})")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def __enter__(self) -> StubProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def cpu_seconds(pid: int) -> float | None:
    """user + system CPU seconds of ``pid`` so far (None if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def raw_http_capacity(port: int, concurrency: int, seconds: float) -> dict[str, Any]:
    """Completions/s the stub answers to a minimal asyncio HTTP/1.1 client (one write per
    request, keep-alive, ``concurrency`` connections): the stub's capacity without httpx."""
    body = orjson.dumps({"model": "stub-model", "messages": [{"role": "user", "content": "x"}]})
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    errors = 0
    end = loop.time() + seconds

    async def worker() -> None:
        nonlocal errors
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
        try:
            while loop.time() < end:
                t = time.perf_counter()
                writer.write(request)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await asyncio.wait_for(reader.readexactly(length), 30)
                if not head.startswith(b"HTTP/1.1 200"):
                    errors += 1
                latencies.append((time.perf_counter() - t) * 1000)
        finally:
            writer.close()

    t0 = loop.time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = loop.time() - t0
    return {
        "client": "raw asyncio HTTP/1.1",
        "concurrency": concurrency,
        "seconds": round(elapsed, 2),
        "completions_per_s": round(len(latencies) / elapsed, 1),
        "errors": errors,
        "latency_ms": percentiles(latencies),
    }


async def httpx_capacity(url: str, concurrency: int, seconds: float) -> dict[str, Any]:
    """Completions/s through one ``httpx.AsyncClient`` with ``concurrency`` pooled connections
    (the product's LLMPool set-up) and ``concurrency`` workers in a loop; also its CPU time."""
    import httpx

    body = {"model": "stub-model", "messages": [{"role": "user", "content": "capacity probe"}]}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    done = 0
    errors = 0
    latencies: list[float] = []
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        # one warm-up round opens the connections
        await asyncio.gather(
            *(client.post(f"{url}/chat/completions", json=body) for _ in range(concurrency))
        )
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds

        async def worker() -> None:
            nonlocal done, errors
            while loop.time() < end:
                t = time.perf_counter()
                r = await client.post(f"{url}/chat/completions", json=body)
                latencies.append((time.perf_counter() - t) * 1000)
                if r.status_code == 200:
                    done += 1
                else:
                    errors += 1

        t0 = loop.time()
        cpu0 = time.process_time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = loop.time() - t0
        cpu = time.process_time() - cpu0
    return {
        "client": "httpx.AsyncClient",
        "concurrency": concurrency,
        "client_cpu_cores": round(cpu / elapsed, 2),
        "client_cpu_ms_per_request": round(1000 * cpu / max(1, done + errors), 2),
        "seconds": round(elapsed, 2),
        "completions_per_s": round(done / elapsed, 1),
        "errors": errors,
        "latency_ms": percentiles(latencies),
    }
