"""Soak test (issue 5): a fixed message rate for a long time through a real broker, with the
router running as a separate process, watching throughput, latency, consumer lag and memory.

    .venv/bin/python benchmarks/soak.py                          # 50 msg/s for 3 min, route-only
    .venv/bin/python benchmarks/soak.py --duration 120 --rate 80
    .venv/bin/python benchmarks/soak.py --llm                    # LLM mode, stub at 200 ms
    .venv/bin/python benchmarks/soak.py --bootstrap 127.0.0.1:39292 --duration 600 --window 30

Broker: ``--bootstrap``, else ``KAFKA_BOOTSTRAP_SERVERS``, else a LocalKafka started (temp dir,
free port) and stopped by this script. The router is ``python -m semroute_stream run --config
<generated>`` (``config/service.example.yaml`` with the broker, fresh topics and, with ``--llm``,
the stub's URL; metrics on a free port). An open-loop producer sends ``--rate`` messages/s for
``--duration`` s; a consumer reads every outcome (responses and dead letters); every
``--sample-interval`` s the router's VmRSS / threads / fds / CPU (from /proc) and the group's
consumer lag (end offsets minus committed offsets, aiokafka admin) are sampled. After the load,
it waits for every outcome and for the committed offsets to catch up, then stops the router with
SIGTERM and checks delivery: lost (produced ids without an outcome) must be 0, and duplicates
(inputs with more than one outcome) are reported.

Per window (``--window`` s, by the input's produce time): messages produced, outcomes completed in
the window, throughput, latency p50/p99 (``processed_at_ms`` - the input's Kafka timestamp), lag
(last and max) and RSS. Memory verdict: least-squares slope of RSS over the second half of the
load, in MiB/min and bytes per message; "stable" when below ``--rss-slope-limit`` MiB/min.
Prints one JSON object on stdout (progress on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from _common import (
    LagProbe,
    OutputCollector,
    PacedResult,
    RouterProcess,
    StubProcess,
    cpu_seconds,
    create_topics,
    delivery_check,
    example_tickets,
    kafka_bootstrap,
    log,
    new_topic_base,
    paced_produce,
    payload,
    percentiles,
    provenance,
    read_rss_kib,
    short_queries,
    thread_env,
    tickets,
    write_service_config,
)
from aiokafka import AIOKafkaProducer


def _texts(kind: str) -> list[str]:
    if kind == "short":
        return short_queries(3100)
    if kind == "tickets":
        return tickets(500)
    return example_tickets()


async def _sampler(
    router: RouterProcess,
    lag: LagProbe,
    collector: OutputCollector,
    t0: float,
    interval: float,
    samples: list[dict[str, Any]],
    stop: asyncio.Event,
) -> None:
    """Every ``interval`` s: the router's RSS / threads / fds / CPU and the consumer lag."""
    last_cpu = cpu_seconds(router.pid) or 0.0
    last_t = time.time()
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
        now = time.time()
        proc = read_rss_kib(router.pid)
        cpu = cpu_seconds(router.pid)
        try:
            lag_now: dict[str, int] | None = await asyncio.wait_for(lag.lag(), 10)
        except Exception as exc:  # a lag probe failure must not end the soak
            log(f"lag probe failed: {exc!r}")
            lag_now = None
        sample: dict[str, Any] = {"t": round(now - t0, 2), "outcomes": len(collector.outcomes)}
        if proc is not None:
            sample["rss_kib"] = proc.get("VmRSS")
            sample["threads"] = proc.get("Threads")
            sample["fds"] = proc.get("fds")
        if cpu is not None:
            sample["cpu_cores"] = round((cpu - last_cpu) / max(1e-6, now - last_t), 2)
            last_cpu = cpu
        last_t = now
        if lag_now is not None:
            sample["lag"] = lag_now["lag"]
            sample["committed"] = lag_now["committed"]
            sample["end"] = lag_now["end"]
        samples.append(sample)


def _slope(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope (y per x) of ``points``; None with fewer than 3 points."""
    if len(points) < 3:
        return None
    x = np.array([p[0] for p in points], dtype=np.float64)
    y = np.array([p[1] for p in points], dtype=np.float64)
    if float(np.ptp(x)) == 0.0:
        return None
    return float(np.polyfit(x, y, 1)[0])


def _windows(
    *,
    sent: PacedResult,
    collector: OutputCollector,
    samples: list[dict[str, Any]],
    t0: float,
    duration: float,
    width: float,
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    n = max(1, math.ceil(duration / width - 1e-9))
    sent_at = [ts - t0 for _, ts in sent.sent]
    for k in range(n):
        lo, hi = k * width, min((k + 1) * width, duration)
        span = hi - lo
        mine = [o for o in collector.outcomes if lo <= o.source_ts_ms / 1000 - t0 < hi]
        finished = [o for o in collector.outcomes if lo <= o.processed_ms / 1000 - t0 < hi]
        in_win = [s for s in samples if lo < s["t"] <= hi]
        lags = [s["lag"] for s in in_win if "lag" in s]
        rss = [s["rss_kib"] for s in in_win if s.get("rss_kib")]
        cpu = [s["cpu_cores"] for s in in_win if "cpu_cores" in s]
        lat = percentiles([o.processed_ms - o.source_ts_ms for o in mine], (50, 99))
        out.append(
            {
                "window_s": [round(lo, 1), round(hi, 1)],
                "produced": sum(1 for t in sent_at if lo <= t < hi),
                "outcomes_for_window_inputs": len(mine),
                "outcomes_completed": len(finished),
                "throughput_msgs_per_s": round(len(finished) / span, 1) if span > 0 else None,
                "latency_ms": {k: lat.get(k) for k in ("p50", "p99", "max")},
                "lag_last": lags[-1] if lags else None,
                "lag_max": max(lags) if lags else None,
                "rss_mib_last": round(rss[-1] / 1024, 1) if rss else None,
                "router_cpu_cores_mean": round(sum(cpu) / len(cpu), 2) if cpu else None,
            }
        )
    return out


#: Records that must each end as one dead letter without disturbing the service (issue 11).
HOSTILE: list[bytes] = [
    b'{"text": "hi", "x": ' + b"[" * 300 + b"]" * 300 + b"}",  # nested deeper than the limit
    bytes(range(256)) * 3200,  # 800 KB of binary
    bytes([1, 2, 27]) * 70_000,  # 200 KB of control bytes
    b'{"text": "hi", "deep": ' + b"[" * 253 + b"]" * 253 + b"}",  # a field 253 levels deep
    b"\xff\xfe not utf-8",
    b"[1, 2, 3]",
]


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    mode = "llm" if args.llm else "route_only"
    text_kind = args.texts or ("examples" if args.llm else "short")
    texts = _texts(text_kind)
    result: dict[str, Any] = {
        "benchmark": "soak",
        "code": provenance(),
        "thread_env": thread_env(),
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        },
        "mode": mode,
        "rate_msgs_per_s": args.rate,
        "duration_s": args.duration,
        "window_s": args.window,
        "texts": text_kind,
    }
    workdir_cm: Any = (
        contextlib.nullcontext(args.workdir)
        if args.workdir
        else tempfile.TemporaryDirectory(prefix="semroute-soak-")
    )
    with kafka_bootstrap(args.bootstrap) as (bootstrap, how), workdir_cm as workdir:
        tmp = Path(workdir)
        tmp.mkdir(parents=True, exist_ok=True)
        result["broker"] = {"bootstrap": bootstrap, "from": how}
        topic = new_topic_base("soak")
        await create_topics(bootstrap, [topic, f"{topic}.out", f"{topic}.dlq"])
        stub = StubProcess(args.llm_latency, tuned=not args.stock_stub) if args.llm else None
        router: RouterProcess | None = None
        collector = OutputCollector(bootstrap, [f"{topic}.out", f"{topic}.dlq"])
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, acks="all", max_request_size=2 * 1024 * 1024
        )
        lag = LagProbe(bootstrap, f"g-{topic}", topic)
        samples: list[dict[str, Any]] = []
        stop_sampling = asyncio.Event()
        sampler: asyncio.Task[None] | None = None
        try:
            if stub is not None:
                stub.start()
                result["llm_stub"] = {"url": stub.url, "latency_s": args.llm_latency}
                result["llm_stub"]["tuned"] = not args.stock_stub
            config = tmp / "service.yaml"
            written = write_service_config(
                config,
                bootstrap=bootstrap,
                topic=topic,
                mode=mode,
                max_size=args.max_size,
                llm_url=stub.url if stub else None,
            )
            result["settings"] = {
                k: written.get(k) for k in ("batching", "flow", "encoder", "observability")
            }
            router = RouterProcess(config, tmp / "router.log")
            log(f"starting the router ({mode}) on topic {topic}")
            router.start()
            await asyncio.to_thread(router.wait_ready, 180)
            rss_ready = read_rss_kib(router.pid) or {}
            await collector.start()
            await lag.start()
            await producer.start()
            t0 = time.time()
            sampler = asyncio.create_task(
                _sampler(router, lag, collector, t0, args.sample_interval, samples, stop_sampling)
            )
            log(f"producing {args.rate:g} msg/s for {args.duration:g}s")

            every = args.hostile_every

            def make(i: int) -> tuple[str, bytes]:
                if every and i % every == every - 1:  # a hostile record: one dead letter
                    return f"h{i}", HOSTILE[(i // every) % len(HOSTILE)]
                ident = f"s{i}"
                return ident, payload(ident, texts[i % len(texts)])

            sent = PacedResult()
            progress = asyncio.create_task(_progress(collector, sent, t0, args.window))
            try:
                await paced_produce(
                    producer, topic, make, rate=args.rate, duration=args.duration, result=sent
                )
            finally:
                progress.cancel()
            load_end = time.time() - t0
            log(f"load done ({len(sent.sent)} sent); waiting for every outcome")
            all_in = await collector.wait_for(len(sent.sent), args.drain_timeout)
            drained_at = time.time() - t0
            caught_up = False
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                with contextlib.suppress(Exception):
                    if (await lag.lag())["lag"] == 0:
                        caught_up = True
                        break
                await asyncio.sleep(0.5)
            await asyncio.sleep(args.sample_interval)  # one more sample after the drain
            stop_sampling.set()
            await sampler
            rss_end = read_rss_kib(router.pid) or {}
            log("stopping the router (SIGTERM)")
            stats = await asyncio.to_thread(router.stop, 60)
            result["router_stats"] = stats
            result["router_exit_code"] = router.returncode
            await asyncio.sleep(1.0)  # outcomes written during the shutdown drain, if any
        finally:
            stop_sampling.set()
            if sampler is not None and not sampler.done():
                sampler.cancel()
            with contextlib.suppress(Exception):
                await producer.stop()
            if router is not None and router.returncode is None:
                await asyncio.to_thread(router.stop, 60)
            with contextlib.suppress(Exception):
                await lag.stop()
            with contextlib.suppress(Exception):
                await collector.stop()
            if stub is not None:
                stub.stop()
        produced_ids = [i for i, _ in sent.sent if i.startswith("s")]
        delivery = delivery_check(produced_ids, collector.outcomes)
        hostile_sent = len(sent.sent) - len(produced_ids)
        delivery["hostile_sent"] = hostile_sent
        delivery["hostile_dead_letters"] = sum(
            1 for o in collector.outcomes if o.ident is None and o.status != "ok"
        )
        delivery["all_outcomes_within_drain_timeout"] = all_in
        delivery["committed_caught_up"] = caught_up
        result["delivery"] = delivery
        lat_all = [o.processed_ms - o.source_ts_ms for o in collector.outcomes]
        done_times = [o.processed_ms / 1000 - t0 for o in collector.outcomes]
        in_load = sum(1 for t in done_times if t <= load_end)
        result["overall"] = {
            "sent": len(sent.sent),
            "producer_max_behind_ms": round(sent.max_behind_s * 1000, 1),
            "outcomes_per_s_during_load": round(in_load / load_end, 1),
            "drained_after_load_s": round(drained_at - load_end, 2),
            "latency_ms": percentiles(lat_all, (50, 90, 99, 99.9)),
        }
        result["windows"] = _windows(
            sent=sent,
            collector=collector,
            samples=samples,
            t0=t0,
            duration=args.duration,
            width=args.window,
        )
        lag_series = [[s["t"], s["lag"]] for s in samples if "lag" in s]
        rss_series = [[s["t"], round(s["rss_kib"] / 1024, 2)] for s in samples if s.get("rss_kib")]
        result["lag_series"] = lag_series
        result["rss_mib_series"] = rss_series
        result["threads_fds_last"] = {
            "threads": next((s["threads"] for s in reversed(samples) if s.get("threads")), None),
            "fds": next((s["fds"] for s in reversed(samples) if s.get("fds")), None),
            "threads_first": next((s["threads"] for s in samples if s.get("threads")), None),
            "fds_first": next((s["fds"] for s in samples if s.get("fds")), None),
        }
        result["memory"] = _memory(
            samples, rss_ready, rss_end, args.duration, args.rate, args.rss_slope_limit
        )
        lost = delivery["lost"]
        dups = delivery["duplicate_inputs"]
        throughput_ok = result["overall"]["outcomes_per_s_during_load"] >= 0.95 * args.rate
        result["verdict"] = {
            "lost": lost,
            "duplicates": dups,
            "dead_letters": delivery["dead_letters"],
            "kept_up_with_rate": throughput_ok,
            "memory": result["memory"]["verdict"],
            "pass": (
                lost == 0
                and dups == 0
                and delivery["dead_letters"] == delivery["hostile_sent"]
                and delivery["hostile_dead_letters"] == delivery["hostile_sent"]
                and throughput_ok
                and result["memory"]["verdict"] != "growing"
            ),
        }
        if router is not None and (router.returncode not in (0, None)):
            result["router_log_tail"] = router.tail(40)
    result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    end_hash = provenance()["semroute_stream_sha256"]
    result["code"]["changed_during_run"] = end_hash != result["code"]["semroute_stream_sha256"]
    result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    return result


def _memory(
    samples: list[dict[str, Any]],
    rss_ready: dict[str, int],
    rss_end: dict[str, int],
    duration: float,
    rate: float,
    limit_mib_per_min: float,
) -> dict[str, Any]:
    during = [(s["t"], s["rss_kib"] / 1024) for s in samples if s.get("rss_kib")]
    second_half = [(t, m) for t, m in during if duration / 2 <= t <= duration]
    slope = _slope(second_half)  # MiB per s
    slope_min = None if slope is None else slope * 60
    span = (second_half[-1][0] - second_half[0][0]) if second_half else 0.0
    if slope_min is None or span < 30:
        verdict = "inconclusive (second half of the load shorter than 30 s)"
    else:
        verdict = "stable" if slope_min <= limit_mib_per_min else "growing"
    return {
        "rss_mib_ready": round(rss_ready.get("VmRSS", 0) / 1024, 1),
        "rss_mib_load_start": round(during[0][1], 1) if during else None,
        "rss_mib_end": round(rss_end.get("VmRSS", 0) / 1024, 1),
        "rss_mib_peak": round(rss_end.get("VmHWM", 0) / 1024, 1),
        "second_half_samples": len(second_half),
        "second_half_slope_mib_per_min": None if slope_min is None else round(slope_min, 3),
        "second_half_slope_bytes_per_message": (
            None if slope is None else round(slope * 1024 * 1024 / rate, 1)
        ),
        "limit_mib_per_min": limit_mib_per_min,
        "verdict": verdict,
    }


async def _progress(collector: OutputCollector, sent: PacedResult, t0: float, every: float) -> None:
    while True:
        await asyncio.sleep(every)
        log(f"t={time.time() - t0:5.0f}s sent={len(sent.sent)} outcomes={len(collector.outcomes)}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--bootstrap",
        help="HOST:PORT (default: $KAFKA_BOOTSTRAP_SERVERS, else a LocalKafka started here)",
    )
    parser.add_argument("--rate", type=float, default=50.0, help="messages/s (default 50)")
    parser.add_argument("--duration", type=float, default=180.0, help="seconds (default 180)")
    parser.add_argument("--window", type=float, default=15.0, help="report window, s (15)")
    parser.add_argument("--sample-interval", type=float, default=1.0, help="RSS/lag sampling, s")
    parser.add_argument("--llm", action="store_true", help="LLM mode with the stub endpoint")
    parser.add_argument("--llm-latency", type=float, default=0.2, help="stub latency, s (0.2)")
    parser.add_argument(
        "--stock-stub",
        action="store_true",
        help="run tests/llm_stub.py as shipped (default: TCP_NODELAY and a larger backlog)",
    )
    parser.add_argument(
        "--texts",
        choices=["short", "tickets", "examples"],
        help="workload: CLINC150 queries, synthetic tickets or the bundled example tickets "
        "(default: short; examples with --llm)",
    )
    parser.add_argument("--max-size", type=int, default=None, help="batching.max_size override")
    parser.add_argument(
        "--rss-slope-limit",
        type=float,
        default=1.0,
        help="MiB/min of RSS growth over the second half still called stable (1.0)",
    )
    parser.add_argument(
        "--hostile-every",
        type=int,
        default=0,
        help="every Nth message is a hostile record (deep JSON, 800 KB binary, control bytes...)",
    )
    parser.add_argument("--drain-timeout", type=float, default=120.0, help="s to wait at the end")
    parser.add_argument("--workdir", help="keep the generated config and router log here")
    parser.add_argument("--json", action="store_true", help="compact JSON (default: indented)")
    args = parser.parse_args(argv)
    result = asyncio.run(soak(args))
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0 if result.get("verdict", {}).get("pass") else 1


if __name__ == "__main__":
    raise SystemExit(main())
