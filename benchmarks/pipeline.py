"""Pipeline benchmark (issue 3): Kafka route-only throughput vs the bare encoder, end-to-end
latency at fixed rates, and LLM-mode throughput against the endpoints' concurrency bound.

    .venv/bin/python benchmarks/pipeline.py --json                 # default run (~4-5 min)
    .venv/bin/python benchmarks/pipeline.py --json --quick         # smaller sizes (~2 min)
    .venv/bin/python benchmarks/pipeline.py --bootstrap 127.0.0.1:39292 --sections throughput

Broker: ``--bootstrap``, else ``KAFKA_BOOTSTRAP_SERVERS``, else a LocalKafka started (in a temp
dir, on a free port) and stopped by this script. Config: ``config/service.example.yaml`` (the
product's recommended settings: ``encoder.intra_op_threads: 1``, ``linger_ms: 25`` ...) with the
broker, fresh topics and ``batching.max_size`` replaced.

1. Route-only throughput. N messages are produced into a fresh topic first, then
   ``run_service(settings, max_messages=N)`` runs in this process. The window is timed from the
   moment the first micro-batch is in hand (``Pipeline._next_batch`` returned records) to the
   broker's ack of the last outcome (``AtLeastOnceOutbox.publish`` returned): start-up (model
   load, group join) and shut-down (drain, final commit, leave group) are reported apart. The
   same texts are encoded with ``Encoder.encode`` in chunks of ``batching.max_size``, once
   before and once after the pipeline pass, in the same process; ratio = pipeline / encoder
   (encoder = all texts of both passes / time of both passes), overhead = 1 - ratio. The
   encoder's busy time inside the pipeline is measured too (``Encoder.encode`` wrapped), which
   splits the overhead into "encoder idle" (serial work on the event loop between batches) and
   "encoder slower" (contention for the CPU / GIL with the event loop).
2. Latency: the router runs as a subprocess (``python -m semroute_stream run``); an open-loop
   producer sends short texts at 25 / 50 / 90 % of the route-only rate measured in step 1
   (``--latency-batch-size``, default the config's 64) for ``--latency-seconds`` each.
   Latency = ``processed_at_ms`` of the outcome - the input record's Kafka timestamp
   (``source.timestamp_ms``, producer CreateTime); ``visible`` = when this script's consumer
   received the outcome - the same timestamp (includes the acks=all write and the fetch).
3. LLM mode: ``tests/llm_stub.py`` in a subprocess with 200 ms latency, by default with two
   socket settings changed from the benchmark (TCP_NODELAY, listen backlog 1024; see
   ``_common.StubProcess``; ``--stock-stub`` runs it as shipped). The stub is measured alone
   first, with a raw asyncio HTTP client (its own capacity) and with an ``httpx.AsyncClient``
   set up like the product's pool (the client's cost), and the stock stub alone for comparison.
   Then the pipeline in LLM mode on a workload whose endpoint shares equal the endpoints'
   concurrency shares ("balanced"), so the bound is min(sum(max_concurrency),
   flow.max_in_flight) / latency; a mix-aware bound (per endpoint max_concurrency / latency /
   its share of the traffic) is reported too. A second pass with slow endpoints
   (``--llm-check-latency``, 1 s: bound 32/s) checks the concurrency machinery apart from the
   per-request CPU cost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    OutputCollector,
    PacedResult,
    RouterProcess,
    StubProcess,
    cpu_seconds,
    create_topics,
    example_tickets,
    httpx_capacity,
    kafka_bootstrap,
    log,
    new_topic_base,
    paced_produce,
    payload,
    percentiles,
    produce_all,
    provenance,
    raw_http_capacity,
    short_queries,
    thread_env,
    tickets,
    write_service_config,
)
from aiokafka import AIOKafkaProducer

from semroute_stream._encoder import Encoder
from semroute_stream._routing.router import Router
from semroute_stream._routing.schema import load_routes
from semroute_stream._service.app import run_service
from semroute_stream._service.delivery import AtLeastOnceOutbox
from semroute_stream._service.pipeline import Pipeline
from semroute_stream._service.settings import Settings, load_settings

OVERHEAD_TARGET = 0.15

# --------------------------------------------------------------------------------------------
# Instrumentation of the in-process pipeline (class attributes patched for one run)


@dataclass
class Probe:
    called: float = 0.0
    expect: int = 0
    first_batch: float | None = None
    last_ack: float | None = None
    cpu_first: float = 0.0
    cpu_last: float = 0.0
    acks: int = 0
    encode_s: float = 0.0
    encode_calls: int = 0
    last_encode_end: float = 0.0
    ack_times: list[float] = field(default_factory=list)


@contextlib.contextmanager
def instrument() -> Iterator[Probe]:
    probe = Probe()
    orig_next = Pipeline._next_batch
    orig_publish = AtLeastOnceOutbox.publish
    orig_encode = Encoder.encode

    async def next_batch(self: Pipeline) -> Any:
        records = await orig_next(self)
        if records and probe.first_batch is None:
            probe.first_batch = time.perf_counter()
            probe.cpu_first = time.process_time()
        return records

    async def publish(self: AtLeastOnceOutbox, *args: Any, **kwargs: Any) -> None:
        await orig_publish(self, *args, **kwargs)
        probe.last_ack = time.perf_counter()
        probe.acks += 1
        if probe.acks == probe.expect:  # process_time() is a syscall: only once
            probe.cpu_last = time.process_time()
        probe.ack_times.append(probe.last_ack)

    def encode(self: Encoder, texts: Sequence[str]) -> Any:
        t0 = time.perf_counter()
        try:
            return orig_encode(self, texts)
        finally:
            if probe.first_batch is not None:  # not the router's utterances at start-up
                probe.last_encode_end = time.perf_counter()
                probe.encode_s += probe.last_encode_end - t0
                probe.encode_calls += 1

    Pipeline._next_batch = next_batch  # type: ignore[method-assign]
    AtLeastOnceOutbox.publish = publish  # type: ignore[method-assign]
    Encoder.encode = encode  # type: ignore[method-assign]
    try:
        yield probe
    finally:
        Pipeline._next_batch = orig_next  # type: ignore[method-assign]
        AtLeastOnceOutbox.publish = orig_publish  # type: ignore[method-assign]
        Encoder.encode = orig_encode  # type: ignore[method-assign]


# --------------------------------------------------------------------------------------------
# One in-process pipeline pass


async def pipeline_pass(
    bootstrap: str,
    tmp: Path,
    texts: Sequence[str],
    *,
    max_size: int,
    kind: str,
    mode: str = "route_only",
    llm_url: str | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    topic = new_topic_base(kind)
    await create_topics(bootstrap, [topic, f"{topic}.out", f"{topic}.dlq"])
    values = [payload(f"m{i}", t) for i, t in enumerate(texts)]
    produce_s = await produce_all(bootstrap, topic, values)
    config = tmp / f"{topic}.yaml"
    write_service_config(
        config,
        bootstrap=bootstrap,
        topic=topic,
        mode=mode,
        max_size=max_size,
        llm_url=llm_url,
        overrides=overrides,
    )
    settings = load_settings(config)
    n = len(values)
    with instrument() as probe:
        probe.called = time.perf_counter()
        probe.expect = n
        stats = await run_service(
            settings, max_messages=n, idle_timeout_s=120, handle_signals=False
        )
        returned = time.perf_counter()
    if probe.first_batch is None or probe.last_ack is None:
        raise RuntimeError(f"the pipeline consumed nothing: {stats.as_dict()}")
    window = probe.last_ack - probe.first_batch
    if stats.outcomes + stats.dead_letters != n:
        log(f"WARNING: {n} produced but {stats.outcomes} outcomes + {stats.dead_letters} DLQ")
    timeline: dict[str, Any] = {}
    if mode == "llm":
        # outcomes per second while the encoder still had work, and after it finished
        during = sum(1 for t in probe.ack_times if t <= probe.last_encode_end)
        after = n - during
        t_enc = probe.last_encode_end - probe.first_batch
        t_after = probe.last_ack - probe.last_encode_end
        timeline = {
            "last_encode_done_at_s": round(t_enc, 2),
            "outcomes_per_s_until_last_encode": round(during / t_enc, 1) if t_enc > 0 else None,
            "outcomes_per_s_after_last_encode": round(after / t_after, 1) if t_after > 0 else None,
            "outcomes_per_s_by_second": _per_second(probe.ack_times, probe.first_batch),
        }
    return {
        **timeline,
        "topic": topic,
        "messages": n,
        "produce_s": round(produce_s, 2),
        "window_s": round(window, 3),
        "msgs_per_s": round(n / window, 1),
        "startup_s": round(probe.first_batch - probe.called, 2),
        "shutdown_s": round(returned - probe.last_ack, 2),
        "encode_busy_s": round(probe.encode_s, 3),
        "encode_calls": probe.encode_calls,
        "encoder_busy_fraction": round(probe.encode_s / window, 3),
        "in_pipeline_encode_msgs_per_s": round(n / probe.encode_s, 1) if probe.encode_s else None,
        "process_cpu_cores": (
            round((probe.cpu_last - probe.cpu_first) / window, 2) if probe.cpu_last else None
        ),
        "stats": stats.as_dict(),
        "mean_batch": round(stats.consumed / max(1, stats.batches), 1),
    }


def _per_second(times: Sequence[float], start: float) -> list[int]:
    counts = Counter(int(t - start) for t in times)
    return [counts[i] for i in range(max(counts) + 1)] if counts else []


_ENCODER_CPU = [0.0]  # process CPU seconds of the encoder passes (read by throughput_section)


def encoder_pass(encoder: Encoder, texts: Sequence[str], size: int) -> float:
    """Seconds to encode ``texts`` in chunks of ``size`` (what the pipeline's batches hold)."""
    t0 = time.perf_counter()
    c0 = time.process_time()
    for i in range(0, len(texts), size):
        encoder.encode(texts[i : i + size])
    _ENCODER_CPU[0] = time.process_time() - c0
    return time.perf_counter() - t0


async def throughput_section(
    bootstrap: str,
    tmp: Path,
    encoder: Encoder,
    workloads: dict[str, list[str]],
    sizes: dict[str, list[int]],
    n_rounds: int,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, texts in workloads.items():
        tokens = encoder.count_tokens(texts)
        entry: dict[str, Any] = {
            "messages": len(texts),
            "mean_tokens": round(statistics.fmean(tokens), 1),
            "mean_words": round(statistics.fmean(len(t.split()) for t in texts), 1),
            "by_max_size": {},
        }
        for size in sizes[name]:
            # the encoder encodes the first half before and the second half after the pipeline
            # pass (cut on a chunk boundary): all N texts once, bracketing the pipeline in time
            half = max(size, (len(texts) // 2) // size * size)
            rounds: list[dict[str, Any]] = []
            for r in range(n_rounds):
                log(f"throughput: {name} x{len(texts)}, max_size={size}, round {r + 1}: encoder")
                enc_a = encoder_pass(encoder, texts[:half], size)
                cpu_a = _ENCODER_CPU[0]
                log(f"  encoder {half / enc_a:.1f}/s; pipeline pass")
                pipe = await pipeline_pass(bootstrap, tmp, texts, max_size=size, kind=name)
                log(f"  pipeline {pipe['msgs_per_s']}/s; encoder")
                enc_b = encoder_pass(encoder, texts[half:], size) if half < len(texts) else 0.0
                cpu_b = _ENCODER_CPU[0] if enc_b else 0.0
                enc_rate = len(texts) / (enc_a + enc_b)
                enc_cpu_ms = 1000 * (cpu_a + cpu_b) / len(texts)
                cores = pipe["process_cpu_cores"]
                pipe_cpu_ms = 1000 * cores * pipe["window_s"] / len(texts) if cores else None
                in_pipe = pipe["in_pipeline_encode_msgs_per_s"]
                rounds.append(
                    {
                        "pipeline_msgs_per_s": pipe["msgs_per_s"],
                        "encoder_msgs_per_s": round(enc_rate, 1),
                        "encoder_before_after_msgs_per_s": [
                            round(half / enc_a, 1),
                            round((len(texts) - half) / enc_b, 1) if enc_b else None,
                        ],
                        "ratio": round(pipe["msgs_per_s"] / enc_rate, 3),
                        # CPU time per message (all threads): less sensitive to other load
                        "cpu_ms_per_msg": {
                            "encoder": round(enc_cpu_ms, 2),
                            "pipeline": round(pipe_cpu_ms, 2) if pipe_cpu_ms else None,
                            "pipeline_share_not_encoder": (
                                round(1 - enc_cpu_ms / pipe_cpu_ms, 3) if pipe_cpu_ms else None
                            ),
                        },
                        "encoder_busy_fraction": pipe["encoder_busy_fraction"],
                        "in_pipeline_encode_vs_standalone": (
                            round(in_pipe / enc_rate, 3) if in_pipe else None
                        ),
                        "pipeline": pipe,
                    }
                )
                last = rounds[-1]
                log(
                    f"  encoder {enc_rate:.1f}/s -> ratio {last['ratio']}, encoder busy "
                    f"{last['encoder_busy_fraction']}, in-pipeline encode speed "
                    f"{last['in_pipeline_encode_vs_standalone']}, loadavg {os.getloadavg()[0]:.1f}"
                )
            ratio = statistics.median(x["ratio"] for x in rounds)
            result: dict[str, Any] = {
                "pipeline_msgs_per_s": statistics.median(x["pipeline_msgs_per_s"] for x in rounds),
                "encoder_msgs_per_s": statistics.median(x["encoder_msgs_per_s"] for x in rounds),
                "ratio": round(ratio, 3),
                "overhead": round(1 - ratio, 3),
                "meets_target": 1 - ratio <= OVERHEAD_TARGET,
            }
            if n_rounds > 1:
                result["ratio_per_round"] = [x["ratio"] for x in rounds]
                result["rounds"] = rounds
            else:
                result.update({k: v for k, v in rounds[0].items() if k not in result})
            entry["by_max_size"][str(size)] = result
        out[name] = entry
    return out


# --------------------------------------------------------------------------------------------
# Latency at fixed rates (the router as a subprocess)


async def latency_section(
    bootstrap: str,
    tmp: Path,
    texts: Sequence[str],
    *,
    max_size: int,
    max_rate: float,
    fractions: Sequence[float],
    seconds: float,
    warmup_s: float,
) -> dict[str, Any]:
    topic = new_topic_base("latency")
    await create_topics(bootstrap, [topic, f"{topic}.out", f"{topic}.dlq"])
    config = tmp / f"{topic}.yaml"
    write_service_config(config, bootstrap=bootstrap, topic=topic, max_size=max_size)
    router = RouterProcess(config, tmp / f"{topic}.router.log")
    collector = OutputCollector(bootstrap, [f"{topic}.out", f"{topic}.dlq"])
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    phases: dict[str, Any] = {}
    expected = 0
    router.start()
    try:
        await asyncio.to_thread(router.wait_ready, 180)
        await collector.start()
        await producer.start()
        for frac in fractions:
            rate = frac * max_rate
            prefix = f"f{frac:g}-"
            log(f"latency: {frac:.0%} of {max_rate:.0f}/s = {rate:.1f} msg/s for {seconds:g}s")

            def make(i: int, prefix: str = prefix) -> tuple[str, bytes]:
                ident = f"{prefix}{i}"
                return ident, payload(ident, texts[i % len(texts)])

            sent = PacedResult()
            t0 = time.time()
            cpu_router0, cpu_bench0 = cpu_seconds(router.pid) or 0.0, time.process_time()
            await paced_produce(producer, topic, make, rate=rate, duration=seconds, result=sent)
            produce_s = time.time() - t0
            cpu_router = ((cpu_seconds(router.pid) or 0.0) - cpu_router0) / produce_s
            cpu_bench = (time.process_time() - cpu_bench0) / produce_s
            expected += len(sent.sent)
            complete = await collector.wait_for(expected, timeout=60 + seconds)
            ids = {i for i, ts in sent.sent if ts >= t0 + warmup_s}
            mine = [o for o in collector.outcomes if o.ident in ids]
            done = [o for o in collector.outcomes if o.ident and o.ident.startswith(prefix)]
            span = (max(o.processed_ms for o in done) - min(o.processed_ms for o in done)) / 1000
            phases[f"{frac:.0%}"] = {
                "target_msgs_per_s": round(rate, 1),
                "sent": len(sent.sent),
                "outcomes": len(done),
                "all_outcomes_arrived": complete,
                "achieved_msgs_per_s": round((len(done) - 1) / span, 1) if span > 0 else None,
                "kept_up": span > 0 and (len(done) - 1) / span >= 0.97 * rate,
                "producer_max_behind_ms": round(sent.max_behind_s * 1000, 1),
                "router_cpu_cores": round(cpu_router, 2),
                "benchmark_process_cpu_cores": round(cpu_bench, 2),
                "loadavg_1m": round(os.getloadavg()[0], 2),
                "measured_after_warmup": len(mine),
                "latency_ms": percentiles([o.processed_ms - o.source_ts_ms for o in mine]),
                "visible_latency_ms": percentiles(
                    [o.received * 1000 - o.source_ts_ms for o in mine]
                ),
            }
            log(f"  {phases[f'{frac:.0%}']['latency_ms']}")
            await asyncio.sleep(1.0)
    finally:
        with contextlib.suppress(Exception):
            await producer.stop()
        with contextlib.suppress(Exception):
            await collector.stop()
        stats = await asyncio.to_thread(router.stop)
    return {
        "router": "subprocess: python -m semroute_stream run --config <generated>",
        "batching_max_size": max_size,
        "max_route_only_rate": round(max_rate, 1),
        "seconds_per_rate": seconds,
        "warmup_excluded_s": warmup_s,
        "phases": phases,
        "router_stats": stats,
        "router_exit_code": router.returncode,
    }


# --------------------------------------------------------------------------------------------
# LLM mode


def balanced_llm_texts(
    encoder: Encoder, settings: Settings, n: int
) -> tuple[list[str], dict[str, Any]]:
    """``n`` texts whose endpoints come in proportion to the endpoints' max_concurrency.

    Candidates: the bundled example tickets and the CLINC150 dev queries, routed once here with
    the same routes and encoder config as the service (smooth weighted round-robin order)."""
    routes = load_routes(settings.routes)
    endpoint_of = {r.name: r.endpoint for r in routes.routes}
    endpoint_of[routes.fallback.name] = routes.fallback.endpoint
    candidates = list(dict.fromkeys(example_tickets() + short_queries(1500)))
    decided = Router(routes, encoder).route(candidates)
    pools: dict[str, list[str]] = {name: [] for name in settings.endpoints}
    for text, d in zip(candidates, decided, strict=True):
        ep = endpoint_of.get(d["route"])
        if ep in pools:
            pools[ep].append(text)
    weights = {ep: settings.endpoints[ep].max_concurrency for ep, p in pools.items() if p}
    total = sum(weights.values())
    current = dict.fromkeys(weights, 0.0)
    used = Counter[str]()
    out: list[str] = []
    for _ in range(n):
        for ep in weights:
            current[ep] += weights[ep]
        ep = max(current, key=lambda e: current[e])
        current[ep] -= total
        out.append(pools[ep][used[ep] % len(pools[ep])])
        used[ep] += 1
    info = {
        "candidate_texts_per_endpoint": {ep: len(p) for ep, p in pools.items()},
        "planned_share": {ep: round(w / total, 3) for ep, w in weights.items()},
    }
    return out, info


async def llm_section(
    bootstrap: str,
    tmp: Path,
    encoder: Encoder,
    *,
    messages: int,
    latency_s: float,
    max_size: int,
    workload: str,
    probe_seconds: float,
    stock_stub: bool,
    check_latency_s: float,
) -> dict[str, Any]:
    base = load_settings(_base_config(tmp, bootstrap))
    concurrency = {name: ep.max_concurrency for name, ep in base.endpoints.items()}
    total_conc = sum(concurrency.values())
    stub_info: dict[str, Any] = {}
    with StubProcess(latency_s, tuned=not stock_stub) as stub:
        which = "stock" if stock_stub else "tuned"
        log(f"llm: the {which} stub alone, raw client at concurrency {total_conc}")
        alone = await raw_http_capacity(stub.port, total_conc, probe_seconds)
        alone["achieved_over_bound"] = round(alone["completions_per_s"] * latency_s / total_conc, 3)
        stub_info[f"{which}_stub_raw_client"] = alone
        log(f"  {alone['completions_per_s']}/s; httpx client alone at concurrency {total_conc}")
        hx = await httpx_capacity(stub.url, total_conc, probe_seconds)
        hx["achieved_over_bound"] = round(hx["completions_per_s"] * latency_s / total_conc, 3)
        stub_info[f"{which}_stub_httpx_client"] = hx
        log(f"  {hx['completions_per_s']}/s, client CPU {hx['client_cpu_cores']} cores")
        if workload == "balanced":
            texts, plan = balanced_llm_texts(encoder, base, messages)
        else:
            ex = example_tickets()
            texts, plan = [ex[i % len(ex)] for i in range(messages)], {}
        log(f"llm: pipeline in LLM mode, {messages} messages ({workload}, {which} stub)")
        pipe = await pipeline_pass(
            bootstrap, tmp, texts, max_size=max_size, kind="llm", mode="llm", llm_url=stub.url
        )
        log(f"  {pipe['msgs_per_s']}/s, process CPU {pipe['process_cpu_cores']} cores")
    if not stock_stub:
        with StubProcess(latency_s, tuned=False) as stock:
            log("llm: the stock stub alone, raw client (for comparison)")
            alone = await raw_http_capacity(stock.port, total_conc, probe_seconds)
            alone["achieved_over_bound"] = round(
                alone["completions_per_s"] * latency_s / total_conc, 3
            )
            stub_info["stock_stub_raw_client"] = alone
            log(f"  {alone['completions_per_s']}/s")
    check: dict[str, Any] | None = None
    if check_latency_s:
        # The same pipeline with slow endpoints: a bound (total concurrency / latency) far below
        # what the router's CPU allows. Reaching it shows the concurrency machinery itself is
        # sound; a shortfall only at the fast latency points at per-request CPU cost instead.
        check_bound = min(total_conc, base.flow.max_in_flight) / check_latency_s
        n_check = max(4 * total_conc, int(check_bound * 12))
        with StubProcess(check_latency_s, tuned=not stock_stub) as slow:
            log(f"llm: check at {check_latency_s:g}s latency, {n_check} messages")
            check_pipe = await pipeline_pass(
                bootstrap,
                tmp,
                texts[:n_check],
                max_size=max_size,
                kind="llmcheck",
                mode="llm",
                llm_url=slow.url,
            )
        check = {
            "stub_latency_s": check_latency_s,
            "messages": n_check,
            "bound_msgs_per_s": round(check_bound, 1),
            "achieved_msgs_per_s": check_pipe["msgs_per_s"],
            "achieved_over_bound": round(check_pipe["msgs_per_s"] / check_bound, 3),
            "process_cpu_cores": check_pipe["process_cpu_cores"],
        }
        log(f"  {check_pipe['msgs_per_s']}/s of {check_bound:.0f}/s")
    routes = load_routes(base.routes)
    endpoint_of = {r.name: r.endpoint for r in routes.routes}
    endpoint_of[routes.fallback.name] = routes.fallback.endpoint
    per_ep = Counter[str]()
    for route, count in pipe["stats"]["routes"].items():
        per_ep[str(endpoint_of.get(route))] += count
    done = sum(per_ep.values()) or 1
    share = {ep: per_ep[ep] / done for ep in concurrency}
    naive = min(total_conc, base.flow.max_in_flight) / latency_s
    mix = min(
        (concurrency[ep] / latency_s) / s for ep, s in share.items() if s > 0
    )  # the endpoint that saturates first limits the whole stream
    achieved = pipe["msgs_per_s"]
    return {
        "stub_latency_s": latency_s,
        "workload": workload,
        "workload_plan": plan,
        "endpoints_max_concurrency": concurrency,
        "flow_max_in_flight": base.flow.max_in_flight,
        "flow_max_in_flight_per_endpoint": base.flow.max_in_flight_per_endpoint,
        "stub_tuned": not stock_stub,
        "stub_alone": stub_info,
        "achieved_msgs_per_s": achieved,
        "bound_msgs_per_s": round(naive, 1),
        "achieved_over_bound": round(achieved / naive, 3),
        "actual_endpoint_share": {ep: round(s, 3) for ep, s in share.items()},
        "mix_aware_bound_msgs_per_s": round(mix, 1),
        "achieved_over_mix_aware_bound": round(achieved / mix, 3),
        "pipeline": pipe,
        "slow_endpoint_check": check,
    }


def _base_config(tmp: Path, bootstrap: str) -> Path:
    path = tmp / "base.yaml"
    write_service_config(path, bootstrap=bootstrap, topic="unused")
    return path


# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _section(name: str, errors: dict[str, str]) -> Iterator[None]:
    """Record a failing section's error and go on with the next one."""
    try:
        yield
    except Exception as exc:
        log(f"section {name} failed:\n{traceback.format_exc()}")
        errors[name] = repr(exc)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "pipeline",
        "code": provenance(),
        "thread_env": thread_env(),
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        },
    }
    with (
        kafka_bootstrap(args.bootstrap) as (bootstrap, how),
        tempfile.TemporaryDirectory(prefix="semroute-bench-") as tmpdir,
    ):
        tmp = Path(tmpdir)
        result["broker"] = {"bootstrap": bootstrap, "from": how}
        base = load_settings(_base_config(tmp, bootstrap))
        result["settings"] = {
            "config": "config/service.example.yaml (broker, topics, max_size replaced)",
            "routes": "config/routes.example.yaml",
            "batching": base.batching.model_dump(),
            "flow": base.flow.model_dump(),
            "encoder": base.encoder.model_dump(mode="json"),
            "env_overrides": sorted(k for k in os.environ if k.startswith("SEMROUTE_")),
        }
        encoder = await asyncio.to_thread(Encoder, base.encoder)
        sections = set(args.sections)
        errors: dict[str, str] = {}
        max_rate = args.max_rate
        if "throughput" in sections:
            with _section("throughput", errors):
                every = {
                    "short": lambda: short_queries(args.short),
                    "tickets": lambda: tickets(args.tickets),
                }
                workloads = {name: every[name]() for name in args.workloads}
                sizes = {"short": args.batch_sizes, "tickets": args.ticket_batch_sizes}
                result["route_only"] = await throughput_section(
                    bootstrap, tmp, encoder, workloads, sizes, args.rounds
                )
                result["route_only"]["target_overhead_max"] = OVERHEAD_TARGET
                result["route_only"]["how_measured"] = (
                    "in-process run_service(max_messages=N) on N pre-produced messages; window = "
                    "first micro-batch in hand -> broker ack of the last outcome; encoder = "
                    "Encoder.encode in chunks of max_size on the same texts (first half before, "
                    "second half after the pipeline pass); ratio = pipeline / encoder"
                )
                if max_rate is None:
                    short = result["route_only"]["short"]["by_max_size"]
                    entry = short.get(str(args.latency_batch_size))
                    if entry is not None:
                        max_rate = entry["pipeline_msgs_per_s"]
        if "latency" in sections:
            with _section("latency", errors):
                if max_rate is None:
                    raise RuntimeError(
                        "latency needs the route-only rate: run the throughput section with "
                        f"max_size {args.latency_batch_size} or pass --max-rate"
                    )
                result["latency"] = await latency_section(
                    bootstrap,
                    tmp,
                    short_queries(10_000),
                    max_size=args.latency_batch_size,
                    max_rate=max_rate,
                    fractions=args.fractions,
                    seconds=args.latency_seconds,
                    warmup_s=args.warmup,
                )
        if "llm" in sections:
            with _section("llm", errors):
                result["llm"] = await llm_section(
                    bootstrap,
                    tmp,
                    encoder,
                    messages=args.llm_messages,
                    latency_s=args.llm_latency,
                    max_size=args.latency_batch_size,
                    workload=args.llm_workload,
                    probe_seconds=args.stub_probe_seconds,
                    stock_stub=args.stock_stub,
                    check_latency_s=args.llm_check_latency,
                )
        result["errors"] = errors
    result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    end_hash = provenance()["semroute_stream_sha256"]
    result["code"]["changed_during_run"] = end_hash != result["code"]["semroute_stream_sha256"]
    result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    return result


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one compact JSON object on stdout")
    parser.add_argument(
        "--bootstrap",
        help="HOST:PORT (default: $KAFKA_BOOTSTRAP_SERVERS, else "
        "a LocalKafka started and stopped here)",
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes and durations")
    parser.add_argument(
        "--sections",
        type=lambda s: s.split(","),
        default=["throughput", "latency", "llm"],
        help="comma-separated subset of throughput,latency,llm",
    )
    parser.add_argument(
        "--workloads",
        type=lambda s: s.split(","),
        default=["short", "tickets"],
        help="throughput workloads: short,tickets",
    )
    parser.add_argument("--short", type=int, default=None, help="short messages (default 3000)")
    parser.add_argument("--tickets", type=int, default=None, help="ticket messages (default 256)")
    parser.add_argument(
        "--batch-sizes",
        type=_ints,
        default=[32, 64, 128],
        help="batching.max_size values for short texts (default 32,64,128)",
    )
    parser.add_argument(
        "--ticket-batch-sizes",
        type=_ints,
        default=None,
        help="batching.max_size values for tickets (default 64: a ticket costs ~20x a short "
        "query to encode, so the Kafka overhead is small; sweep with 32,64,128)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="encoder/pipeline rounds per size")
    parser.add_argument("--latency-batch-size", type=int, default=64)
    parser.add_argument(
        "--max-rate",
        type=float,
        default=None,
        help="route-only rate for the latency section (default: measured)",
    )
    parser.add_argument("--fractions", type=_floats, default=[0.25, 0.5, 0.9])
    parser.add_argument("--latency-seconds", type=float, default=None, help="per rate (20)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds excluded per rate")
    parser.add_argument("--llm-messages", type=int, default=None, help="default 1500")
    parser.add_argument("--llm-latency", type=float, default=0.2, help="stub latency (s)")
    parser.add_argument(
        "--llm-check-latency",
        type=float,
        default=1.0,
        help="second LLM pass with this stub latency (bound far below the CPU limit); 0: skip",
    )
    parser.add_argument("--llm-workload", choices=["balanced", "examples"], default="balanced")
    parser.add_argument(
        "--stock-stub",
        action="store_true",
        help="run tests/llm_stub.py as shipped (default: with TCP_NODELAY and a larger backlog)",
    )
    parser.add_argument("--stub-probe-seconds", type=float, default=None, help="default 5")
    args = parser.parse_args(argv)
    quick = args.quick
    args.short = args.short or (1000 if quick else 3000)
    args.tickets = args.tickets or (128 if quick else 256)
    if args.ticket_batch_sizes is None:
        args.ticket_batch_sizes = [64]
    if quick and args.batch_sizes == [32, 64, 128]:
        args.batch_sizes = [64]
    args.latency_seconds = args.latency_seconds or (8.0 if quick else 20.0)
    args.llm_messages = args.llm_messages or (600 if quick else 1500)
    args.stub_probe_seconds = args.stub_probe_seconds or (2.0 if quick else 5.0)
    bad = set(args.sections) - {"throughput", "latency", "llm"}
    if bad:
        parser.error(f"unknown sections: {sorted(bad)}")
    result = asyncio.run(run(args))
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
