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

``precision_agreement``: every dataset routed (routes as shipped, ``auto``) with fp32 and
with bf16 embeddings -- openvino fp32 vs openvino bf16 (the same backend), onnxruntime fp32 vs
openvino bf16 (the default before and after), and onnxruntime fp32 vs openvino fp32 -- each
variant embedding the utterances, names and queries itself and training its own head (a fresh
head cache per variant, as a fresh deployment would): decision agreement (the same route, or
the fallback in both), top-1 agreement, and the accuracy of each. Skipped, with the reason,
where OpenVINO is missing or the CPU has no native bf16 units.

    .venv/bin/python benchmarks/accuracy.py --json --sections precision_agreement   # just that
    .venv/bin/python benchmarks/accuracy.py --json --backend onnxruntime --precision fp32

``oos_curve``: the datasets with out-of-scope rows (CLINC150 and its domains) at 3, 10, 20
and 30 % out-of-scope traffic. Weighting: the in-scope rows and the out-of-scope rows are
re-weighted to the share ``p`` (each out-of-scope row counts ``p / (1 - p) * n_in / n_out``
in-scope rows), so the overall accuracy at ``p`` is ``(1 - p) * in-scope accuracy + p *
fallback recall`` -- exact in expectation, the 100 out-of-scope rows are never copied. Every
figure is the mean of the two held-out halves (``halves``, seed 7): as shipped (``auto``, no
labels; also without its energy floor, as before it existed), and ``fit`` on one half
evaluated on the other with ``--objective accuracy`` and with ``--objective balanced`` at
several ``--expected-oos-rate`` values. A seeded resample (the out-of-scope rows drawn with
replacement up to the share, the in-scope rows kept) cross-checks the re-weighting at 20 %.

    .venv/bin/python benchmarks/accuracy.py --json --sections oos_curve   # Banking77: skipped
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

from semroute_stream._encoder import Encoder, EncoderConfig  # noqa: E402
from semroute_stream._encoder.backends import (  # noqa: E402
    available_backends,
    cpu_features,
    supported_precisions,
)
from semroute_stream._errors import ModelError  # noqa: E402
from semroute_stream._files import default_cache_root  # noqa: E402
from semroute_stream._offline.fit.evaluate import evaluate  # noqa: E402
from semroute_stream._offline.fit.fit_routes import fit_routes  # noqa: E402
from semroute_stream._offline.fit.thresholds import (  # noqa: E402
    DEFAULT_OBJECTIVE,
    DEFAULT_OOS_RATE,
    Objective,
)
from semroute_stream._offline.fit.workflows import add_labelled_utterances  # noqa: E402
from semroute_stream._offline.labelled import Labelled, load_labelled  # noqa: E402
from semroute_stream._routing.decision import decide  # noqa: E402
from semroute_stream._routing.head_cache import _fingerprint  # noqa: E402
from semroute_stream._routing.router import (  # noqa: E402
    compile_table,
    head_texts,
    resolve_routes,
    train_route_head,
    utterance_routes,
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
SECTIONS = ("datasets", "precision_agreement", "oos_curve")
OOS_RATES = (0.03, 0.10, 0.20, 0.30)
#: The fits of the oos_curve section: (label, objective, expected out-of-scope rate).
OOS_FITS = (
    ("fit_accuracy", "accuracy", 0.2),
    ("fit_balanced_0.1", "balanced", 0.1),
    ("fit_balanced_0.2", "balanced", 0.2),
    ("fit_balanced_0.3", "balanced", 0.3),
    ("fit_balanced_0.5", "balanced", 0.5),
)
OOS_GOAL = {"rate": 0.2, "overall_accuracy": 0.84, "fallback_recall": 0.70}
#: The variants of the precision section, and the pairs it compares (reference first).
VARIANTS = (("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16"))
PAIRS = (
    ("openvino/fp32", "openvino/bf16"),
    ("onnxruntime/fp32", "openvino/bf16"),
    ("onnxruntime/fp32", "openvino/fp32"),
)
AGREEMENT_GOAL = 0.995


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Embeddings:
    """Encodes texts once per (model, backend, precision, texts) and keeps them as .npy
    files."""

    def __init__(self, encoder: Encoder, directory: Path) -> None:
        self.encoder = encoder
        self.directory = directory
        self.encoded = 0

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        enc = self.encoder
        digest = hashlib.sha256(f"{enc.model_name}|{enc.backend}|{enc.precision}".encode())
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

    def fit(
        self,
        rows: np.ndarray | None,
        cache: Path | None,
        objective: Objective = DEFAULT_OBJECTIVE,
        oos_rate: float = DEFAULT_OOS_RATE,
    ) -> tuple[RoutesConfig, Any]:
        data = self.data if rows is None else subset(self.data, rows)
        queries = self.queries if rows is None else self.queries[rows]
        head = train_route_head(
            self.routes, self.utterances, self.names, model_name=self.model_name, cache_dir=cache
        )
        base = compile_table(self.routes, self.utterances, method="max")
        result = fit_routes(
            self.routes,
            base,
            head,
            queries,
            data.labels,
            texts=data.texts,
            objective=objective,
            oos_rate=oos_rate,
        )
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


def at_rates(in_scope: float, recall: float) -> dict[str, dict[str, float]]:
    """Overall accuracy at each out-of-scope share of ``OOS_RATES``, by re-weighting."""
    return {
        f"{rate:.2f}": {
            "overall_accuracy": round((1 - rate) * in_scope + rate * recall, 4),
            "in_scope_accuracy": round(in_scope, 4),
            "fallback_recall": round(recall, 4),
        }
        for rate in OOS_RATES
    }


def resampled_overall(case: Case, table: Any, rows: np.ndarray, rate: float, seed: int) -> float:
    """Overall accuracy on ``rows`` with the out-of-scope rows drawn (seeded, with
    replacement) until they are ``rate`` of the rows: the cross-check of the re-weighting."""
    data = subset(case.data, rows)
    pred = decide(table, case.queries[rows], data.texts).route
    gold = np.array(
        [-1 if label is None else case.routes.names.index(label) for label in data.labels]
    )
    oos = np.flatnonzero(gold < 0)
    n_in = int((gold >= 0).sum())
    n_out = round(rate / (1 - rate) * n_in)
    drawn = np.random.default_rng(seed).choice(oos, size=n_out, replace=True)
    right = int(np.sum(pred[gold >= 0] == gold[gold >= 0])) + int(np.sum(pred[drawn] < 0))
    return round(right / (n_in + n_out), 4)


def oos_curve(case: Case, cache: Path) -> dict[str, Any]:
    """As shipped and after ``fit`` (each objective), on held-out halves, at 3-30 % OOS."""
    if all(label is not None for label in case.data.labels):
        return {"skipped": "no out-of-scope rows in the dev file"}
    a, b = halves(case.data.labels)
    no_floor = case.routes.model_copy(
        update={"head": case.routes.head.model_copy(update={"min_energy": -1000.0})}
    )
    variants: dict[str, Any] = {"as_shipped": None, "as_shipped_without_energy_floor": None}
    variants.update({label: (objective, rate) for label, objective, rate in OOS_FITS})
    out: dict[str, Any] = {"rates": list(OOS_RATES), "goal": OOS_GOAL, "curves": {}}
    resampled: dict[str, list[float]] = {}
    for label, spec in variants.items():
        halves_figures = []
        for train, test in ((a, b), (b, a)):
            if label == "as_shipped":
                routes = case.routes
            elif label == "as_shipped_without_energy_floor":
                routes = no_floor
            else:
                objective, rate = spec
                routes, _ = case.fit(train, cache, objective, rate)
            resolution, figures = case.evaluate(routes, test, cache)
            halves_figures.append(figures)
            resampled.setdefault(label, []).append(
                resampled_overall(case, resolution.table, test, 0.2, seed=7)
            )
        in_scope = statistics.fmean(f["in_scope_accuracy"] for f in halves_figures)
        recall = statistics.fmean(f["fallback_recall"] for f in halves_figures)
        out["curves"][label] = {
            "method": resolution.method,
            "objective": None if spec is None else {"objective": spec[0], "oos_rate": spec[1]},
            "at": at_rates(in_scope, recall),
        }
        log(f"oos_curve {case.name} {label}: in-scope {in_scope:.4f} recall {recall:.4f}")
    out["resampled_0.20_overall"] = {k: round(statistics.fmean(v), 4) for k, v in resampled.items()}
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


def precision_unsupported() -> str | None:
    """Why the precision section cannot run here, or None."""
    if "openvino" not in available_backends():
        return "unsupported: openvino is not installed (pip install 'semroute-stream[openvino]')"
    features = cpu_features()
    if "bf16" not in supported_precisions("openvino", features):
        return (
            f"unsupported: {features.model} has no native bf16 units (AMX or AVX512-BF16); "
            f"its flags: {features.as_dict()['flags']}"
        )
    return None


def _cosine_stats(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    cos = np.sum(a.astype(np.float64) * b.astype(np.float64), axis=1)
    return {
        "min_cosine": round(float(cos.min()), 7),
        "p1_cosine": round(float(np.percentile(cos, 1)), 7),
    }


def precision_agreement(names: Sequence[str], root: Path) -> dict[str, Any]:
    """Each dataset routed with each variant's embeddings (routes as shipped, ``auto``);
    decision agreement and accuracy per pair of variants."""
    reason = precision_unsupported()
    if reason is not None:
        return {"unsupported": reason}
    started = time.perf_counter()
    encoders: dict[str, Encoder] = {}
    loads: dict[str, Any] = {}
    for backend, precision in VARIANTS:
        key = f"{backend}/{precision}"
        t0 = time.perf_counter()
        try:
            encoders[key] = Encoder(
                EncoderConfig(backend=backend, precision=precision)  # type: ignore[arg-type]
            )
        except ModelError as exc:
            return {"unsupported": f"unsupported: {key} does not load: {exc}"}
        enc = encoders[key]
        loads[key] = {
            "backend": enc.backend,
            "precision": enc.precision,
            "fidelity": enc.fidelity,
            "load_seconds": round(time.perf_counter() - t0, 2),
        }
    out: dict[str, Any] = {
        "goal_decision_agreement": AGREEMENT_GOAL,
        "method": "routes as shipped (auto); each variant embeds everything and trains its head",
        "variants": loads,
        "datasets": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        per_variant: dict[str, dict[str, tuple[Case, Any, Any, dict[str, Any]]]] = {}
        for key, enc in encoders.items():
            embed = Embeddings(enc, root / "bench-embeddings")
            heads = Path(tmp) / key.replace("/", "-")  # a fresh head cache per variant
            per_variant[key] = {}
            t0 = time.perf_counter()
            for name in names:
                case = Case(name, embed, enc.model_name)
                resolution = case.table(case.routes, heads)
                decisions = decide(resolution.table, case.queries, case.data.texts)
                figures = evaluate(
                    resolution.table, case.queries, case.data.labels, case.data.texts
                )
                per_variant[key][name] = (case, resolution, decisions, figures)
            log(
                f"precision: {key} routed in {time.perf_counter() - t0:.1f} s "
                f"({embed.encoded} texts encoded)"
            )
        for name in names:
            first = next(iter(per_variant.values()))[name][0]
            row: dict[str, Any] = {"n_rows": len(first.data)}
            row["accuracy"] = {
                key: {"method": v[name][1].method, **pick(v[name][3])}
                for key, v in per_variant.items()
            }
            comparisons: dict[str, Any] = {}
            for ref, other in PAIRS:
                case_a, res_a, dec_a, fig_a = per_variant[ref][name]
                case_b, res_b, dec_b, fig_b = per_variant[other][name]
                same = dec_a.route == dec_b.route
                route_of = utterance_routes(case_a.routes)
                n_routes = len(case_a.routes.routes)
                prints = np.abs(
                    _fingerprint(case_a.utterances, route_of, n_routes)
                    - _fingerprint(case_b.utterances, route_of, n_routes)
                )
                comparisons[f"{ref} vs {other}"] = {
                    "decision_agreement": round(float(same.mean()), 5),
                    "decisions_changed": int((~same).sum()),
                    "meets_goal": bool(same.mean() >= AGREEMENT_GOAL),
                    "top1_agreement": round(float((dec_a.best == dec_b.best).mean()), 5),
                    "fallback_agreement": round(
                        float((dec_a.is_fallback == dec_b.is_fallback).mean()), 5
                    ),
                    "methods": [res_a.method, res_b.method],
                    "overall_accuracy": [fig_a["overall_accuracy"], fig_b["overall_accuracy"]],
                    "overall_accuracy_delta": round(
                        fig_b["overall_accuracy"] - fig_a["overall_accuracy"], 5
                    ),
                    "query_cosine": _cosine_stats(case_a.queries, case_b.queries),
                    "utterance_cosine": _cosine_stats(case_a.utterances, case_b.utterances),
                    "head_fingerprint_max_diff": round(float(prints.max()), 6),
                }
            row["comparisons"] = comparisons
            out["datasets"][name] = row
            log(f"precision {name}: {json.dumps(comparisons)}")
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--cases", nargs="*", choices=list(CASES), default=list(CASES))
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated from {','.join(SECTIONS)} (default: all)",
    )
    parser.add_argument(
        "--backend",
        choices=("auto", "onnxruntime", "openvino"),
        default="auto",
        help="the encoder of the datasets section (default: auto, as shipped)",
    )
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    args = parser.parse_args(argv)
    sections = args.sections.split(",")
    unknown = [name for name in sections if name not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {','.join(SECTIONS)}")

    root = default_cache_root()
    report: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "cpu_count": _cpus(),
            "cpu_features": cpu_features().as_dict(),
        },
        "sections": sections,
    }
    section_seconds: dict[str, float] = {}
    if "datasets" in sections:
        started = time.perf_counter()
        encoder = Encoder(EncoderConfig(backend=args.backend, precision=args.precision))
        report["model"] = encoder.model_name
        report["encoder"] = {
            "backend": encoder.backend,
            "precision": encoder.precision,
            "fidelity": encoder.fidelity,
        }
        embed = Embeddings(encoder, root / "bench-embeddings")
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
            report["head_training"] = time_head(timing_case)
            report["decision_cost"] = time_decision(timing_case, encoder, cache)
        report["datasets"] = results
        section_seconds["datasets"] = time.perf_counter() - started
    if "oos_curve" in sections:
        started = time.perf_counter()
        encoder = Encoder(EncoderConfig(backend=args.backend, precision=args.precision))
        embed = Embeddings(encoder, root / "bench-embeddings")
        curves: dict[str, Any] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.cases:
                curves[name] = oos_curve(Case(name, embed, encoder.model_name), Path(tmp))
        report["oos_curve"] = curves
        section_seconds["oos_curve"] = time.perf_counter() - started
    if "precision_agreement" in sections:
        started = time.perf_counter()
        report["precision_agreement"] = precision_agreement(args.cases, root)
        section_seconds["precision_agreement"] = time.perf_counter() - started
    report["section_seconds"] = {k: round(v, 1) for k, v in section_seconds.items()}
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
    print(f"cpu: {json.dumps(report['machine']['cpu_features'])}")
    if "datasets" in report:
        print(f"model: {report['model']} ({report['encoder']})")
        print_datasets(report)
    if "oos_curve" in report:
        print_oos_curve(report["oos_curve"])
    precision = report.get("precision_agreement")
    if precision is not None:
        print_precision(precision)
    print(f"\nseconds per section: {report['section_seconds']}")


def print_datasets(report: dict[str, Any]) -> None:
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


def print_oos_curve(section: dict[str, Any]) -> None:
    print("\nout-of-scope curve (held-out halves; overall / in-scope / fallback recall):")
    for name, row in section.items():
        if "skipped" in row:
            print(f"  {name}: {row['skipped']}")
            continue
        print(f"  {name:<36}" + "".join(f"{f'{r:.0%} OOS':>22}" for r in row["rates"]))
        for label, curve in row["curves"].items():
            cells = "".join(
                f"{f['overall_accuracy']:>8.4f}{f['in_scope_accuracy']:>7.4f}"
                f"{f['fallback_recall']:>7.4f}"
                for f in curve["at"].values()
            )
            print(f"    {label:<34}{cells}")


def print_precision(section: dict[str, Any]) -> None:
    print("\nprecision agreement (routes as shipped, auto):")
    if "unsupported" in section:
        print(f"  {section['unsupported']}")
        return
    for key, load in section["variants"].items():
        print(f"  {key}: {load}")
    for name, row in section["datasets"].items():
        print(f"\n  {name} ({row['n_rows']} rows)")
        for key, figures in row["accuracy"].items():
            print(
                f"    {key:<18} {figures['method']:<10} overall {_f(figures['overall_accuracy'])}"
            )
        for pair, c in row["comparisons"].items():
            print(
                f"    {pair:<38} agreement {c['decision_agreement']:.5f} "
                f"({c['decisions_changed']} changed), top-1 {c['top1_agreement']:.5f}, "
                f"min query cosine {c['query_cosine']['min_cosine']:.6f}"
            )


if __name__ == "__main__":
    raise SystemExit(main())
