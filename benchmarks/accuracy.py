"""Routing accuracy on the shared datasets, before/after, per method, fitted and held out;
plus the cost of the decision next to the encoder's, measured in the same run.

    .venv/bin/python benchmarks/accuracy.py            # human-readable summary
    .venv/bin/python benchmarks/accuracy.py --json     # one JSON object on stdout

Datasets (../shared/datasets, see its README): CLINC150 (150 intent routes), CLINC150 domains
(10 broad routes) and Banking77 (77 routes), each with its dev file. For each:

* ``before``: the routes file with the old defaults (``method: max``, threshold 0.5);
* ``after``: the routes file as shipped (no method: ``auto``, resolved by cross-validation on
  the utterances; no labelled data involved);
* ``methods``: max, top5_mean, the head (blend chosen by CV) and auto, each with the defaults
  derived from the utterances;
* ``fit_in_sample``: ``fit`` on the whole dev file, evaluated on it (optimistic);
* ``held_out``: dev split in two halves (seeded, stratified by label): ``fit`` on one half,
  evaluated on the other, both ways, next to the as-shipped figures on the same half; and
  ``fit --add-utterances all`` on one half (its rows become utterances), evaluated on the
  other.

Embeddings are cached as .npy under ``<cache root>/bench-embeddings/`` keyed by the model and
a hash of the texts, so reruns take seconds; the first run encodes ~7,000 texts (~1 minute on
two cores). The decision cost is the time of ``decide()`` on batches of 64 queries, next to
the encoder's time for the same 64 texts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from semroute_stream._encoder import Encoder  # noqa: E402
from semroute_stream._files import default_cache_root  # noqa: E402
from semroute_stream._offline.evaluate import evaluate  # noqa: E402
from semroute_stream._offline.fit import add_labelled_utterances  # noqa: E402
from semroute_stream._offline.labelled import Labelled, load_labelled  # noqa: E402
from semroute_stream._offline.tune import fit_routes  # noqa: E402
from semroute_stream._routing.decision import decide  # noqa: E402
from semroute_stream._routing.router import (  # noqa: E402
    compile_table,
    head_texts,
    resolve_routes,
    train_route_head,
    utterances_of,
)
from semroute_stream._routing.schema import RoutesConfig, load_routes  # noqa: E402

DATASETS = REPO.parent / "shared" / "datasets"
CASES = {
    "clinc150": ("clinc150/routes.json", "clinc150/dev.jsonl"),
    "clinc150_domains": ("clinc150/domain_routes.json", "clinc150/domain_dev.jsonl"),
    "banking77": ("banking77/routes.json", "banking77/dev.jsonl"),
}
TARGETS = {
    "clinc150": {"overall_accuracy": 0.84},
    "clinc150_domains": {"overall_accuracy": 0.86, "top1_accuracy": 0.92},
    "banking77": {"overall_accuracy": 0.87},
}
ADDED = "fitted_adding_other_half_as_utterances"
FIGURES = ("overall_accuracy", "in_scope_accuracy", "top1_accuracy", "fallback_recall")
BATCH = 64


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Embeddings:
    """Encodes texts once per (model, texts) and keeps them as .npy files."""

    def __init__(self, encoder: Encoder, directory: Path) -> None:
        self.encoder = encoder
        self.directory = directory
        self.encoded = 0

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        digest = hashlib.sha256(self.encoder.model_name.encode())
        for text in texts:
            digest.update(text.encode("utf-8") + b"\0")
        path = self.directory / f"{digest.hexdigest()[:32]}.npy"
        if path.exists():
            cached: np.ndarray = np.load(path)
            if cached.shape == (len(texts), self.encoder.dim):
                return cached
        parts = [self.encoder.encode(texts[i : i + 256]) for i in range(0, len(texts), 256)]
        out = np.concatenate(parts) if parts else np.zeros((0, self.encoder.dim), np.float32)
        self.encoded += len(texts)
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, out)
        tmp.replace(path)
        return out


def pick(figures: dict[str, Any]) -> dict[str, Any]:
    return {key: figures[key] for key in FIGURES}


def halves(labels: Sequence[str | None], seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Two halves of the rows, stratified by label (seeded)."""
    rng = np.random.default_rng(seed)
    a: list[int] = []
    b: list[int] = []
    by_label: dict[str | None, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    for key in sorted(by_label, key=lambda k: (k is None, k or "")):
        rows = np.array(by_label[key])
        rng.shuffle(rows)
        # Alternate which half gets the odd row out, so the halves stay the same size.
        cut = (len(rows) + (len(a) <= len(b))) // 2
        a.extend(rows[:cut].tolist())
        b.extend(rows[cut:].tolist())
    return np.array(sorted(a)), np.array(sorted(b))


def subset(data: Labelled, rows: np.ndarray) -> Labelled:
    return Labelled([data.texts[i] for i in rows], [data.labels[i] for i in rows])


class Case:
    def __init__(self, name: str, embed: Embeddings, model_name: str) -> None:
        routes_file, data_file = CASES[name]
        self.name = name
        self.routes_path = DATASETS / routes_file
        self.data_path = DATASETS / data_file
        self.routes = load_routes(self.routes_path)
        self.data = load_labelled(self.data_path, self.routes.names)
        self.model_name = model_name
        self.utterances = embed(utterances_of(self.routes))
        self.names = embed(head_texts(self.routes))
        self.queries = embed(self.data.texts)

    def table(self, routes: RoutesConfig, cache_dir: Path | None) -> Any:
        return resolve_routes(
            routes, self.utterances, self.names, model_name=self.model_name, cache_dir=cache_dir
        )

    def evaluate(self, routes: RoutesConfig, rows: np.ndarray | None, cache: Path | None) -> Any:
        resolution = self.table(routes, cache)
        data = self.data if rows is None else subset(self.data, rows)
        queries = self.queries if rows is None else self.queries[rows]
        return resolution, evaluate(resolution.table, queries, data.labels, data.texts)

    def fit(self, rows: np.ndarray | None, cache: Path | None) -> tuple[RoutesConfig, Any]:
        data = self.data if rows is None else subset(self.data, rows)
        queries = self.queries if rows is None else self.queries[rows]
        head = train_route_head(
            self.routes, self.utterances, self.names, model_name=self.model_name, cache_dir=cache
        )
        base = compile_table(self.routes, self.utterances, method="max")
        result = fit_routes(self.routes, base, head, queries, data.labels, texts=data.texts)
        return result.routes, result

    def fit_adding_utterances(
        self, rows: np.ndarray, cache: Path | None
    ) -> tuple[RoutesConfig, np.ndarray]:
        """What ``fit --add-utterances all`` writes when fitted on ``rows``: the routes with
        those rows as utterances, method and fallback from cross-validation on them."""
        data = subset(self.data, rows)
        augmented, utterances, _ = add_labelled_utterances(
            self.routes, self.utterances, data.texts, data.labels, self.queries[rows]
        )
        resolution = resolve_routes(
            augmented, utterances, self.names, model_name=self.model_name, cache_dir=cache
        )
        return resolution.record(augmented), utterances


def run_case(case: Case, cache: Path) -> dict[str, Any]:
    out: dict[str, Any] = {
        "routes": str(case.routes_path.relative_to(DATASETS)),
        "data": str(case.data_path.relative_to(DATASETS)),
        "n_routes": len(case.routes.routes),
        "n_utterances": len(case.utterances),
        "n_rows": len(case.data),
        "targets": TARGETS[case.name],
    }
    before_routes = case.routes.model_copy(update={"method": "max", "default_threshold": 0.5})
    _, before = case.evaluate(before_routes, None, cache)
    resolution, after = case.evaluate(case.routes, None, cache)
    out["before"] = {"method": "max", "default_threshold": 0.5, **pick(before)}
    out["after"] = {"method": f"auto -> {resolution.method}", **pick(after)}
    out["auto_choice"] = resolution.summary()

    methods: dict[str, Any] = {}
    for method in ("max", "top5_mean", "head", "auto"):
        res, figures = case.evaluate(case.routes.model_copy(update={"method": method}), None, cache)
        methods[method] = {"resolved": res.method, **pick(figures)}
    out["methods"] = methods

    fitted, _ = case.fit(None, cache)
    _, fitted_figures = case.evaluate(fitted, None, cache)
    out["fit_in_sample"] = {
        "method": fitted.method,
        "head": fitted.head.model_dump(exclude_defaults=True) if fitted.method == "head" else None,
        "default_threshold": fitted.default_threshold,
        **pick(fitted_figures),
    }

    a, b = halves(case.data.labels)
    held: dict[str, Any] = {}
    for label, (train, test) in (("fit_a_eval_b", (a, b)), ("fit_b_eval_a", (b, a))):
        fitted_half, _ = case.fit(train, cache)
        _, shipped = case.evaluate(case.routes, test, cache)
        _, tuned = case.evaluate(fitted_half, test, cache)
        added, utterances = case.fit_adding_utterances(train, cache)
        resolution = resolve_routes(
            added, utterances, case.names, model_name=case.model_name, cache_dir=cache
        )
        test_data = subset(case.data, test)
        grown = evaluate(resolution.table, case.queries[test], test_data.labels, test_data.texts)
        held[label] = {
            "rows": len(test),
            "as_shipped": pick(shipped),
            "fitted_on_other_half": {"method": fitted_half.method, **pick(tuned)},
            "fitted_adding_other_half_as_utterances": {"method": added.method, **pick(grown)},
        }
    mean: dict[str, dict[str, Any]] = {
        "as_shipped": {},
        "fitted_on_other_half": {},
        "fitted_adding_other_half_as_utterances": {},
    }
    for side, figures in mean.items():
        for key in FIGURES:
            values = [h[side][key] for h in held.values()]
            figures[key] = (
                round(statistics.fmean(values), 4) if all(v is not None for v in values) else None
            )
    held["mean"] = mean
    out["held_out"] = held
    return out


def time_head(case: Case) -> dict[str, Any]:
    """Head training (+ cross-validation) without a cache, then a cache write and a hit."""
    started = time.perf_counter()
    cold = train_route_head(
        case.routes, case.utterances, case.names, model_name=case.model_name, cache_dir=None
    )
    train_seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        train_route_head(
            case.routes,
            case.utterances,
            case.names,
            model_name=case.model_name,
            cache_dir=directory,
        )
        started = time.perf_counter()
        hit = train_route_head(
            case.routes,
            case.utterances,
            case.names,
            model_name=case.model_name,
            cache_dir=directory,
        )
        hit_seconds = time.perf_counter() - started
        started = time.perf_counter()
        case.table(case.routes.model_copy(update={"method": "auto"}), directory)
        resolve_seconds = time.perf_counter() - started
    assert hit.cached and not cold.cached
    return {
        "routes": len(case.routes.routes),
        "utterances": len(case.utterances),
        "train_and_cv_seconds": round(train_seconds, 3),
        "iterations": cold.iterations,
        "cache_hit_seconds": round(hit_seconds, 4),
        "resolve_auto_from_cache_seconds": round(resolve_seconds, 4),
    }


def time_decision(case: Case, encoder: Encoder, cache: Path, rounds: int = 7) -> dict[str, Any]:
    """Per-query cost of decide() on batches of 64 (every method), and of encoding the same
    64 texts; the rounds interleave the two so machine load affects both alike."""
    tables = {
        method: case.table(case.routes.model_copy(update={"method": method}), cache).table
        for method in ("max", "top5_mean", "head")
    }
    rng = np.random.default_rng(0)
    rows = rng.choice(len(case.data), size=BATCH, replace=False)
    texts = [case.data.texts[i] for i in rows]
    queries = case.queries[rows]
    encoder.encode(texts)  # warm-up
    decide_ms: dict[str, list[float]] = {m: [] for m in tables}
    encode_ms: list[float] = []
    for _ in range(rounds):
        started = time.perf_counter()
        encoder.encode(texts)
        encode_ms.append((time.perf_counter() - started) * 1000 / BATCH)
        for method, table in tables.items():
            reps = 20
            started = time.perf_counter()
            for _ in range(reps):
                decide(table, queries, texts)
            decide_ms[method].append((time.perf_counter() - started) * 1000 / (reps * BATCH))
    encode = statistics.median(encode_ms)
    out: dict[str, Any] = {
        "batch": BATCH,
        "routes": len(case.routes.routes),
        "utterances": len(case.utterances),
        "encode_ms_per_query": round(encode, 3),
    }
    for method, values in decide_ms.items():
        per_query = statistics.median(values)
        out[f"decide_ms_per_query_{method}"] = round(per_query, 4)
        out[f"decide_share_of_encode_{method}"] = round(per_query / encode, 4)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--cases", nargs="*", choices=list(CASES), default=list(CASES))
    args = parser.parse_args(argv)

    encoder = Encoder()
    root = default_cache_root()
    embed = Embeddings(encoder, root / "bench-embeddings")
    started = time.perf_counter()
    cases = {name: Case(name, embed, encoder.model_name) for name in args.cases}
    log(f"embeddings ready in {time.perf_counter() - started:.1f} s ({embed.encoded} encoded)")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)  # a fresh head cache: every head is trained in this run
        for name, case in cases.items():
            log(f"{name}: evaluating")
            results[name] = run_case(case, cache)
        timing_case = cases.get("clinc150") or next(iter(cases.values()))
        log("timing the head and the decision")
        head_timing = time_head(timing_case)
        decision = time_decision(timing_case, encoder, cache)
    report = {
        "model": encoder.model_name,
        "machine": {"python": platform.python_version(), "cpu_count": _cpus()},
        "datasets": results,
        "head_training": head_timing,
        "decision_cost": decision,
    }
    if args.json:
        print(json.dumps(report))
    else:
        print_summary(report)
    return 0


def _cpus() -> int | None:
    import os

    return os.cpu_count()


def _f(value: Any) -> str:
    return "  n/a " if value is None else f"{value:.4f}"


def print_summary(report: dict[str, Any]) -> None:
    print(f"model: {report['model']}")
    for name, r in report["datasets"].items():
        print(
            f"\n{name}: {r['routes']} on {r['data']} ({r['n_rows']} rows), targets {r['targets']}"
        )
        print(f"  {'':<34}{'overall':>8}{'in-scope':>9}{'top-1':>8}{'fb-rec':>8}")
        rows: list[tuple[str, dict[str, Any]]] = [
            ("before (max, threshold 0.5)", r["before"]),
            (f"after as shipped ({r['after']['method']})", r["after"]),
        ]
        rows += [(f"  method {m} -> {v['resolved']}", v) for m, v in r["methods"].items()]
        rows.append((f"fit in-sample ({r['fit_in_sample']['method']})", r["fit_in_sample"]))
        for label, h in r["held_out"].items():
            if label == "mean":
                continue
            rows.append((f"{label}: as shipped", h["as_shipped"]))
            rows.append((f"{label}: fitted", h["fitted_on_other_half"]))
            rows.append((f"{label}: fit --add-utterances", h[ADDED]))
        for label, f in rows:
            print(
                f"  {label:<34}{_f(f['overall_accuracy']):>8}{_f(f['in_scope_accuracy']):>9}"
                f"{_f(f['top1_accuracy']):>8}{_f(f['fallback_recall']):>8}"
            )
    h = report["head_training"]
    print(
        f"\nhead: {h['routes']} routes x {h['utterances']} utterances: training + 5-fold CV "
        f"{h['train_and_cv_seconds']} s, cache hit {h['cache_hit_seconds']} s"
    )
    d = report["decision_cost"]
    print(f"decision, batch of {d['batch']}: encoder {d['encode_ms_per_query']} ms/query")
    for method in ("max", "top5_mean", "head"):
        print(
            f"  {method:<10} {d[f'decide_ms_per_query_{method}']} ms/query "
            f"({100 * d[f'decide_share_of_encode_{method}']:.2f}% of the encoder)"
        )


if __name__ == "__main__":
    raise SystemExit(main())
