"""Encoder benchmark: every backend x precision this machine supports, side by side, in one run.

    .venv/bin/python benchmarks/encoder.py --json                  # peak + backends (~3-4 min)
    .venv/bin/python benchmarks/encoder.py --json --quick          # smaller workloads (~1 min)
    .venv/bin/python benchmarks/encoder.py --json --sections all   # + the sweeps below
    .venv/bin/python benchmarks/encoder.py                         # human-readable summary

Sections (``--sections a,b``; default ``peak,backends``):

* ``backends``: each backend x precision that ``semroute_stream._encoder.backends`` reports for this
  CPU (onnxruntime fp32, openvino fp32, openvino bf16 where the CPU has native bf16), plus what
  ``backend: auto`` / ``precision: auto`` picks, on three workloads: ``short`` (CLINC150 dev
  queries), ``tickets`` (60-200-word support tickets from a seeded generator) and ``mixed``
  (every shared dataset's dev texts plus the bundled example tickets, shuffled), encoded in
  calls of ``--call-size`` texts (256, what ``route`` reads per batch), ``--threads`` intra-op
  threads each (default: the CPUs this process may use). Per combination and workload: texts/s,
  real tokens/s, GFLOP/s of real-token work (no padding), the ratio to onnxruntime fp32, and the
  min / 1st-percentile cosine vs onnxruntime fp32 on the same texts. A round is one pass over
  the workload per combination, interleaved call by call (call 1: A,B,C; call 2: B,C,A; ...)
  so that load from other processes hits every combination alike; rates are the medians of
  the rounds, ratios the median of the per-round ratios. Tickets go in calls of 32
  (``--ticket-call-size``), so that a call lasts about as long as one of 256 short texts.
  The mixed set is timed on its first 2,048 texts (``--mixed-timed``); its cosines cover all.
  ``loadavg_per_round`` and ``preempted_per_s`` (involuntary context switches of this process
  per second while a combination ran) say how busy the machine was: on 2 cores shared with
  other jobs, OpenVINO's lead over onnxruntime shrinks, and can invert, as the load rises.
* ``peak``: GFLOP/s of fp32 (and bf16) GEMMs through ONNX Runtime's MLAS, OpenVINO's CPU
  plugin and numpy's BLAS: the best fp32 figure is an achievable-peak estimate, which
  ``backends`` divides each combination's GFLOP/s of real-token work by.
* ``batch_sizes``: texts/s by texts per call (short queries and tickets), per combination.
* ``mixed_batch``: 56 queries + 8 tickets per call, length-bucketed vs one padded batch.
* ``threads``: batch-1 latency and batch-32 throughput with 1 or 2 intra-op threads (and, for
  onnxruntime, spinning off/on).
* ``build``: the time to build the ONNX model from the weights package.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from semroute_stream._encoder import Encoder, EncoderConfig  # noqa: E402
from semroute_stream._encoder.default_model import (  # noqa: E402
    build_minilm_onnx,
    locate_weights_dir,
    provision_default_model,
)

DATASETS = REPO.parent / "shared" / "datasets"
DATASET = DATASETS / "clinc150" / "dev.jsonl"
EXAMPLE_TICKETS = REPO / "semroute_stream" / "examples" / "tickets.jsonl"
BATCH_SIZES = (1, 8, 32, 64, 128)

# ------------------------------------------------------------------------------------------------
# Workloads
# ------------------------------------------------------------------------------------------------

_FALLBACK_QUERIES = [
    "how do i reset my password",
    "what is my account balance",
    "cancel my order from yesterday",
    "i was charged twice this month",
    "the app keeps crashing on my phone",
    "can you tell me a joke",
    "what's the weather like tomorrow",
    "book a table for two at 7pm",
]


def short_queries(limit: int) -> list[str]:
    """CLINC150 dev queries (deterministic order); a small fallback list if the file is absent."""
    texts: list[str] = []
    if DATASET.is_file():
        with DATASET.open(encoding="utf-8") as fh:
            texts = [json.loads(line)["text"] for line in fh if line.strip()]
    if not texts:
        texts = _FALLBACK_QUERIES
    rng = random.Random(7)
    texts = texts[:]
    rng.shuffle(texts)
    return [texts[i % len(texts)] for i in range(limit)]


_OPENERS = [
    "Hello support team,",
    "Hi,",
    "Good morning,",
    "Dear customer service,",
    "To whom it may concern,",
]
_PRODUCTS = ["reporting dashboard", "mobile app", "billing portal", "API", "admin console", "SSO"]
_PROBLEMS = [
    "returns a {code} error whenever we try to {action}",
    "has been extremely slow since {when}, pages take more than {n} seconds to load",
    "stopped syncing data with {tool} after {when}",
    "shows the wrong totals for {period} even though the raw data looks correct",
    "logs our users out every few minutes and they have to sign in again",
    "crashes on startup for about {n} of our {m} employees",
]
_ACTIONS = ["export a report", "upload a CSV file", "invite new users", "change the plan", "pay"]
_WHEN = ["the maintenance window last Tuesday", "yesterday's update", "the migration", "Monday"]
_TOOLS = ["Salesforce", "HubSpot", "Slack", "Jira", "our data warehouse"]
_PERIODS = ["last month", "the third quarter", "the previous week", "fiscal year 2023"]
_DETAILS = [
    "We already cleared the browser cache and tried different browsers without any change.",
    "Our IT department checked the firewall and nothing is blocked on our side.",
    "The issue affects both the web version and the desktop application.",
    "I attached screenshots and the HAR file from the browser's network tab.",
    "Restarting the application helps for a few minutes, then the problem comes back.",
    "This started right after we added around forty new seats to our subscription.",
    "Our account number is {n}{m} and we are on the enterprise plan.",
    "Several customers have complained and we are losing orders because of it.",
    "We have a board meeting on Friday and urgently need the numbers to be correct.",
    "The status page says all systems are operational, which does not match what we see.",
]
_CLOSERS = [
    "Could you please look into this as soon as possible?",
    "Please escalate this ticket, it is blocking our whole team.",
    "Let me know if you need any more information from us.",
    "Thanks in advance for your help.",
    "Can someone call me back today?",
]


def synth_ticket(rng: random.Random) -> str:
    """One 60-200-word support ticket."""
    target = rng.randint(60, 200)

    def fill(template: str) -> str:
        return template.format(
            code=rng.choice(["500", "502", "403", "429", "504"]),
            action=rng.choice(_ACTIONS),
            when=rng.choice(_WHEN),
            tool=rng.choice(_TOOLS),
            period=rng.choice(_PERIODS),
            n=rng.randint(2, 90),
            m=rng.randint(100, 900),
        )

    parts = [
        rng.choice(_OPENERS),
        f"our {rng.choice(_PRODUCTS)} {fill(rng.choice(_PROBLEMS))}.",
    ]
    words = sum(len(p.split()) for p in parts)
    while words < target - 10:
        sentence = fill(rng.choice(_DETAILS + [f"Also, the {{tool}} {p}." for p in _PROBLEMS]))
        parts.append(sentence)
        words += len(sentence.split())
    parts.append(rng.choice(_CLOSERS))
    text = " ".join(parts)
    return " ".join(text.split()[:200])


def tickets(limit: int, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    return [synth_ticket(rng) for _ in range(limit)]


# ------------------------------------------------------------------------------------------------
# Measurement helpers
# ------------------------------------------------------------------------------------------------


def chunks(texts: Sequence[str], size: int) -> list[list[str]]:
    return [list(texts[i : i + size]) for i in range(0, len(texts), size)]


def timed_pass(encoder: Encoder, calls: list[list[str]], budget: float) -> tuple[float, int]:
    """Encode call after call until ``budget`` seconds passed (at least one call).

    Returns (elapsed seconds, number of texts encoded)."""
    done = 0
    start = time.perf_counter()
    elapsed = 0.0
    i = 0
    while True:
        call = calls[i % len(calls)]
        encoder.encode(call)
        done += len(call)
        i += 1
        elapsed = time.perf_counter() - start
        if elapsed >= budget or (i >= len(calls) and elapsed >= budget / 2):
            break
    return elapsed, done


def padding_stats(encoder: Encoder, texts: Sequence[str]) -> dict[str, float]:
    batches = encoder.prepare(texts)
    real = int(sum(int(b.attention_mask.sum()) for b in batches))
    padded = int(sum(b.input_ids.size for b in batches))
    return {
        "real_tokens": real,
        "padded_tokens": padded,
        "padding_efficiency": round(real / padded, 4) if padded else 1.0,
        "model_calls": len(batches),
    }


def throughput(
    encoder: Encoder, texts: Sequence[str], batch_size: int, budget: float
) -> dict[str, float]:
    calls = chunks(texts, batch_size)
    tokens_per_text = sum(encoder.count_tokens(texts)) / len(texts)
    elapsed, done = timed_pass(encoder, calls, budget)
    pad = [padding_stats(encoder, c) for c in calls]
    real = sum(p["real_tokens"] for p in pad)
    padded = sum(p["padded_tokens"] for p in pad)
    return {
        "sentences_per_s": round(done / elapsed, 1),
        "tokens_per_s": round(done * tokens_per_text / elapsed, 0),
        "ms_per_call": round(1000 * elapsed / max(1, done / batch_size), 2),
        "padding_efficiency": round(real / padded, 4),
    }


def interleaved(variants: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Run each variant once per round, in rotating order; returns the rates per variant."""
    results: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            results[name].append(variants[name]())
    return results


def median_ratio(a: list[float], b: list[float]) -> float:
    return round(statistics.median(x / y for x, y in zip(a, b, strict=True)), 3)


# ------------------------------------------------------------------------------------------------
# Mixed set, model FLOPs, CPU features
# ------------------------------------------------------------------------------------------------


def dev_texts() -> list[str]:
    """Every shared dataset's dev texts (``../shared/datasets/*/dev.jsonl``), in file order."""
    texts: list[str] = []
    for path in sorted(DATASETS.glob("*/dev.jsonl")):
        with path.open(encoding="utf-8") as fh:
            texts += [json.loads(line)["text"] for line in fh if line.strip()]
    return texts


def mixed_texts(limit: int | None, seed: int = 11) -> list[str]:
    """Every shared dataset's dev texts (``../shared/datasets/*/dev.jsonl``) plus the bundled
    example tickets, shuffled (seeded) so that every call mixes lengths as a stream does;
    ``limit`` keeps the first ``limit`` after shuffling (None: all)."""
    texts = dev_texts()
    with EXAMPLE_TICKETS.open(encoding="utf-8") as fh:
        texts += [json.loads(line)["text"] for line in fh if line.strip()]
    if not texts:
        texts = list(_FALLBACK_QUERIES)
    random.Random(seed).shuffle(texts)
    return texts if limit is None else texts[:limit]


class ModelCost(NamedTuple):
    """FLOPs of one text of ``L`` real tokens: ``2 * matmul_params * L`` (every weight
    matrix) ``+ 4 * layers * hidden * L**2`` (QK^T and attention x V); the embedding lookup,
    layer norms, GELU and softmax are left out (a few percent)."""

    matmul_params: int
    layers: int
    hidden: int
    source: str

    def flops(self, lengths: Sequence[int]) -> float:
        lens = np.asarray(lengths, dtype=np.float64)
        linear = 2.0 * self.matmul_params * lens.sum()
        attention = 4.0 * self.layers * self.hidden * float((lens**2).sum())
        return float(linear + attention)


def model_cost(model_file: Path, hidden: int) -> ModelCost:
    """Counted from the ONNX graph (weights feeding MatMul/Gemm, Softmax nodes = layers);
    all-MiniLM-L6-v2's figures when the graph cannot be read."""
    try:
        import onnx

        graph = onnx.load(str(model_file), load_external_data=False).graph
        shapes = {init.name: list(init.dims) for init in graph.initializer}
        params = 0
        layers = 0
        for node in graph.node:
            if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1:
                dims = shapes.get(node.input[1])
                if dims is not None and len(dims) == 2:
                    params += int(dims[0]) * int(dims[1])
            layers += node.op_type == "Softmax"
        if params and layers:
            return ModelCost(params, layers, hidden, f"counted in {model_file.name}")
    except Exception as exc:  # pragma: no cover - onnx missing or an unusual graph
        log_err(f"model FLOPs: cannot read {model_file} ({exc}); using MiniLM-L6's")
    return ModelCost(6 * (4 * 384 * 384 + 2 * 384 * 1536), 6, 384, "all-MiniLM-L6-v2 constants")


def log_err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# Peak probe
# ------------------------------------------------------------------------------------------------


def _timed_rate(
    step: Callable[[], None], flops: float, seconds: float, windows: int
) -> list[float]:
    step()  # warm-up (and, for OpenVINO, the first-inference set-up)
    rates: list[float] = []
    for _ in range(windows):
        n = 0
        start = time.perf_counter()
        while True:
            step()
            n += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds / windows:
                break
        rates.append(n * flops / elapsed / 1e9)
    return rates


def _ort_gemm(m: int, k: int, n: int, threads: int, rng: np.random.Generator) -> Callable[[], None]:
    """One MatMul (x[m, k] @ constant w[k, n]) as an ONNX Runtime session: MLAS's SGEMM."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "gemm_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    feed = {"x": rng.standard_normal((m, k)).astype(np.float32)}

    def step() -> None:
        session.run(None, feed)

    return step


def peak_probe(threads: int, seconds: float) -> dict[str, Any]:
    """GFLOP/s of a large GEMM (2048^3) and of the model's FFN shape (2048 tokens x 384 ->
    1536) through ONNX Runtime's MLAS (fp32), OpenVINO's CPU plugin (fp32 and bf16; the kernel
    it picked is reported) and numpy's BLAS; each the best of 6 short windows (the quietest
    moments when other processes load the machine). The largest fp32
    figure is the achievable-peak estimate; the datasheet peak would need the boost clock,
    which a VM does not show."""
    out: dict[str, Any] = {"threads": threads}
    rng = np.random.default_rng(0)
    shapes = {"square_2048": (2048, 2048, 2048), "ffn_2048x384x1536": (2048, 384, 1536)}
    per = seconds / 9
    for shape_name, (m, k, n) in shapes.items():
        try:
            ort_rates = _timed_rate(_ort_gemm(m, k, n, threads, rng), 2.0 * m * k * n, per, 6)
            out[f"onnxruntime_f32_{shape_name}"] = {
                "gflops_max": round(max(ort_rates), 1),
                "gflops_median": round(statistics.median(ort_rates), 1),
                "kernel": "MLAS sgemm",
            }
        except Exception as exc:  # pragma: no cover - onnx missing
            out[f"onnxruntime_f32_{shape_name}"] = f"unavailable: {exc}"
    try:
        from semroute_stream._encoder.backends import import_openvino

        ov = import_openvino()  # without its telemetry, as the product imports it
        from openvino import opset13 as ops

        core = ov.Core()
        for shape_name, (m, k, n) in shapes.items():
            x = ops.parameter([m, k], np.float32, name="x")
            w = ops.constant(rng.standard_normal((k, n)).astype(np.float32))
            model = ov.Model([ops.matmul(x, w, False, False)], [x], "gemm_probe")
            a = rng.standard_normal((m, k)).astype(np.float32)
            for hint in ("f32", "bf16"):
                compiled = core.compile_model(
                    model,
                    "CPU",
                    {
                        "INFERENCE_PRECISION_HINT": hint,
                        "INFERENCE_NUM_THREADS": threads,
                        "PERFORMANCE_HINT": "LATENCY",
                    },
                )
                request = compiled.create_infer_request()

                def step(request: Any = request, a: np.ndarray = a) -> None:
                    request.infer({0: a})

                rates = _timed_rate(step, 2.0 * m * k * n, per, 6)
                kernel = "?"
                for op in compiled.get_runtime_model().get_ordered_ops():
                    info = op.get_rt_info()
                    if str(info["layerType"].astype(str)) in ("FullyConnected", "MatMul"):
                        kernel = str(info["primitiveType"].astype(str))
                out[f"openvino_{hint}_{shape_name}"] = {
                    "gflops_max": round(max(rates), 1),
                    "gflops_median": round(statistics.median(rates), 1),
                    "kernel": kernel,
                }
    except Exception as exc:  # pragma: no cover - no OpenVINO
        out["openvino"] = f"unavailable: {exc}"
    a = rng.standard_normal((2048, 2048)).astype(np.float32)
    b = rng.standard_normal((2048, 2048)).astype(np.float32)

    def gemm() -> None:
        np.matmul(a, b)

    rates = _timed_rate(gemm, 2.0 * 2048**3, per, 6)
    blas = "?"
    try:
        from threadpoolctl import threadpool_info

        info = [i for i in threadpool_info() if i.get("user_api") == "blas"]
        if info:
            lib = info[0]
            blas = f"{lib.get('internal_api')} {lib.get('architecture')} x{lib.get('num_threads')}"
    except Exception:  # pragma: no cover - threadpoolctl missing
        pass
    out["numpy_f32_square_2048"] = {
        "gflops_max": round(max(rates), 1),
        "gflops_median": round(statistics.median(rates), 1),
        "blas": blas,
    }
    f32 = [
        v["gflops_max"]
        for k, v in out.items()
        if isinstance(v, dict) and "_f32_" in k and "gflops_max" in v
    ]
    out["fp32_best_gflops"] = max(f32) if f32 else None
    return out


PEAK_NOTE = (
    "fp32_peak_estimate_gflops is the best fp32 GEMM of the probes run before and after the "
    "backends section (an achievable peak, below the datasheet's clock x FMA-width figure, and "
    "lower while other processes load the machine); fraction_of_fp32_peak divides a "
    "combination's median GFLOP/s of real-token work by it, fraction_of_fp32_peak_best_round "
    "its best round's (best vs best, the least load-sensitive)"
)


def add_peak_fractions(result: dict[str, Any], peak: float) -> None:
    """Each backend row's GFLOP/s as a fraction of ``peak``; flags a probe that ran while the
    machine was busier than during the workloads (an fp32 combination above 1; bf16 may well
    pass the fp32 peak)."""
    top = 0.0
    for workload in result["backends"]["workloads"].values():
        for key, row in workload["results"].items():
            row["fraction_of_fp32_peak"] = round(row["gflops_real_tokens"] / peak, 3)
            row["fraction_of_fp32_peak_best_round"] = round(row["gflops_best_round"] / peak, 3)
            if key.endswith("/fp32"):
                top = max(top, row["fraction_of_fp32_peak_best_round"])
    if top > 1.0:
        result["peak"]["unreliable"] = (
            f"an fp32 combination ran {top:.2f}x the probes' best fp32 GEMM: the probes ran while "
            "other processes loaded the machine more than during the workloads"
        )


# ------------------------------------------------------------------------------------------------
# Backends x precisions
# ------------------------------------------------------------------------------------------------

BASELINE = "onnxruntime/fp32"


def combinations() -> list[tuple[str, str]]:
    """(backend, precision) pairs this machine supports, onnxruntime fp32 first."""
    from semroute_stream._encoder.backends import (
        available_backends,
        cpu_features,
        supported_precisions,
    )

    features = cpu_features()
    pairs = [
        (backend, precision)
        for backend in available_backends()
        for precision in supported_precisions(backend, features)
    ]
    order = {"fp32": 0, "bf16": 1}
    pairs.sort(key=lambda p: (f"{p[0]}/{p[1]}" != BASELINE, p[0], order.get(p[1], 2)))
    return pairs


def load_encoder(config: EncoderConfig) -> tuple[Encoder, dict[str, Any]]:
    """The encoder, with its load time and first-call latencies."""
    t0 = time.perf_counter()
    encoder = Encoder(config)
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    encoder.encode(["how do i reset my password"])
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    encoder.encode(["how do i reset my password"])
    second = time.perf_counter() - t0
    return encoder, {
        "backend": encoder.backend,
        "precision": encoder.precision,
        "fidelity": encoder.fidelity,
        "load_seconds": round(load, 2),
        "first_query_ms": round(1000 * first, 2),
        "second_query_ms": round(1000 * second, 2),
    }


def cosines(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    cos = np.sum(a.astype(np.float64) * b.astype(np.float64), axis=1)
    return {
        "min_cosine": round(float(cos.min()), 7),
        "p1_cosine": round(float(np.percentile(cos, 1)), 7),
        "mean_cosine": round(float(cos.mean()), 7),
    }


class Interleaved(NamedTuple):
    rates: dict[str, list[float]]  # texts/s per encoder per round
    preempted_per_s: dict[str, float]  # involuntary context switches of this process per s
    loadavg: list[float]  # the 1-minute load average after each round


def interleaved_calls(
    encoders: dict[str, Encoder], calls: list[list[str]], rounds: int
) -> Interleaved:
    """``rounds`` passes over ``calls`` for every encoder, interleaved call by call: each call
    is encoded by every encoder in turn (the order rotating from call to call), so that load
    from other processes, which changes within seconds, hits every encoder alike. Also counts
    how often the process was preempted while each encoder ran (``ru_nivcsw``)."""
    names = list(encoders)
    n = sum(len(call) for call in calls)
    rates: dict[str, list[float]] = {name: [] for name in names}
    switches = dict.fromkeys(names, 0)
    total = dict.fromkeys(names, 0.0)
    loads: list[float] = []
    turn = 0
    for _ in range(rounds):
        spent = dict.fromkeys(names, 0.0)
        for call in calls:
            k = turn % len(names)
            turn += 1
            for name in names[k:] + names[:k]:
                before = resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw
                t0 = time.perf_counter()
                encoders[name].encode(call)
                spent[name] += time.perf_counter() - t0
                switches[name] += resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw - before
        for name in names:
            rates[name].append(n / spent[name])
            total[name] += spent[name]
        loads.append(round(os.getloadavg()[0], 2))
    preempted = {name: round(switches[name] / total[name], 1) for name in names}
    return Interleaved(rates, preempted, loads)


def backends_section(
    args: argparse.Namespace,
    workloads: dict[str, list[str]],
    cost: ModelCost,
    counter: Encoder,
) -> dict[str, Any]:
    """Every backend x precision on every workload, repetitions interleaved."""
    pairs = combinations()
    encoders: dict[str, Encoder] = {}
    loads: dict[str, Any] = {}
    for backend, precision in pairs:
        key = f"{backend}/{precision}"
        config = EncoderConfig(
            cache_dir=args.cache_dir,
            backend=backend,  # type: ignore[arg-type]
            precision=precision,  # type: ignore[arg-type]
            intra_op_threads=args.threads,
        )
        try:
            encoders[key], loads[key] = load_encoder(config)
        except Exception as exc:
            loads[key] = {"error": f"{type(exc).__name__}: {exc}"}
        log_err(f"{key}: {loads[key]}")
    auto_config = EncoderConfig(cache_dir=args.cache_dir, intra_op_threads=args.threads)
    auto, auto_load = load_encoder(auto_config)
    del auto
    log_err(f"auto: {auto_load}")
    baseline = BASELINE if BASELINE in encoders else next(iter(encoders))

    out: dict[str, Any] = {
        "combinations": [f"{b}/{p}" for b, p in pairs],
        "baseline": baseline,
        "threads": args.threads,
        "rounds": args.rounds,
        "interleaving": "call by call: each call encoded by every combination in turn",
        "auto_choice": auto_load,
        "load": loads,
        "workloads": {},
    }
    summary: dict[str, dict[str, Any]] = {}
    for name, texts in workloads.items():
        call_size = args.ticket_call_size if name == "tickets" else args.call_size
        calls = chunks(texts, call_size)
        timed = texts[: args.mixed_timed] if name == "mixed" and args.mixed_timed else texts
        timed_calls = chunks(timed, call_size)
        lengths = counter.count_tokens(timed)
        tokens_per_text = sum(lengths) / len(timed)
        flops_per_text = cost.flops(lengths) / len(timed)
        embeddings: dict[str, np.ndarray] = {}
        warmup: dict[str, float] = {}
        for key, enc in encoders.items():  # untimed first pass: warm-up + the embeddings
            t0 = time.perf_counter()
            embeddings[key] = np.concatenate([enc.encode(c) for c in calls])
            warmup[key] = time.perf_counter() - t0

        measured = interleaved_calls(encoders, timed_calls, args.rounds)
        rates = measured.rates
        rows: dict[str, Any] = {}
        for key, values in rates.items():
            rate = statistics.median(values)
            gflops = rate * flops_per_text / 1e9
            row: dict[str, Any] = {
                "texts_per_s": round(rate, 1),
                "tokens_per_s": round(rate * tokens_per_text),
                "gflops_real_tokens": round(gflops, 1),
                "ratio_to_baseline": median_ratio(values, rates[baseline]),
                "ratio_per_round": [
                    round(x / y, 3) for x, y in zip(values, rates[baseline], strict=True)
                ],
                "texts_per_s_per_round": [round(v, 1) for v in values],
                "preempted_per_s": measured.preempted_per_s[key],
                "warmup_pass_seconds": round(warmup[key], 2),
                "median_pass_seconds": round(len(timed) / rate, 2),
                **cosines(embeddings[key], embeddings[baseline]),
            }
            row["gflops_best_round"] = round(max(values) * flops_per_text / 1e9, 1)
            rows[key] = row
            summary.setdefault(name, {})[key] = {
                "texts_per_s": row["texts_per_s"],
                "tokens_per_s": row["tokens_per_s"],
                "ratio": row["ratio_to_baseline"],
                "min_cosine": row["min_cosine"],
            }
        out["workloads"][name] = {
            "texts": len(texts),
            "texts_timed": len(timed),
            "call_size": call_size,
            "calls_timed": len(timed_calls),
            "mean_tokens": round(tokens_per_text, 1),
            "max_tokens": max(lengths),
            "gflop_per_text": round(flops_per_text / 1e9, 4),
            "loadavg_per_round": measured.loadavg,
            "results": rows,
        }
        log_err(f"{name}: {json.dumps(summary[name])}")
    out["summary"] = summary
    return out


# ------------------------------------------------------------------------------------------------
# The earlier report: batch-size sweep, bucketing vs padding, threads, build time
# ------------------------------------------------------------------------------------------------


def rate_of(enc: Encoder, sets: list[list[str]], seconds: float) -> Callable[[], float]:
    def measure() -> float:
        elapsed, done = timed_pass(enc, sets, seconds)
        return done / elapsed

    return measure


def batch_size_section(
    args: argparse.Namespace, queries: list[str], ticket_texts: list[str]
) -> dict[str, Any]:
    """Texts/s by texts per encode() call, for every backend x precision."""
    out: dict[str, Any] = {}
    for backend, precision in combinations():
        key = f"{backend}/{precision}"
        enc = Encoder(
            EncoderConfig(
                cache_dir=args.cache_dir,
                backend=backend,  # type: ignore[arg-type]
                precision=precision,  # type: ignore[arg-type]
                intra_op_threads=args.threads,
            )
        )
        out[key] = {}
        for name, texts in (("short", queries), ("ticket", ticket_texts)):
            out[key][name] = {}
            for bs in args.batch_sizes:
                sample = texts[: max(bs, min(len(texts), bs * 4))]
                enc.encode(sample[:bs])
                r = throughput(enc, sample, bs, args.seconds)
                out[key][name][str(bs)] = r
                log_err(f"{key} {name:6s} batch {bs:4d}: {r}")
        del enc
    return out


def mixed_batch_section(
    args: argparse.Namespace, queries: list[str], ticket_texts: list[str]
) -> dict[str, Any]:
    """64 texts per call (56 queries + 8 tickets): bucketed vs one padded batch, with the
    backend and precision ``auto`` picks."""
    rng = random.Random(99)
    mixed_sets = []
    for k in range(4):
        batch = queries[k * 56 : (k + 1) * 56] + ticket_texts[k * 8 : (k + 1) * 8]
        rng.shuffle(batch)
        mixed_sets.append(batch)
    encoder = Encoder(EncoderConfig(cache_dir=args.cache_dir, intra_op_threads=args.threads))
    naive = Encoder(
        EncoderConfig(
            cache_dir=args.cache_dir,
            intra_op_threads=args.threads,
            backend=encoder.backend,  # type: ignore[arg-type]
            precision=encoder.precision,  # type: ignore[arg-type]
            sort_by_length=False,
            max_batch_size=10**6,
            max_batch_tokens=10**9,
        )
    )
    naive.encode(mixed_sets[0])
    encoder.encode(mixed_sets[0])
    mixed = interleaved(
        {
            "bucketed": rate_of(encoder, mixed_sets, args.seconds),
            "naive": rate_of(naive, mixed_sets, args.seconds),
        },
        args.rounds,
    )
    mixed_tokens = sum(sum(encoder.count_tokens(s)) for s in mixed_sets) / sum(
        len(s) for s in mixed_sets
    )
    return {
        "description": "64 texts per call: 56 CLINC150 queries + 8 synthetic tickets, shuffled",
        "backend": encoder.backend,
        "precision": encoder.precision,
        "bucketed": {
            "sentences_per_s": round(statistics.median(mixed["bucketed"]), 1),
            "tokens_per_s": round(statistics.median(mixed["bucketed"]) * mixed_tokens, 0),
            **padding_stats(encoder, mixed_sets[0]),
        },
        "naive": {
            "sentences_per_s": round(statistics.median(mixed["naive"]), 1),
            "tokens_per_s": round(statistics.median(mixed["naive"]) * mixed_tokens, 0),
            **padding_stats(naive, mixed_sets[0]),
        },
        "speedup_bucketed_over_naive": median_ratio(mixed["bucketed"], mixed["naive"]),
        "speedup_per_round": [
            round(a / b, 3) for a, b in zip(mixed["bucketed"], mixed["naive"], strict=True)
        ],
    }


def threads_section(args: argparse.Namespace, queries: list[str]) -> dict[str, Any]:
    """Batch-1 latency and batch-32 throughput (short queries): onnxruntime fp32 with 1 or 2
    intra-op threads and spinning off/on; every other backend x precision with 1 or 2."""
    variants: dict[str, Encoder] = {}
    for backend, precision in combinations():
        spins = (False, True) if backend == "onnxruntime" else (False,)
        for n in (1, 2):
            for spin in spins:
                name = f"{backend}/{precision}/intra{n}" + (
                    f"_spin{int(spin)}" if backend == "onnxruntime" else ""
                )
                variants[name] = Encoder(
                    EncoderConfig(
                        cache_dir=args.cache_dir,
                        backend=backend,  # type: ignore[arg-type]
                        precision=precision,  # type: ignore[arg-type]
                        intra_op_threads=n,
                        allow_spinning=spin,
                    )
                )
    single_calls = [[q] for q in queries[:64]]
    batch_calls = chunks(queries[:256], 32)
    for enc in variants.values():
        enc.encode(batch_calls[0])
    half = args.seconds / 2
    b1 = interleaved({k: rate_of(v, single_calls, half) for k, v in variants.items()}, args.rounds)
    b32 = interleaved({k: rate_of(v, batch_calls, half) for k, v in variants.items()}, args.rounds)
    out: dict[str, Any] = {
        name: {
            "batch1_ms_per_query": round(1000 / statistics.median(b1[name]), 2),
            "batch32_sentences_per_s": round(statistics.median(b32[name]), 1),
        }
        for name in variants
    }
    speedups: dict[str, Any] = {}
    for name in variants:
        if "/intra2" in name and not name.endswith("_spin1"):
            one = name.replace("/intra2", "/intra1")
            speedups[name.replace("/intra2", "").replace("_spin0", "")] = {
                "batch1": median_ratio(b1[name], b1[one]),
                "batch32": median_ratio(b32[name], b32[one]),
            }
    out["speedup_2_over_1_threads"] = speedups
    on, off = f"{BASELINE}/intra2_spin1", f"{BASELINE}/intra2_spin0"
    if on in variants and off in variants:
        out["speedup_spin_on_over_off_onnxruntime_2_threads"] = {
            "batch1": median_ratio(b1[on], b1[off]),
            "batch32": median_ratio(b32[on], b32[off]),
        }
    return out


def build_section() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="semroute-bench-") as tmp:
        t0 = time.perf_counter()
        build_minilm_onnx(locate_weights_dir() / "model.safetensors", Path(tmp) / "model.onnx")
        return {"build_seconds": round(time.perf_counter() - t0, 2)}


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------

SECTIONS = ("peak", "backends", "batch_sizes", "mixed_batch", "threads", "build")
DEFAULT_SECTIONS = ("peak", "backends")


def machine_info() -> dict[str, Any]:
    import onnxruntime

    from semroute_stream._encoder.backends import available_backends, cpu_features, import_openvino

    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    try:
        info["openvino"] = import_openvino().__version__
    except ImportError:
        info["openvino"] = None
    info["available_backends"] = list(available_backends())
    info["cpu_features"] = cpu_features().as_dict()
    info["thread_env"] = {
        name: os.environ.get(name)
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TOKENIZERS_PARALLELISM")
    }
    return info


def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    result: dict[str, Any] = {"machine": machine_info(), "sections": list(args.sections)}
    result["machine"]["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    log_err(f"cpu features: {json.dumps(result['machine']['cpu_features'])}")
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    model_dir = provision_default_model(args.cache_dir)
    provision_seconds = time.perf_counter() - t0
    counter = Encoder(
        EncoderConfig(cache_dir=args.cache_dir, backend="onnxruntime", precision="fp32")
    )
    cost = model_cost(model_dir / "model.onnx", counter.dim)
    result["model"] = {
        "name": counter.model_name,
        "dim": counter.dim,
        "max_length": counter.max_length,
        "dir": str(model_dir),
        "provision_cached_seconds": round(provision_seconds, 3),
        "flops": {**cost._asdict(), "formula": ModelCost.__doc__},
    }
    if "build" in args.sections:
        result["model"].update(build_section())

    queries = short_queries(args.short)
    ticket_texts = tickets(args.tickets)
    workloads = {"short": queries, "tickets": ticket_texts, "mixed": mixed_texts(args.mixed)}

    if "peak" in args.sections:
        t0 = time.perf_counter()
        result["peak"] = {"before": peak_probe(args.threads, args.peak_seconds)}
        timings["peak"] = time.perf_counter() - t0
        log_err(f"peak: {json.dumps(result['peak'])}")
    if "backends" in args.sections:
        t0 = time.perf_counter()
        result["backends"] = backends_section(args, workloads, cost, counter)
        timings["backends"] = time.perf_counter() - t0
    if "peak" in args.sections:
        t0 = time.perf_counter()
        if "backends" in args.sections:
            result["peak"]["after"] = peak_probe(args.threads, args.peak_seconds / 2)
        best = [p["fp32_best_gflops"] for p in result["peak"].values() if p["fp32_best_gflops"]]
        result["peak"]["fp32_peak_estimate_gflops"] = max(best) if best else None
        result["peak"]["note"] = PEAK_NOTE
        if best and "backends" in args.sections:
            add_peak_fractions(result, max(best))
        timings["peak"] += time.perf_counter() - t0
    if "batch_sizes" in args.sections:
        t0 = time.perf_counter()
        result["throughput_by_batch_size"] = batch_size_section(args, queries, ticket_texts)
        timings["batch_sizes"] = time.perf_counter() - t0
    if "mixed_batch" in args.sections:
        t0 = time.perf_counter()
        result["mixed_batch"] = mixed_batch_section(args, queries, ticket_texts)
        timings["mixed_batch"] = time.perf_counter() - t0
        log_err(f"mixed batch: {json.dumps(result['mixed_batch'])}")
    if "threads" in args.sections:
        t0 = time.perf_counter()
        result["threads"] = threads_section(args, queries)
        timings["threads"] = time.perf_counter() - t0
        log_err(f"threads: {json.dumps(result['threads'])}")

    result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["section_seconds"] = {k: round(v, 1) for k, v in timings.items()}
    result["elapsed_seconds"] = round(time.perf_counter() - t_start, 1)
    return result


def print_summary(result: dict[str, Any]) -> None:
    features = result["machine"]["cpu_features"]
    print(f"cpu: {json.dumps(features)}")
    if "peak" in result:
        print(f"fp32 GEMM peak estimate: {result['peak']['fp32_peak_estimate_gflops']} GFLOP/s")
    backends = result.get("backends")
    if backends:
        print(f"auto picks: {backends['auto_choice']}")
        for name, w in backends["workloads"].items():
            print(f"\n{name}: {w['texts']} texts, {w['mean_tokens']} tokens on average")
            for key, r in w["results"].items():
                print(
                    f"  {key:<20} {r['texts_per_s']:>8.1f} texts/s {r['tokens_per_s']:>8} tok/s "
                    f"{r['gflops_real_tokens']:>6.1f} GFLOP/s  x{r['ratio_to_baseline']:<6} "
                    f"min cos {r['min_cosine']:.6f}  p1 {r['p1_cosine']:.6f}"
                )
    others = {k: v for k, v in result.items() if k not in ("machine", "backends", "peak")}
    print(json.dumps(others, indent=2))
    print(f"\nelapsed {result['elapsed_seconds']} s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--quick", action="store_true", help="smaller workloads, shorter timing")
    parser.add_argument(
        "--sections",
        default=",".join(DEFAULT_SECTIONS),
        help=f"comma-separated, or 'all': {','.join(SECTIONS)} (default: %(default)s)",
    )
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--call-size", type=int, default=256, help="texts per encode() call")
    parser.add_argument(
        "--ticket-call-size", type=int, default=32, help="tickets per encode() call (32)"
    )
    parser.add_argument("--short", type=int, default=None, help="short queries (512)")
    parser.add_argument("--tickets", type=int, default=None, help="synthetic tickets (96)")
    parser.add_argument("--mixed", type=int, default=None, help="mixed texts (all, ~4,140)")
    parser.add_argument("--seconds", type=float, default=None, help="time per sweep point")
    parser.add_argument("--peak-seconds", type=float, default=None, help="GEMM probe time")
    parser.add_argument("--rounds", type=int, default=None, help="rounds for in-run ratios (5)")
    parser.add_argument(
        "--mixed-timed",
        type=int,
        default=None,
        help="mixed texts timed (2048); the cosines use all of them",
    )
    parser.add_argument(
        "--batch-sizes",
        type=lambda s: [int(x) for x in s.split(",")],
        default=list(BATCH_SIZES),
        help="comma-separated texts per encode() call (default 1,8,32,64,128)",
    )
    parser.add_argument("--cache-dir", type=Path, default=None, help="model cache root")
    args = parser.parse_args(argv)
    sections = SECTIONS if args.sections == "all" else tuple(args.sections.split(","))
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {','.join(SECTIONS)} or all")
    args.sections = sections
    if args.seconds is None:
        args.seconds = 0.6 if args.quick else 1.5
    if args.peak_seconds is None:
        args.peak_seconds = 4.0 if args.quick else 8.0
    if args.short is None:
        args.short = 256 if args.quick else 512
    if args.tickets is None:
        args.tickets = 48 if args.quick else 96
    if args.mixed is None and args.quick:
        args.mixed = 1024
    if args.mixed_timed is None:
        args.mixed_timed = 512 if args.quick else 2048
    if args.rounds is None:
        args.rounds = 3 if args.quick else 5
    result = run(args)
    if args.json:
        print(json.dumps(result, sort_keys=False))
    else:
        print_summary(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
