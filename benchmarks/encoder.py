"""Encoder throughput benchmark: sentences/s, real tokens/s, padding efficiency, and in-run ratios.

    .venv/bin/python benchmarks/encoder.py            # human-readable summary
    .venv/bin/python benchmarks/encoder.py --json     # one JSON object on stdout
    .venv/bin/python benchmarks/encoder.py --quick    # shorter measurements (~40 s)

Workloads: short queries (CLINC150 dev texts from ../shared/datasets) and ticket-length texts
(60-200-word support tickets synthesised from a seeded generator). Every ratio (bucketed vs naive
padding, 2 vs 1 intra-op threads, spinning on vs off) is measured in the same run with the
variants interleaved round by round, and is the median of the per-round ratios, so that load from
other processes on the machine affects both sides alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from semroute_stream._encoder import Encoder, EncoderConfig  # noqa: E402
from semroute_stream._model_build import (  # noqa: E402
    build_minilm_onnx,
    locate_weights_dir,
    provision_default_model,
)

DATASET = REPO.parent / "shared" / "datasets" / "clinc150" / "dev.jsonl"
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
# Main
# ------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    budget = args.seconds
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if args.json else print
    result: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        }
    }
    import onnxruntime

    result["machine"]["onnxruntime"] = onnxruntime.__version__
    result["machine"]["numpy"] = np.__version__
    result["machine"]["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]

    # Model build and load times.
    with tempfile.TemporaryDirectory(prefix="semroute-bench-") as tmp:
        t0 = time.perf_counter()
        build_minilm_onnx(locate_weights_dir() / "model.safetensors", Path(tmp) / "model.onnx")
        build_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    model_dir = provision_default_model(args.cache_dir)
    provision_seconds = time.perf_counter() - t0
    base = {"cache_dir": args.cache_dir}
    t0 = time.perf_counter()
    encoder = Encoder(EncoderConfig(**base))
    load_seconds = time.perf_counter() - t0
    result["model"] = {
        "name": encoder.model_name,
        "dim": encoder.dim,
        "max_length": encoder.max_length,
        "dir": str(model_dir),
        "build_seconds": round(build_seconds, 2),
        "provision_cached_seconds": round(provision_seconds, 3),
        "load_seconds": round(load_seconds, 2),
        "config": encoder.config.model_dump(mode="json"),
    }
    log(f"build {build_seconds:.2f}s, load {load_seconds:.2f}s")

    queries = short_queries(512)
    ticket_texts = tickets(128)
    workloads = {"short": queries, "ticket": ticket_texts}
    result["workloads"] = {
        name: {
            "texts": len(texts),
            "mean_tokens": round(float(np.mean(encoder.count_tokens(texts))), 1),
            "max_tokens": max(encoder.count_tokens(texts)),
            "mean_words": round(float(np.mean([len(t.split()) for t in texts])), 1),
        }
        for name, texts in workloads.items()
    }

    # Throughput by batch size (texts per encode() call) with the default (bucketed) encoder.
    result["throughput"] = {}
    for name, texts in workloads.items():
        result["throughput"][name] = {}
        for bs in args.batch_sizes:
            sample = texts[: max(bs, min(len(texts), bs * 4))]
            r = throughput(encoder, sample, bs, budget)
            result["throughput"][name][str(bs)] = r
            log(f"{name:6s} batch {bs:4d}: {r}")

    # Mixed micro-batch: bucketed vs one naively padded batch.
    rng = random.Random(99)
    mixed_sets = []
    for k in range(4):
        batch = queries[k * 56 : (k + 1) * 56] + ticket_texts[k * 8 : (k + 1) * 8]
        rng.shuffle(batch)
        mixed_sets.append(batch)
    naive = Encoder(
        EncoderConfig(**base, sort_by_length=False, max_batch_size=10**6, max_batch_tokens=10**9)
    )
    naive.encode(mixed_sets[0])
    encoder.encode(mixed_sets[0])

    def rate(enc: Encoder, sets: list[list[str]], seconds: float = budget) -> Callable[[], float]:
        def measure() -> float:
            elapsed, done = timed_pass(enc, sets, seconds)
            return done / elapsed

        return measure

    mixed = interleaved(
        {"bucketed": rate(encoder, mixed_sets), "naive": rate(naive, mixed_sets)}, args.rounds
    )
    mixed_tokens = sum(sum(encoder.count_tokens(s)) for s in mixed_sets) / sum(
        len(s) for s in mixed_sets
    )
    result["mixed_batch"] = {
        "description": "64 texts per call: 56 CLINC150 queries + 8 synthetic tickets, shuffled",
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
    log(f"mixed: {result['mixed_batch']}")
    del naive

    # Threads and spinning: batch-1 latency (short query) and batch-32 throughput (short).
    variants = {
        f"intra{n}_spin{int(spin)}": Encoder(
            EncoderConfig(**base, intra_op_threads=n, allow_spinning=spin)
        )
        for n in (1, 2)
        for spin in (False, True)
    }
    single_calls = [[q] for q in queries[:64]]
    batch_calls = chunks(queries[:256], 32)
    for enc in variants.values():
        enc.encode(batch_calls[0])
    b1 = interleaved(
        {k: rate(v, single_calls, budget / 2) for k, v in variants.items()}, args.rounds
    )
    b32 = interleaved(
        {k: rate(v, batch_calls, budget / 2) for k, v in variants.items()}, args.rounds
    )
    threads: dict[str, Any] = {
        name: {
            "batch1_ms_per_query": round(1000 / statistics.median(b1[name]), 2),
            "batch32_sentences_per_s": round(statistics.median(b32[name]), 1),
        }
        for name in variants
    }
    threads["speedup_2_over_1_threads"] = {
        "batch1": median_ratio(b1["intra2_spin0"], b1["intra1_spin0"]),
        "batch32": median_ratio(b32["intra2_spin0"], b32["intra1_spin0"]),
    }
    threads["speedup_spin_on_over_off_2_threads"] = {
        "batch1": median_ratio(b1["intra2_spin1"], b1["intra2_spin0"]),
        "batch32": median_ratio(b32["intra2_spin1"], b32["intra2_spin0"]),
    }
    result["threads"] = threads
    log(f"threads: {threads}")

    result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["elapsed_seconds"] = round(time.perf_counter() - t_start, 1)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--quick", action="store_true", help="shorter measurements")
    parser.add_argument("--seconds", type=float, default=None, help="time per measurement")
    parser.add_argument("--rounds", type=int, default=None, help="rounds for in-run ratios")
    parser.add_argument(
        "--batch-sizes",
        type=lambda s: [int(x) for x in s.split(",")],
        default=list(BATCH_SIZES),
        help="comma-separated texts per encode() call (default 1,8,32,64,128)",
    )
    parser.add_argument("--cache-dir", type=Path, default=None, help="model cache root")
    args = parser.parse_args(argv)
    if args.seconds is None:
        args.seconds = 0.6 if args.quick else 1.5
    if args.rounds is None:
        args.rounds = 3
    result = run(args)
    if args.json:
        print(json.dumps(result, sort_keys=False))
    else:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
