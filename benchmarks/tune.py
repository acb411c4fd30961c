"""``semroute-stream tune`` on the shared datasets: its time and memory, and routing accuracy
with and without the tuned encoder on the same held-out rows, in one run.

    .venv/bin/python benchmarks/tune.py --json                 # one JSON object on stdout
    .venv/bin/python benchmarks/tune.py --json --cases banking77 --swap
    .venv/bin/python benchmarks/tune.py --json --cases banking77 --sides tune_b_eval_a

* ``clinc150``: ``tune --routes clinc150/routes.json`` (routes only, 150 x 10 utterances);
  evaluated on the whole dev file (3,100 rows, none seen in tuning) and on its two halves
  (``accuracy.halves``, the halves of every other figure).
* ``banking77``: ``tune --routes banking77/routes.json --data <dev half a>``; evaluated on dev
  half b (``--swap``: the other way round too). Beside "as shipped" (the routes file, ``auto``)
  it reports ``fit --add-utterances all`` on half a, with the base and the tuned encoder.

Each ``tune`` runs (with ``--force``: the figures are wanted either way; its card records the
guard's verdict) as a subprocess of the installed command: wall time, CPU time (user + sys)
and peak RSS come from ``os.wait4``. The encoders are the product's defaults (``--backend`` /
``--precision`` override); the encoder throughput of base and tuned model is measured in the
same run (interleaved rounds), and so is the per-query cost of ``decide()``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for _p in (str(REPO), str(BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import numpy as np  # noqa: E402
from accuracy import DATASETS, FIGURES, halves, subset  # noqa: E402

from semroute_stream._encoder import Encoder, EncoderConfig  # noqa: E402
from semroute_stream._offline.fit.evaluate import evaluate  # noqa: E402
from semroute_stream._offline.fit.workflows import add_labelled_utterances  # noqa: E402
from semroute_stream._offline.labelled import Labelled, load_labelled  # noqa: E402
from semroute_stream._routing.decision import decide  # noqa: E402
from semroute_stream._routing.router import (  # noqa: E402
    head_texts,
    resolve_routes,
    utterances_of,
)
from semroute_stream._routing.schema import RoutesConfig, load_routes  # noqa: E402

CASES = {
    "clinc150": ("clinc150/routes.json", "clinc150/dev.jsonl"),
    "banking77": ("banking77/routes.json", "banking77/dev.jsonl"),
}
GOAL = {"banking77": 0.88}
COMMAND = str(Path(sys.executable).with_name("semroute-stream"))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_tune(argv: list[str]) -> dict[str, Any]:
    """``semroute-stream tune ARGV --json`` as a child: its card, wall/CPU time, peak RSS."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [COMMAND, "tune", *argv, "--json", "--force"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"tune failed ({proc.returncode}): {err.decode()[-2000:]}")
    card: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return {
        "card": card,
        "wall_seconds": round(wall, 1),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
    }


class Routing:
    """Routes + an encoder: the table and the figures on labelled rows."""

    def __init__(self, routes: RoutesConfig, encoder: Encoder) -> None:
        self.routes = routes
        self.encoder = encoder
        self._cache: dict[str, np.ndarray] = {}
        self.names = self.encode(head_texts(routes)) if head_texts(routes) else None

    def encode(self, texts: list[str]) -> np.ndarray:
        """Embeddings, each text encoded once per run."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        for start in range(0, len(missing), 256):
            chunk = missing[start : start + 256]
            self._cache.update(zip(chunk, self.encoder.encode(chunk), strict=True))
        return np.stack([self._cache[t] for t in texts]) if texts else np.zeros((0, 384))

    def figures(self, routes: RoutesConfig, data: Labelled) -> dict[str, Any]:
        u = self.encode(utterances_of(routes))
        table = resolve_routes(routes, u, self.names, model_name="bench", cache_dir=None).table
        figures = evaluate(table, self.encode(data.texts), data.labels, data.texts)
        return {"method": table.method, **{k: figures[k] for k in FIGURES}}

    def added(self, train: Labelled, test: Labelled) -> dict[str, Any]:
        """``fit --add-utterances all`` on ``train`` (its rows become utterances), on ``test``."""
        u = self.encode(utterances_of(self.routes))
        grown, _, _ = add_labelled_utterances(
            self.routes, u, train.texts, train.labels, self.encode(train.texts)
        )
        return self.figures(grown, test)


def encoder_ratio(
    base: Encoder, tuned: Encoder, texts: list[str], rounds: int = 5
) -> dict[str, Any]:
    """Seconds per 1,000 texts of each encoder, interleaved rounds, median; tuned / base."""
    times: dict[str, list[float]] = {"base": [], "tuned": []}
    base.encode(texts[:64])
    tuned.encode(texts[:64])
    for _ in range(rounds):
        for name, enc in (("base", base), ("tuned", tuned)):
            t0 = time.perf_counter()
            enc.encode(texts)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1000 / len(texts) for k, v in times.items()}
    return {
        "texts": len(texts),
        "base_seconds_per_1000": round(med["base"], 3),
        "tuned_seconds_per_1000": round(med["tuned"], 3),
        "tuned_over_base": round(med["tuned"] / med["base"], 3),
        "backend": f"{base.backend}/{base.precision} vs {tuned.backend}/{tuned.precision}",
    }


def decision_cost(routing: dict[str, Routing], data: Labelled, rounds: int = 7) -> dict[str, Any]:
    """Microseconds per query of ``decide()`` on batches of 64, base vs tuned (same run)."""
    out: dict[str, list[float]] = {name: [] for name in routing}
    prepared = {}
    for name, r in routing.items():
        u = r.encode(utterances_of(r.routes))
        table = resolve_routes(r.routes, u, r.names, model_name="bench", cache_dir=None).table
        prepared[name] = (table, r.encode(data.texts[:64]), data.texts[:64])
    for _ in range(rounds):
        for name, (table, q, texts) in prepared.items():
            t0 = time.perf_counter()
            for _ in range(20):
                decide(table, q, texts)
            out[name].append((time.perf_counter() - t0) / (20 * 64) * 1e6)
    med = {k: statistics.median(v) for k, v in out.items()}
    return {
        **{f"{k}_us_per_query": round(v, 2) for k, v in med.items()},
        "tuned_over_base": round(med["tuned"] / med["base"], 3),
    }


def write_jsonl(path: Path, data: Labelled) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for text, label in zip(data.texts, data.labels, strict=True):
            fh.write(json.dumps({"text": text, "label": label}, ensure_ascii=False) + "\n")


def encoder_for(args: argparse.Namespace, model: str | None = None) -> Encoder:
    options: dict[str, Any] = {"backend": args.backend, "precision": args.precision}
    if model is not None:
        options["model"] = model
    return Encoder(EncoderConfig(**{k: v for k, v in options.items() if v is not None}))


def tune_args(args: argparse.Namespace) -> list[str]:
    out: list[str] = []
    for flag, value in (
        ("--epochs", args.epochs),
        ("--learning-rate", args.learning_rate),
        ("--temperature", args.temperature),
    ):
        if value is not None:
            out += [flag, str(value)]
    return out


def run_clinc(args: argparse.Namespace, work: Path, base: Encoder) -> dict[str, Any]:
    routes_path, data_path = (DATASETS / p for p in CASES["clinc150"])
    routes = load_routes(routes_path)
    data = load_labelled(data_path, routes.names)
    log("clinc150: tune (routes only)")
    out = work / "clinc150-tuned"
    tuned_run = run_tune(["--routes", str(routes_path), "--out", str(out), *tune_args(args)])
    tuned = encoder_for(args, str(out))
    a, b = halves(data.labels)
    result: dict[str, Any] = {"tune": tuned_run}
    routing = {"base": Routing(routes, base), "tuned": Routing(routes, tuned)}
    for name, r in routing.items():
        result[name] = {
            "all_dev": r.figures(routes, data),
            "half_a": r.figures(routes, subset(data, a)),
            "half_b": r.figures(routes, subset(data, b)),
        }
    result["encoder"] = encoder_ratio(base, tuned, data.texts[:512])
    result["decision"] = decision_cost(routing, data)
    return result


def run_banking(args: argparse.Namespace, work: Path, base: Encoder) -> dict[str, Any]:
    routes_path, data_path = (DATASETS / p for p in CASES["banking77"])
    routes = load_routes(routes_path)
    data = load_labelled(data_path, routes.names)
    a, b = halves(data.labels)
    every = {"tune_a_eval_b": (a, b), "tune_b_eval_a": (b, a)}
    chosen = list(every) if args.swap else (args.sides or ["tune_a_eval_b"])
    sides = [(label, *every[label]) for label in chosen]
    result: dict[str, Any] = {"goal_overall_accuracy": GOAL["banking77"]}
    base_routing = Routing(routes, base)
    for label, train_rows, test_rows in sides:
        train, test = subset(data, train_rows), subset(data, test_rows)
        train_file = work / f"banking77-{label}.jsonl"
        write_jsonl(train_file, train)
        log(f"banking77: tune with routes + {len(train)} rows ({label})")
        out = work / f"banking77-{label}"
        argv = ["--routes", str(routes_path), "--data", str(train_file), "--out", str(out)]
        tuned_run = run_tune([*argv, *tune_args(args)])
        tuned = Routing(routes, encoder_for(args, str(out)))
        result[label] = {
            "tune": tuned_run,
            "rows": len(test),
            "base_as_shipped": base_routing.figures(routes, test),
            "tuned_as_shipped": tuned.figures(routes, test),
            "base_adding_train_half_as_utterances": base_routing.added(train, test),
            "tuned_adding_train_half_as_utterances": tuned.added(train, test),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--swap", action="store_true", help="banking77: both halves")
    parser.add_argument(
        "--sides", nargs="+", choices=["tune_a_eval_b", "tune_b_eval_a"], help="banking77"
    )
    parser.add_argument("--epochs", type=float, help="passed to tune (default: its own)")
    parser.add_argument("--learning-rate", type=float, help="passed to tune (default: its own)")
    parser.add_argument("--temperature", type=float, help="passed to tune (default: its own)")
    parser.add_argument("--backend", choices=["auto", "onnxruntime", "openvino"])
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"])
    args = parser.parse_args()
    report: dict[str, Any] = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_start": [round(x, 2) for x in os.getloadavg()],
        }
    }
    base = encoder_for(args)
    with tempfile.TemporaryDirectory(prefix="semroute-tune-bench-") as tmp:
        work = Path(tmp)
        if "clinc150" in args.cases:
            report["clinc150"] = run_clinc(args, work, base)
        if "banking77" in args.cases:
            report["banking77"] = run_banking(args, work, base)
    report["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(report, indent=None if args.json else 2)
    print(text)


if __name__ == "__main__":
    main()
