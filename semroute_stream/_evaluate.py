"""Accuracy figures on labelled data, and threshold fitting. Pure numpy apart from the loader.

Labelled data is JSONL, one ``{"text": "...", "label": "route name" | null}`` per line;
``null`` means the query belongs to no route, so the fallback is the right answer.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from semroute_stream._decision import RouteTable, choose, route_scores, similarities
from semroute_stream._errors import ConfigError
from semroute_stream._routes import RoutesConfig

__all__ = [
    "Labelled",
    "evaluate",
    "fit_thresholds",
    "label_indices",
    "load_labelled",
    "report",
]

MAX_REPORTED_PROBLEMS = 20
CONFUSIONS_LISTED = 20
EDGE_MARGIN = 0.02  # how far past the lowest/highest score a threshold is put


@dataclass(frozen=True)
class Labelled:
    texts: list[str]
    labels: list[str | None]

    def __len__(self) -> int:
        return len(self.texts)


def load_labelled(path: str | Path, route_names: Collection[str] | None = None) -> Labelled:
    """Read labelled JSONL; with ``route_names``, a label naming no route is an error too.

    Raises ConfigError listing each bad line as ``FILE: line N: reason``.
    """
    source = str(path)
    known = set(route_names) if route_names is not None else None
    texts: list[str] = []
    labels: list[str | None] = []
    problems: list[str] = []
    try:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    text, label = _parse_labelled(raw, known)
                except ValueError as err:
                    problems.append(f"line {number}: {err}")
                    continue
                texts.append(text)
                labels.append(label)
    except OSError as err:
        raise ConfigError(f"cannot read labelled data: {err}", file=source) from None
    if problems:
        more = len(problems) - MAX_REPORTED_PROBLEMS
        shown = problems[:MAX_REPORTED_PROBLEMS] + ([f"... and {more} more"] if more > 0 else [])
        error = ConfigError("\n".join(f"{source}: {p}" for p in shown))
        error.file = source
        raise error
    return Labelled(texts, labels)


def _parse_labelled(raw: bytes, known: set[str] | None) -> tuple[str, str | None]:
    try:
        row = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        raise ValueError(f"invalid JSON: {err}") from None
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    text = row.get("text")
    if not isinstance(text, str):
        raise ValueError("'text' must be a string")
    if "label" not in row:
        raise ValueError("missing 'label' (use null for 'no route')")
    label = row["label"]
    if label is not None and not isinstance(label, str):
        raise ValueError("'label' must be a route name or null")
    if label is not None and known is not None and label not in known:
        raise ValueError(f"label {label!r} names no route")
    return text, label


def label_indices(table: RouteTable, labels: Sequence[str | None]) -> np.ndarray:
    """Labels as route indices, -1 for null. Raises ValueError for a label naming no route."""
    index = {name: i for i, name in enumerate(table.names)}
    unknown = sorted({label for label in labels if label is not None and label not in index})
    if unknown:
        raise ValueError(f"labels naming no route: {', '.join(map(repr, unknown[:10]))}")
    return np.array([-1 if label is None else index[label] for label in labels], dtype=np.intp)


def _ratio(numerator: float, denominator: float) -> float | None:
    return round(float(numerator) / float(denominator), 6) if denominator else None


def report(
    table: RouteTable, scores: np.ndarray, gold: np.ndarray, thresholds: np.ndarray | None = None
) -> dict[str, Any]:
    """The figures for route scores ``(N, R)`` against gold route indices (-1 = fallback)."""
    thresholds = table.thresholds if thresholds is None else thresholds
    n_routes = len(table.names)
    pred, _ = choose(scores, thresholds)
    top1 = scores.argmax(axis=1) if len(gold) else np.zeros(0, dtype=np.intp)
    in_scope = gold >= 0
    g = np.where(gold < 0, n_routes, gold)
    p = np.where(pred < 0, n_routes, pred)
    cm = np.bincount(g * (n_routes + 1) + p, minlength=(n_routes + 1) ** 2)
    cm = cm.reshape(n_routes + 1, n_routes + 1)
    hits = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)

    per_route: dict[str, dict[str, Any]] = {}
    f1s: list[float] = []
    for r, name in enumerate(table.names):
        precision = _ratio(hits[r], predicted[r])
        recall = _ratio(hits[r], support[r])
        f1 = _ratio(2 * hits[r], support[r] + predicted[r])
        if support[r]:
            f1s.append(f1 or 0.0)
        per_route[name] = {
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": int(support[r]),
            "predicted": int(predicted[r]),
        }

    off = cm.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None, kind="stable")[:CONFUSIONS_LISTED]
    confusions = [
        {
            "gold": table.names[int(i) // (n_routes + 1)]
            if int(i) // (n_routes + 1) < n_routes
            else None,
            "predicted": table.names[int(i) % (n_routes + 1)]
            if int(i) % (n_routes + 1) < n_routes
            else None,
            "count": int(off.flat[i]),
        }
        for i in flat
        if off.flat[i] > 0
    ]
    n = len(gold)
    return {
        "method": table.method,
        "n": n,
        "n_in_scope": int(in_scope.sum()),
        "n_out_of_scope": int(n - in_scope.sum()),
        "overall_accuracy": _ratio(np.sum(pred == gold), n),
        "in_scope_accuracy": _ratio(np.sum((pred == gold) & in_scope), in_scope.sum()),
        "top1_accuracy": _ratio(np.sum((top1 == gold) & in_scope), in_scope.sum()),
        "fallback_precision": _ratio(hits[n_routes], predicted[n_routes]),
        "fallback_recall": _ratio(hits[n_routes], support[n_routes]),
        "fallback_rate": _ratio(predicted[n_routes], n),
        "macro_f1": round(float(np.mean(f1s)), 6) if f1s else None,
        "per_route": per_route,
        "confusions": confusions,
    }


def evaluate(
    table: RouteTable, embeddings: np.ndarray, labels: Sequence[str | None]
) -> dict[str, Any]:
    """Route ``embeddings`` (N, D) with ``table`` and compare with ``labels`` (None = fallback).

    Figures (None where undefined): ``overall_accuracy`` (null labels count as right when the
    fallback was taken), ``in_scope_accuracy`` (rows with a label), ``top1_accuracy`` (in-scope,
    ignoring thresholds), ``fallback_precision``/``fallback_recall``, ``per_route``
    precision/recall/F1, the most frequent ``confusions`` (gold -> predicted; None = fallback).
    """
    gold = label_indices(table, labels)
    return report(table, route_scores(table, similarities(table, embeddings)), gold)


# --- threshold fitting ---------------------------------------------------------------------


def _best_cut(
    scores: np.ndarray, gains: np.ndarray, anchor: float
) -> tuple[float, float, np.ndarray]:
    """The threshold ``t`` maximising ``sum(gains[scores >= t])``; ties go to the candidate
    nearest ``anchor``. Candidates: midpoints between distinct scores, a little below the
    lowest and above the highest, and ``anchor``. Returns ``(t, gain, distinct scores)``."""
    uniq, inverse = np.unique(scores.astype(np.float64), return_inverse=True)
    per_value = np.bincount(inverse, weights=gains, minlength=len(uniq))
    suffix = np.concatenate([np.cumsum(per_value[::-1])[::-1], [0.0]])
    candidates = np.concatenate(
        [
            [uniq[0] - EDGE_MARGIN],
            (uniq[:-1] + uniq[1:]) / 2,
            [uniq[-1] + EDGE_MARGIN],
            [anchor],
        ]
    )
    candidates = np.clip(candidates, -1.0, 1.0)
    cand_gain = suffix[np.searchsorted(uniq, candidates, side="left")]
    best = np.flatnonzero(cand_gain == cand_gain.max())
    pick = best[np.argmin(np.abs(candidates[best] - anchor))]
    return float(candidates[pick]), float(cand_gain[pick]), uniq


def _gain_at(scores: np.ndarray, gains: np.ndarray, t: float) -> float:
    return float(gains[scores >= t].sum())


def _tidy(t: float, uniq: np.ndarray) -> float:
    """``t`` with as few decimals as keep it between the same two observed scores."""
    below = uniq[uniq < t]
    above = uniq[uniq >= t]
    lo = float(below[-1]) if len(below) else -1.0 - 1e-9
    hi = float(above[0]) if len(above) else 1.0
    for decimals in range(2, 7):
        rounded = round(t, decimals)
        if lo < rounded <= hi and -1.0 <= rounded <= 1.0:
            return rounded
    return t


def fit_thresholds(
    routes: RoutesConfig,
    table: RouteTable,
    embeddings: np.ndarray,
    labels: Sequence[str | None],
    *,
    min_support: int = 5,
    min_gain: int = 2,
    max_sweeps: int = 10,
) -> RoutesConfig:
    """New routes whose default and per-route thresholds maximise overall accuracy on the data.

    The route-score matrix is computed once. First one global threshold (exact, by sorting);
    then coordinate ascent over routes: for each route, the exact best threshold given all the
    others (a threshold only matters on rows where that route would win if it passed), moved
    only when that gets at least ``min_gain`` more rows right. Routes with fewer than
    ``min_support`` labelled rows keep the global threshold (None in the file). ``table`` must
    be ``routes`` compiled (its method is used). Both guards against overfitting were chosen
    by 2-fold cross-validation on the shared CLINC150 and Banking77 dev sets.
    """
    if min_gain < 1 or min_support < 1:
        raise ValueError("min_gain and min_support must be >= 1")
    gold = label_indices(table, labels)
    scores = route_scores(table, similarities(table, embeddings)).astype(np.float64)
    n_rows, n_routes = scores.shape
    if n_rows == 0:
        return routes.model_copy(deep=True)
    rows = np.arange(n_rows)

    # 1. One threshold for all routes: a row goes to its top route when that passes.
    top = scores.argmax(axis=1)
    top_score = scores[rows, top]
    accept_gain = (gold == top).astype(np.float64) - (gold < 0)
    default, _, uniq = _best_cut(top_score, accept_gain, routes.default_threshold)
    default = _tidy(default, uniq)
    thresholds = np.full(n_routes, default)

    # 2. Per-route coordinate ascent under the "highest-scoring passing route" rule.
    support = np.bincount(gold[gold >= 0], minlength=n_routes)
    tunable = [r for r in range(n_routes) if support[r] >= min_support]
    passing = np.where(scores >= thresholds, scores, -np.inf)
    for _ in range(max_sweeps):
        changed = False
        for r in tunable:
            own = scores[:, r]
            others = passing.copy()
            others[:, r] = -np.inf
            alt = others.argmax(axis=1)
            alt_score = others[rows, alt]
            alt = np.where(np.isfinite(alt_score), alt, -1)
            wins = np.isfinite(own) & ((own > alt_score) | ((own == alt_score) & (r < alt)))
            if not wins.any():
                continue
            gains = (gold[wins] == r).astype(np.float64) - (gold[wins] == alt[wins])
            t, gain, uniq = _best_cut(own[wins], gains, default)
            if gain >= _gain_at(own[wins], gains, thresholds[r]) + min_gain:
                thresholds[r] = _tidy(t, uniq)
                passing[:, r] = np.where(own >= thresholds[r], own, -np.inf)
                changed = True
        if not changed:
            break

    fitted = routes.model_copy(deep=True)
    fitted.default_threshold = float(default)
    for r, route in enumerate(fitted.routes):
        t = float(thresholds[r])
        route.threshold = None if support[r] < min_support or t == default else t
    return fitted
