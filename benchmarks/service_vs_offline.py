"""Service vs offline vs bare encoder, whole-process, on the same texts (issue 12).

    .venv/bin/python benchmarks/service_vs_offline.py --json
    .venv/bin/python benchmarks/service_vs_offline.py --json --limit 4000 --repeat 3 \\
        --variant base --variant t1:encoder.intra_op_threads=1

Three commands run as child processes, each timed from its start to its exit (interpreter
start-up, model load, route loading, the work, shut-down):

* ``encoder``: a tiny ``python -c`` that builds ``Encoder`` and encodes the texts in batches of
  ``--encoder-batch`` (default: the service's ``batching.max_size``);
* ``route``: ``semroute-stream route --routes config/routes.example.yaml --input F --output G``;
* ``service``: the texts are produced to a fresh topic first, then
  ``semroute-stream run --config C --max-messages N`` (``route_only``, a fresh group,
  ``auto_offset_reset: earliest``). ``C`` is ``config/service.example.yaml`` with the broker and
  topics replaced (see ``_common.write_service_config``) plus each variant's ``--set`` values;
  ``SEMROUTE_*`` variables in this environment reach the child too. Steady state: outcomes/s
  between the 10th and 90th percentile outcome, from the records' ``processed_at_ms``.

Repetitions are interleaved (encoder, route, every service variant; again) and the figures are
medians; ``spread`` is (max - min) / median of each command's wall times, a noise gauge.
Texts: every ``../shared/datasets/*/dev.jsonl`` (shuffled, repeated up to ``--limit``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import yaml
from _common import (
    DATASETS,
    REPO,
    ROUTES_FILE,
    SERVICE_CONFIG,
    OutputCollector,
    create_topics,
    dev_texts,
    kafka_bootstrap,
    log,
    new_topic_base,
    payload,
    produce_all,
    provenance,
    thread_env,
    write_service_config,
)

_ENCODER_SCRIPT = """
import json, sys, time
t0 = time.perf_counter()
import orjson
from semroute_stream._encoder import Encoder, EncoderConfig
enc = Encoder(EncoderConfig(**json.loads(sys.argv[3])))
with open(sys.argv[1], "rb") as fh:
    texts = [orjson.loads(line)["text"] for line in fh]
size = int(sys.argv[2])
t1 = time.perf_counter()
for i in range(0, len(texts), size):
    enc.encode(texts[i : i + size])
print(json.dumps({"load_s": t1 - t0, "work_s": time.perf_counter() - t1, "encoder": repr(enc)}))
"""


def load_texts(limit: int) -> list[str]:
    texts = dev_texts()
    if not texts:
        raise SystemExit(f"no texts under {DATASETS}/*/dev.jsonl")
    rng = random.Random(12)
    rng.shuffle(texts)
    return [texts[i % len(texts)] for i in range(limit)]


def parse_set(values: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``section.field=value`` (value read as YAML/JSON scalars) -> config overrides."""
    out: dict[str, dict[str, Any]] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot:
            raise SystemExit(f"--set/--variant value {item!r}: expected section.field=value")
        out.setdefault(section, {})[name] = yaml.safe_load(raw)
    return out


def parse_variant(spec: str) -> tuple[str, dict[str, dict[str, Any]]]:
    """``name[:section.field=value,...]``."""
    name, _, rest = spec.partition(":")
    return name, parse_set([s for s in rest.split(",") if s])


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(cmd: Sequence[str]) -> tuple[float, float, str]:
    """Run ``cmd`` to its exit: (wall seconds, CPU seconds of all its threads, stdout and
    stderr)."""
    cpu0 = _children_cpu()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return wall, _children_cpu() - cpu0, proc.stdout + proc.stderr


def run_encoder(inp: Path, batch: int, threads: int | None) -> dict[str, Any]:
    config = {} if threads is None else {"intra_op_threads": threads}
    cmd = [sys.executable, "-c", _ENCODER_SCRIPT, str(inp), str(batch), json.dumps(config)]
    wall, cpu, out = timed(cmd)
    inner = json.loads(next(ln for ln in reversed(out.splitlines()) if ln.startswith("{")))
    return {"wall_s": wall, "cpu_s": cpu, **inner}


def run_route(inp: Path, outp: Path, batch: int | None, threads: int | None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "semroute_stream", "route", "--routes", str(ROUTES_FILE)]
    cmd += ["--input", str(inp), "--output", str(outp)]
    if batch is not None:
        cmd += ["--batch-size", str(batch)]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    wall, cpu, out = timed(cmd)
    m = re.search(r"routed (\d+) of (\d+) lines in ([\d.]+) s", out)
    return {"wall_s": wall, "cpu_s": cpu, "work_s": float(m.group(3)) if m else None}


async def run_service(
    bootstrap: str, tmp: Path, values: Sequence[bytes], overrides: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    topic = new_topic_base("svo")
    out_topics = [f"{topic}.out", f"{topic}.dlq"]
    await create_topics(bootstrap, [topic, *out_topics])
    await produce_all(bootstrap, topic, values)
    config = tmp / f"{topic}.yaml"
    written = write_service_config(
        config, bootstrap=bootstrap, topic=topic, mode="route_only", overrides=overrides
    )
    n = len(values)
    cmd = [sys.executable, "-m", "semroute_stream", "run", "--config", str(config)]
    start_wall = time.time()
    wall, cpu, out = await asyncio.to_thread(timed, [*cmd, "--max-messages", str(n)])
    collector = OutputCollector(bootstrap, out_topics)
    await collector.start()
    try:
        complete = await collector.wait_for(n, 60)
    finally:
        await collector.stop()
    done = sorted(o.processed_ms for o in collector.outcomes)
    lo, hi = done[int(0.1 * (len(done) - 1))], done[int(0.9 * (len(done) - 1))]
    steady = (int(0.9 * (len(done) - 1)) - int(0.1 * (len(done) - 1))) / ((hi - lo) / 1000)
    stats: dict[str, Any] = {}
    for line in reversed(out.splitlines()):
        try:
            stats = json.loads(line)
            break
        except ValueError:
            continue
    encoder = re.search(r"encoder=(Encoder\(.*?\))", out)
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "steady_msgs_per_s": steady,
        "first_outcome_after_s": done[0] / 1000 - start_wall,
        "exit_after_last_outcome_s": start_wall + wall - done[-1] / 1000,
        "outcomes": len(done),
        "complete": complete,
        "dead_letters": sum(1 for o in collector.outcomes if o.status != "ok"),
        "mean_batch": round(stats.get("consumed", 0) / max(1, stats.get("batches", 1)), 1),
        "encoder": encoder.group(1) if encoder else None,
        "settings": {k: written.get(k) for k in ("batching", "flow", "encoder")},
    }


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


def summarize(runs: list[dict[str, Any]], n: int) -> dict[str, Any]:
    walls = [r["wall_s"] for r in runs]
    med = statistics.median(walls)
    out: dict[str, Any] = {
        "wall_s": [round(w, 2) for w in walls],
        "median_wall_s": round(med, 2),
        "msgs_per_s": round(n / med, 1),
        "spread": round((max(walls) - min(walls)) / med, 3),
        "cpu_ms_per_msg": round(1000 * statistics.median(r["cpu_s"] for r in runs) / n, 3),
    }
    works = [r["work_s"] for r in runs if r.get("work_s")]
    if works:
        out["work_msgs_per_s"] = round(n / statistics.median(works), 1)
    steady = [r["steady_msgs_per_s"] for r in runs if "steady_msgs_per_s" in r]
    if steady:
        out["steady_msgs_per_s"] = round(statistics.median(steady), 1)
        out["first_outcome_after_s"] = _r(
            statistics.median(r["first_outcome_after_s"] for r in runs), 2
        )
        out["exit_after_last_outcome_s"] = _r(
            statistics.median(r["exit_after_last_outcome_s"] for r in runs), 2
        )
        out["mean_batch"] = statistics.median(r["mean_batch"] for r in runs)
        out["settings"] = runs[0]["settings"]
        out["all_outcomes"] = all(r["complete"] and r["outcomes"] == n for r in runs)
    if runs[0].get("encoder"):
        out["encoder"] = sorted({str(r.get("encoder")) for r in runs})
    return out


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    texts = load_texts(args.limit)
    base = parse_set(args.set)
    variants = [parse_variant(v) for v in (args.variant or ["service"])]
    merged: dict[str, dict[str, dict[str, Any]]] = {}
    for vname, extra in variants:
        cfg = {k: dict(v) for k, v in base.items()}
        for section, values in extra.items():
            cfg.setdefault(section, {}).update(values)
        merged[vname] = cfg
    example = yaml.safe_load(SERVICE_CONFIG.read_text(encoding="utf-8"))
    first = next(iter(merged.values())).get("batching", {})
    enc_batch = args.encoder_batch or int(first.get("max_size", example["batching"]["max_size"]))
    result: dict[str, Any] = {
        "benchmark": "service_vs_offline",
        "code": provenance(),
        "thread_env": thread_env(),
        "semroute_env": {k: v for k, v in os.environ.items() if k.startswith("SEMROUTE_")},
        "machine": {"cpus": os.cpu_count(), "loadavg_start": list(os.getloadavg())},
        "texts": {"n": len(texts), "unique": len(set(texts)), "source": "datasets/*/dev.jsonl"},
        "encoder_cmd": {"batch": enc_batch, "threads": args.threads},
        "route_cmd": {"batch_size": args.route_batch, "threads": args.threads},
        "variants": {name: cfg for name, cfg in merged.items()},
    }
    runs: dict[str, list[dict[str, Any]]] = {"encoder": [], "route": []}
    runs.update({name: [] for name in merged})
    with (
        kafka_bootstrap(args.bootstrap) as (bootstrap, how),
        tempfile.TemporaryDirectory(prefix="semroute-svo-") as workdir,
    ):
        tmp = Path(workdir)
        result["broker"] = {"bootstrap": bootstrap, "from": how}
        inp = tmp / "in.jsonl"
        inp.write_bytes(b"".join(payload(f"m{i}", t) + b"\n" for i, t in enumerate(texts)))
        payloads = [payload(f"m{i}", t) for i, t in enumerate(texts)]
        for rep in range(args.repeat):
            order: list[str] = [*(["encoder"] if not args.no_encoder else []), "route", *merged]
            if rep % 2:  # alternate the order so no command always runs first (warm caches)
                order.reverse()
            for name in order:
                if name == "encoder":
                    run = run_encoder(inp, enc_batch, args.threads)
                elif name == "route":
                    run = run_route(inp, tmp / "out.jsonl", args.route_batch, args.threads)
                else:
                    run = await run_service(bootstrap, tmp, payloads, merged[name])
                runs[name].append(run)
                tail = f", steady {run['steady_msgs_per_s']:.0f}/s" if name in merged else ""
                log(
                    f"round {rep + 1} {name}: {run['wall_s']:.2f} s whole-process "
                    f"({len(texts) / run['wall_s']:.0f}/s){tail}, "
                    f"load {os.getloadavg()[0]:.1f}"
                )
    n = len(texts)
    summary = {name: summarize(r, n) for name, r in runs.items() if r}
    result["results"] = summary
    result["runs"] = {
        name: [
            {k: (_r(v) if isinstance(v, float) else v) for k, v in x.items() if k != "settings"}
            for x in r
        ]
        for name, r in runs.items()
    }
    route = summary["route"]
    ratios: dict[str, Any] = {}
    if "encoder" in summary:
        enc = summary["encoder"]
        ratios["route_over_encoder"] = round(enc["median_wall_s"] / route["median_wall_s"], 3)
        ratios["route_over_encoder_per_round"] = [
            round(e["wall_s"] / r["wall_s"], 3)
            for e, r in zip(runs["encoder"], runs["route"], strict=True)
        ]
    for name in merged:
        svc = summary[name]
        ratios[f"{name}_over_route"] = round(route["median_wall_s"] / svc["median_wall_s"], 3)
        ratios[f"{name}_over_route_per_round"] = [
            round(r["wall_s"] / s["wall_s"], 3)
            for r, s in zip(runs["route"], runs[name], strict=True)
        ]
        if route.get("work_msgs_per_s"):
            ratios[f"{name}_steady_over_route_work"] = round(
                svc["steady_msgs_per_s"] / route["work_msgs_per_s"], 3
            )
    result["ratios"] = ratios
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    end_hash = provenance()["semroute_stream_sha256"]
    result["code"]["changed_during_run"] = end_hash != result["code"]["semroute_stream_sha256"]
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--bootstrap", help="HOST:PORT (default: $KAFKA_BOOTSTRAP_SERVERS, ...)")
    parser.add_argument("--limit", type=int, default=8200, help="texts (default 8200)")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="a service config value for every variant (repeatable)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        metavar="NAME[:SECTION.FIELD=VALUE,...]",
        help="a service variant to run in every round (repeatable; default: one, 'service')",
    )
    parser.add_argument("--threads", type=int, help="--threads of encoder and route (default: 0)")
    parser.add_argument("--route-batch", type=int, help="route --batch-size (default: its own)")
    parser.add_argument("--encoder-batch", type=int, help="default: the service's max_size")
    parser.add_argument("--no-encoder", action="store_true", help="skip the bare encoder")
    parser.add_argument("--json", action="store_true", help="compact JSON (default: indented)")
    args = parser.parse_args(argv)
    result = asyncio.run(bench(args))
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
