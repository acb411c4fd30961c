"""Accuracy figures on labelled data, method comparison, fitting, and authoring aids.
Pure numpy apart from the loader.

Labelled data is JSONL, one ``{"text": "...", "label": "route name" | null}`` per line;
``null`` means the query belongs to no route, so the fallback is the right answer.

* ``evaluate``: the figures of a route table on labelled data, with the utterances that most
  often pull queries to a wrong route and the route pairs whose utterances overlap.
* ``compare_methods``: every candidate method (max, top5_mean, the head at each blend) on
  the labelled data, next to its cross-validated accuracy on the utterances.
* ``fit_routes``: picks the method on labelled data and tunes its fallback (thresholds for
  the similarity methods; for the head: temperature, confidence floors, similarity floor and
  margin), and returns the routes to write.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from .._errors import ConfigError
from .._routing.decision import (
    METHODS,
    RouteTable,
    choose,
    score_matrix,
)
from .._routing.heads import (
    BLEND_GRID,
    CrossValidation,
    HeadModel,
    candidate_label,
    candidate_scores,
    choose_method,
    fit_temperature,
)
from .._routing.schema import RoutesConfig

__all__ = [
    "FitResult",
    "Labelled",
    "add_labelled_utterances",
    "compare_methods",
    "confusing_utterances",
    "evaluate",
    "fit_routes",
    "fit_thresholds",
    "label_indices",
    "load_labelled",
    "overlapping_routes",
    "report",
    "suspect_utterances",
]

MAX_REPORTED_PROBLEMS = 20
CONFUSIONS_LISTED = 20
AIDS_LISTED = 10  # confusing utterances and overlapping route pairs listed by eval
EXAMPLES_LISTED = 3
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
    table: RouteTable,
    scores: np.ndarray,
    gold: np.ndarray,
    thresholds: np.ndarray | None = None,
    passing: np.ndarray | None = None,
) -> dict[str, Any]:
    """The figures for route scores ``(N, R)`` against gold route indices (-1 = fallback);
    ``passing`` (N, R) replaces the ``scores >= thresholds`` test (the head's rule)."""
    thresholds = table.thresholds if thresholds is None else thresholds
    n_routes = len(table.names)
    pred, _ = choose(scores, thresholds, passing)
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
    table: RouteTable,
    embeddings: np.ndarray,
    labels: Sequence[str | None],
    texts: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Route ``embeddings`` (N, D) with ``table`` and compare with ``labels`` (None = fallback).

    Figures (None where undefined): ``overall_accuracy`` (null labels count as right when the
    fallback was taken), ``in_scope_accuracy`` (rows with a label), ``top1_accuracy`` (in-scope,
    ignoring thresholds), ``fallback_precision``/``fallback_recall``, ``per_route``
    precision/recall/F1, the most frequent ``confusions`` (gold -> predicted; None = fallback),
    ``fallback_reasons`` (how many fallbacks each reason caused), and the authoring aids
    ``confusing_utterances`` and ``overlapping_routes`` (``texts``, the queries, give
    examples; a head with a lexical view needs them).
    """
    gold = label_indices(table, labels)
    m = score_matrix(table, embeddings, texts)
    figures = report(table, m.scores, gold, passing=m.passing)
    pred, best = choose(m.scores, table.thresholds, m.passing)
    figures["fallback_reasons"] = _fallback_reasons(table, m.scores, m.nearest, pred, best)
    figures["confusing_utterances"] = confusing_utterances(table, m.sims, pred, gold, texts)
    figures["overlapping_routes"] = overlapping_routes(table)
    return figures


def _fallback_reasons(
    table: RouteTable, scores: np.ndarray, nearest: np.ndarray, pred: np.ndarray, best: np.ndarray
) -> dict[str, int]:
    fallback = pred < 0
    if not fallback.any():
        return {}
    if table.method != "head" or table.head is None:
        return {"below_threshold": int(fallback.sum())}
    rows = np.flatnonzero(fallback)
    b = best[rows]
    low_similarity = nearest[rows, b] < table.thresholds[b]
    low_confidence = ~low_similarity & (scores[rows, b] < table.head.min_confidence[b])
    other = ~low_similarity & ~low_confidence
    counts = {
        "low_similarity": int(low_similarity.sum()),
        "low_confidence": int(low_confidence.sum()),
        "low_margin": int(other.sum()),
    }
    return {k: v for k, v in counts.items() if v}


# --- authoring aids ------------------------------------------------------------------------


def confusing_utterances(
    table: RouteTable,
    sims: np.ndarray,
    pred: np.ndarray,
    gold: np.ndarray,
    texts: Sequence[str] | None = None,
    limit: int = AIDS_LISTED,
) -> list[dict[str, Any]]:
    """The utterances that most often pull labelled queries to a wrong route: for every
    query routed to a route that is not its label (including out-of-scope queries that were
    routed), the nearest utterance of the route it went to. Most frequent first."""
    wrong = np.flatnonzero((pred >= 0) & (pred != gold))
    if len(wrong) == 0:
        return []
    own = np.where(table.utterance_route[None, :] == pred[wrong][:, None], sims[wrong], -np.inf)
    culprit = own.argmax(axis=1)
    counts = np.bincount(culprit, minlength=len(table.utterances))
    order = np.argsort(-counts, kind="stable")
    out: list[dict[str, Any]] = []
    for u in order[:limit]:
        if counts[u] == 0:
            break
        rows = wrong[culprit == u]
        pulled: dict[str, int] = {}
        for g in gold[rows]:
            name = table.names[int(g)] if g >= 0 else None
            key = name if name is not None else "(no route)"
            pulled[key] = pulled.get(key, 0) + 1
        entry: dict[str, Any] = {
            "utterance": table.utterances[int(u)],
            "route": table.names[int(table.utterance_route[u])],
            "count": int(counts[u]),
            "pulled_from": dict(sorted(pulled.items(), key=lambda kv: (-kv[1], kv[0]))),
        }
        if texts is not None:
            entry["examples"] = [texts[int(r)] for r in rows[:EXAMPLES_LISTED]]
        out.append(entry)
    return out


def suspect_utterances(
    table: RouteTable, cv: CrossValidation, method: str, blend: float, limit: int = AIDS_LISTED
) -> list[dict[str, Any]]:
    """Utterances that the cross-validation (the utterance held out, the routes trained on
    the others) sends to another route, the most decided first (largest lead of that route
    over the utterance's own): often mislabelled or ambiguous examples. Needs no labelled
    data."""
    if len(cv) == 0:
        return []
    scores = candidate_scores(method, blend, cv.head_log_proba, cv.max_score, cv.top5_score)
    scores = np.where(np.isfinite(scores), scores, -1e4)
    rows = np.arange(len(cv))
    pred = scores.argmax(axis=1)
    lead = scores[rows, pred] - scores[rows, cv.gold]
    wrong = np.flatnonzero(pred != cv.gold)
    order = wrong[np.argsort(-lead[wrong], kind="stable")][:limit]
    return [
        {
            "utterance": table.utterances[int(cv.held_out[i])],
            "route": table.names[int(cv.gold[i])],
            "goes_to": table.names[int(pred[i])],
            "lead": round(float(lead[i]), 4),
        }
        for i in order
    ]


def overlapping_routes(
    table: RouteTable, limit: int = AIDS_LISTED, chunk: int = 1024
) -> list[dict[str, Any]]:
    """Route pairs whose utterances overlap, most overlapping first: ``nn_count`` utterances
    (of either route) whose nearest other utterance belongs to the other route,
    ``nn_rate`` that count over the pair's utterances, ``centroid_similarity`` the cosine
    of the routes' mean utterances, and the closest cross-route utterance pair. Pairs with
    no cross-route nearest neighbour are ranked by centroid similarity after the others."""
    u = table.utterance_embeddings
    route_of = table.utterance_route
    n_routes = len(table.names)
    n_utts = len(route_of)
    if n_routes < 2:
        return []
    nn = np.full(n_utts, -1, dtype=np.intp)
    nn_sim = np.full(n_utts, -np.inf, dtype=np.float32)
    closest: dict[tuple[int, int], tuple[float, int, int]] = {}
    for start in range(0, n_utts, chunk):
        block = u[start : start + chunk] @ u.T
        idx = np.arange(start, min(start + chunk, n_utts))
        block[idx - start, idx] = -np.inf  # not itself
        if n_utts > 1:
            nn[idx] = block.argmax(axis=1)
            nn_sim[idx] = block[idx - start, nn[idx]]
        # The closest utterance of another route, for each utterance.
        other = np.where(route_of[None, :] != route_of[idx][:, None], block, -np.inf)
        j = other.argmax(axis=1)
        for i, jj in zip(idx, j, strict=True):
            s = float(other[i - start, jj])
            if not np.isfinite(s):
                continue
            a, b = sorted((int(route_of[i]), int(route_of[jj])))
            if (a, b) not in closest or s > closest[(a, b)][0]:
                closest[(a, b)] = (s, int(i), int(jj))
    cross = (nn >= 0) & (route_of[np.maximum(nn, 0)] != route_of)
    pairs = np.sort(np.stack([route_of[cross], route_of[nn[cross]]], axis=1), axis=1)
    pair_counts: dict[tuple[int, int], int] = {}
    for a, b in pairs:
        pair_counts[(int(a), int(b))] = pair_counts.get((int(a), int(b)), 0) + 1
    sizes = np.bincount(route_of, minlength=n_routes)
    sums = np.zeros((n_routes, u.shape[1]), dtype=np.float64)
    np.add.at(sums, route_of, u)
    centroids = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    csim = centroids @ centroids.T
    np.fill_diagonal(csim, -np.inf)
    ranked = sorted(pair_counts, key=lambda p: (-pair_counts[p], -csim[p], p))
    if len(ranked) < limit:
        iu = np.triu_indices(n_routes, k=1)
        order = np.argsort(-csim[iu], kind="stable")
        for k in order:
            p = (int(iu[0][k]), int(iu[1][k]))
            if p not in pair_counts:
                ranked.append(p)
            if len(ranked) >= limit:
                break
    out: list[dict[str, Any]] = []
    for a, b in ranked[:limit]:
        count = pair_counts.get((a, b), 0)
        entry: dict[str, Any] = {
            "routes": [table.names[a], table.names[b]],
            "nn_count": count,
            "nn_rate": _ratio(count, sizes[a] + sizes[b]),
            "centroid_similarity": round(float(csim[a, b]), 4),
        }
        if (a, b) in closest:
            sim_ab, ua, ub = closest[(a, b)]
            if route_of[ua] != a:
                ua, ub = ub, ua
            entry["closest_pair"] = {
                "similarity": round(sim_ab, 4),
                "utterances": [table.utterances[ua], table.utterances[ub]],
            }
        out.append(entry)
    return out


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


def _global_cut(
    scores: np.ndarray, gold: np.ndarray, anchor: float
) -> tuple[float, float, np.ndarray]:
    """One threshold for all routes (a row goes to its top route when that passes):
    ``(threshold, rows gained over rejecting everything, distinct top scores)``."""
    rows = np.arange(len(gold))
    top = scores.argmax(axis=1)
    top_score = scores[rows, top]
    accept_gain = (gold == top).astype(np.float64) - (gold < 0)
    finite = np.isfinite(top_score)
    if not finite.any():
        return anchor, 0.0, np.array([anchor])
    return _best_cut(top_score[finite], accept_gain[finite], anchor)


def _per_route_cuts(
    scores: np.ndarray,
    gold: np.ndarray,
    thresholds: np.ndarray,
    tunable: Sequence[int],
    anchor: float,
    *,
    min_gain: int,
    max_sweeps: int,
) -> np.ndarray:
    """Coordinate ascent over routes under the "highest-scoring passing route" rule: for each
    route, the exact best threshold given all the others (a threshold only matters on rows
    where that route would win if it passed), moved only when that gets at least
    ``min_gain`` more rows right. ``scores`` may hold ``-inf`` (the route cannot pass)."""
    thresholds = thresholds.astype(np.float64).copy()
    rows = np.arange(len(gold))
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
            t, gain, uniq = _best_cut(own[wins], gains, anchor)
            if gain >= _gain_at(own[wins], gains, thresholds[r]) + min_gain:
                thresholds[r] = _tidy(t, uniq)
                passing[:, r] = np.where(own >= thresholds[r], own, -np.inf)
                changed = True
        if not changed:
            break
    return thresholds


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
    """New routes whose default and per-route thresholds maximise overall accuracy on the data
    (similarity methods: ``table.method`` must be max or top5_mean).

    The route-score matrix is computed once. First one global threshold (exact, by sorting);
    then coordinate ascent over routes (``_per_route_cuts``). Routes with fewer than
    ``min_support`` labelled rows keep the global threshold (None in the file). ``table`` must
    be ``routes`` compiled. Both guards against overfitting were chosen by 2-fold
    cross-validation on the shared CLINC150 and Banking77 dev sets.
    """
    if min_gain < 1 or min_support < 1:
        raise ValueError("min_gain and min_support must be >= 1")
    if table.method not in METHODS:
        raise ValueError(f"fit_thresholds: {table.method!r} is not a similarity method")
    gold = label_indices(table, labels)
    scores = score_matrix(table, embeddings).scores.astype(np.float64)
    n_rows, n_routes = scores.shape
    if n_rows == 0:
        return routes.model_copy(deep=True)

    anchor = routes.effective_default_threshold(float(np.median(table.thresholds)))
    default, _, uniq = _global_cut(scores, gold, anchor)
    default = _tidy(default, uniq)
    support = np.bincount(gold[gold >= 0], minlength=n_routes)
    tunable = [r for r in range(n_routes) if support[r] >= min_support]
    thresholds = _per_route_cuts(
        scores,
        gold,
        np.full(n_routes, default),
        tunable,
        default,
        min_gain=min_gain,
        max_sweeps=max_sweeps,
    )

    fitted = routes.model_copy(deep=True)
    fitted.method = table.method
    fitted.default_threshold = float(default)
    for r, route in enumerate(fitted.routes):
        t = float(thresholds[r])
        route.threshold = None if support[r] < min_support or t == default else t
    return fitted


# --- the head on labelled data, method comparison and fitting ------------------------------


@dataclass(frozen=True, eq=False)
class LabelledScores:
    """Every candidate's raw ingredients on a labelled set."""

    gold: np.ndarray  # (N,) route indices, -1 = no route
    nearest: np.ndarray  # (N, R) max cosine per route
    top5: np.ndarray  # (N, R) top5_mean
    log_proba: np.ndarray | None  # (N, R) the head's log-probabilities (None: no head)

    def scores(self, method: str, blend: float) -> np.ndarray:
        if method == "head":
            assert self.log_proba is not None
        lp = self.log_proba if self.log_proba is not None else self.nearest
        return candidate_scores(method, blend, lp, self.nearest, self.top5)


def labelled_scores(
    table: RouteTable,
    head: HeadModel | None,
    embeddings: np.ndarray,
    labels: Sequence[str | None],
    texts: Sequence[str] | None = None,
) -> LabelledScores:
    """The candidates' scores on labelled rows (``table`` gives the utterances; ``texts``,
    the rows' texts, are needed by a head with a lexical view)."""
    gold = label_indices(table, labels)
    q = np.asarray(embeddings, dtype=np.float32).reshape(-1, table.dim)
    sims = q @ table.utterance_embeddings.T
    nearest = METHODS["max"](table, sims)
    top5 = METHODS["top5_mean"](table, sims)
    log_proba = head.log_proba(q, texts) if head is not None else None
    return LabelledScores(gold, nearest, top5, log_proba)


def _accuracy(pred: np.ndarray, gold: np.ndarray) -> float | None:
    return _ratio(np.sum(pred == gold), len(gold))


def _top1(scores: np.ndarray, gold: np.ndarray) -> float | None:
    in_scope = gold >= 0
    if not in_scope.any():
        return None
    return _ratio(np.sum(scores.argmax(axis=1)[in_scope] == gold[in_scope]), in_scope.sum())


@dataclass(frozen=True)
class HeadFallback:
    """The head's calibrated fallback settings (global)."""

    temperature: float
    min_confidence: float
    min_similarity: float
    gain: float


def _head_fallback(
    s: np.ndarray,
    ls: LabelledScores,
    *,
    temperature: float,
    anchor_confidence: float,
    anchor_similarity: float,
) -> HeadFallback:
    """The global confidence and similarity floors that get the most rows right (top route
    only): for each candidate similarity floor, the exact best confidence cut."""
    gold = ls.gold
    rows = np.arange(len(gold))
    proba = softmax_rows(s / temperature)
    top = proba.argmax(axis=1)
    p_top = proba[rows, top]
    sim_top = ls.nearest[rows, top].astype(np.float64)
    gains = (gold == top).astype(np.float64) - (gold < 0)
    floors = np.unique(
        np.concatenate(
            [
                [-1.0, anchor_similarity],
                np.round(np.quantile(sim_top, np.linspace(0.0, 0.5, 51)), 4) if len(gold) else [],
            ]
        )
    )
    best: tuple[float, float, float, float] | None = None  # (gain, -|floor - anchor|, f, c)
    for floor in floors:
        ok = sim_top >= floor
        if ok.any():
            c, gain, uniq = _best_cut(p_top[ok], gains[ok], anchor_confidence)
            c = max(0.0, _tidy(c, uniq))
        else:
            c, gain = anchor_confidence, 0.0
        key = (round(gain, 6), -abs(float(floor) - anchor_similarity), round(float(floor), 4), c)
        if best is None or key[:2] > best[:2]:
            best = key
    assert best is not None
    return HeadFallback(temperature, float(best[3]), float(best[2]), float(best[0]))


def softmax_rows(z: np.ndarray) -> np.ndarray:
    z = np.where(np.isfinite(z), z, -1e4).astype(np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


def compare_methods(
    table: RouteTable,
    head: HeadModel | None,
    embeddings: np.ndarray,
    labels: Sequence[str | None],
    texts: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Every candidate method on labelled data: ``top1_accuracy`` (in scope, no fallback),
    ``overall_accuracy`` with the fallback defaults derived from the utterances alone (what
    ``auto`` would run), ``fitted_overall_accuracy`` with one global fallback setting fitted
    on this data (optimistic), and ``cv_accuracy`` on the utterances."""
    ls = labelled_scores(table, head, embeddings, labels, texts)
    cv = head.cv if head is not None else None
    out: list[dict[str, Any]] = []
    candidates: list[tuple[str, float]] = [("max", 0.0), ("top5_mean", 0.0)]
    if ls.log_proba is not None:
        candidates += [("head", b) for b in BLEND_GRID]
    rows = np.arange(len(ls.gold))
    for method, blend in candidates:
        s = ls.scores(method, blend)
        label = candidate_label(method, blend)
        entry: dict[str, Any] = {
            "candidate": label,
            "method": method,
            "top1_accuracy": _top1(s, ls.gold),
        }
        choice = choose_method(cv, allowed=(method,), blend=blend) if cv is not None else None
        if choice is not None:
            entry["cv_accuracy"] = choice.cv_accuracy.get(label)
        if method == "head":
            t = choice.temperature if choice is not None else 1.0
            proba = softmax_rows(s / t)
            top = proba.argmax(axis=1)
            conf = choice.min_confidence if choice is not None else 0.0
            floor = choice.min_similarity if choice is not None else -1.0
            accept = (proba[rows, top] >= conf) & (ls.nearest[rows, top] >= floor)
            entry["overall_accuracy"] = _accuracy(np.where(accept, top, -1), ls.gold)
            fb = _head_fallback(
                s, ls, temperature=t, anchor_confidence=conf, anchor_similarity=floor
            )
            gain = fb.gain
        else:
            thr = choice.similarity_threshold if choice is not None else 0.5
            top = s.argmax(axis=1)
            accept = s[rows, top] >= thr
            entry["overall_accuracy"] = _accuracy(np.where(accept, top, -1), ls.gold)
            _, gain, _ = _global_cut(s.astype(np.float64), ls.gold, thr)
        entry["fitted_overall_accuracy"] = _ratio(gain + np.sum(ls.gold < 0), len(ls.gold))
        out.append(entry)
    return out


def add_labelled_utterances(
    routes: RoutesConfig,
    utterance_embeddings: np.ndarray,
    texts: Sequence[str],
    labels: Sequence[str | None],
    embeddings: np.ndarray,
    rows: np.ndarray | None = None,
) -> tuple[RoutesConfig, np.ndarray, int]:
    """``routes`` with labelled rows appended to their route's utterances (rows with a
    label, among ``rows`` when given, whose text is not already one of that route's
    utterances), the matching utterance embeddings (route by route, as ``utterances_of``
    lists them; the rows' own embeddings, nothing is re-encoded) and how many were added."""
    out = routes.model_copy(deep=True)
    index = {name: i for i, name in enumerate(out.names)}
    vectors: list[list[np.ndarray]] = [[] for _ in out.routes]
    start = 0
    for i, route in enumerate(routes.routes):
        vectors[i] = list(utterance_embeddings[start : start + len(route.utterances)])
        start += len(route.utterances)
    seen = [{u.strip() for u in route.utterances} for route in out.routes]
    chosen = range(len(texts)) if rows is None else (int(r) for r in np.flatnonzero(rows))
    added = 0
    for row in chosen:
        label = labels[row]
        text = texts[row]
        if label is None or label not in index or not text.strip():
            continue
        r = index[label]
        if text.strip() in seen[r]:
            continue
        seen[r].add(text.strip())
        out.routes[r].utterances.append(text)
        vectors[r].append(np.asarray(embeddings[row], dtype=np.float32))
        added += 1
    dim = utterance_embeddings.shape[1]
    flat = [v for per_route in vectors for v in per_route]
    matrix = np.stack(flat).astype(np.float32) if flat else np.zeros((0, dim), np.float32)
    return out, matrix, added


@dataclass(frozen=True)
class FitResult:
    routes: RoutesConfig
    method: str
    candidates: list[dict[str, Any]]  # each candidate's fitted accuracy on the data


def fit_routes(
    routes: RoutesConfig,
    table: RouteTable,
    head: HeadModel | None,
    embeddings: np.ndarray,
    labels: Sequence[str | None],
    *,
    texts: Sequence[str] | None = None,
    methods: Sequence[str] = ("max", "top5_mean", "head"),
    min_support: int = 5,
    min_gain: int = 2,
    max_sweeps: int = 10,
) -> FitResult:
    """Pick the method on labelled data and tune its fallback; the routes to write.

    Every candidate (``methods``; the head at each blend of ``BLEND_GRID``) gets its best
    *global* fallback setting on the data -- a threshold for the similarity methods; for the
    head a temperature (fitted on the in-scope rows), a confidence floor and a similarity
    floor -- and the candidate that then gets the most rows right wins (ties: max, top5_mean,
    then the head by increasing blend). Only then is the winner refined per route (routes
    with ``min_support`` labelled rows, moves worth ``min_gain`` rows; for the head also a
    ``min_margin``), so the comparison itself uses few parameters per candidate.

    ``table`` compiles ``routes`` (its utterances are used); ``head`` is the head trained on
    those utterances (None: the head is not a candidate); ``texts`` are the labelled rows'
    texts (needed by a head with a lexical view)."""
    if min_gain < 1 or min_support < 1:
        raise ValueError("min_gain and min_support must be >= 1")
    ls = labelled_scores(table, head, embeddings, labels, texts)
    gold = ls.gold
    n_rows = len(gold)
    n_routes = len(table.names)
    if n_rows == 0:
        return FitResult(routes.model_copy(deep=True), table.method, [])
    in_scope = gold >= 0
    n_null = float(np.sum(~in_scope))
    cv_choice = choose_method(head.cv, allowed=("head",)) if head and head.cv else None
    anchor_conf = cv_choice.min_confidence if cv_choice else 0.0
    anchor_sim = cv_choice.min_similarity if cv_choice else 0.0

    candidates: list[tuple[str, float]] = [(m, 0.0) for m in ("max", "top5_mean") if m in methods]
    if head is not None and "head" in methods:
        candidates += [("head", b) for b in BLEND_GRID]
    if not candidates:
        raise ValueError(f"no method to fit among {list(methods)!r}")
    results: list[dict[str, Any]] = []
    best_index, best_gain = 0, 0.0
    head_settings: dict[int, HeadFallback] = {}
    for i, (method, blend) in enumerate(candidates):
        s = ls.scores(method, blend)
        if method == "head":
            t = (
                fit_temperature(s[in_scope], gold[in_scope])
                if in_scope.any()
                else (cv_choice.temperature if cv_choice else 1.0)
            )
            fb = _head_fallback(
                s, ls, temperature=t, anchor_confidence=anchor_conf, anchor_similarity=anchor_sim
            )
            head_settings[i] = fb
            gain = fb.gain
        else:
            anchor = routes.effective_default_threshold()
            _, gain, _ = _global_cut(s.astype(np.float64), gold, anchor)
        results.append(
            {
                "candidate": candidate_label(method, blend),
                "method": method,
                "top1_accuracy": _top1(s, gold),
                "fitted_overall_accuracy": _ratio(gain + n_null, n_rows),
            }
        )
        if i == 0 or gain > best_gain + 1e-9:
            best_index, best_gain = i, gain
    method, blend = candidates[best_index]
    for i, result in enumerate(results):
        result["chosen"] = i == best_index

    if method != "head":
        compiled = RouteTable.build(routes, table.utterance_embeddings, method=method)
        fitted = fit_thresholds(
            routes,
            compiled,
            embeddings,
            labels,
            min_support=min_support,
            min_gain=min_gain,
            max_sweeps=max_sweeps,
        )
        return FitResult(fitted, method, results)

    assert head is not None
    fb = head_settings[best_index]
    proba = softmax_rows(ls.scores("head", blend) / fb.temperature)
    masked = np.where(ls.nearest >= fb.min_similarity, proba, -np.inf)
    support = np.bincount(gold[in_scope], minlength=n_routes)
    tunable = [r for r in range(n_routes) if support[r] >= min_support]
    confidence = _per_route_cuts(
        masked,
        gold,
        np.full(n_routes, fb.min_confidence),
        tunable,
        fb.min_confidence,
        min_gain=min_gain,
        max_sweeps=max_sweeps,
    )
    confidence = np.clip(confidence, 0.0, 1.0)
    margin = _fit_margin(masked, proba, confidence, gold, min_gain=min_gain)

    fitted = routes.model_copy(deep=True)
    fitted.method = "head"
    fitted.default_threshold = float(np.clip(fb.min_similarity, -1.0, 1.0))
    fitted.head = routes.head.model_copy(
        update={
            "blend": float(blend),
            "temperature": float(fb.temperature),
            "min_confidence": float(fb.min_confidence),
            "min_margin": margin,
        }
    )
    for r, route in enumerate(fitted.routes):
        route.threshold = None
        c = float(confidence[r])
        route.min_confidence = None if support[r] < min_support or c == fb.min_confidence else c
    return FitResult(fitted, "head", results)


def _fit_margin(
    masked: np.ndarray,
    proba: np.ndarray,
    confidence: np.ndarray,
    gold: np.ndarray,
    *,
    min_gain: int,
) -> float | None:
    """A ``min_margin`` (lead over the runner-up) when one gets ``min_gain`` more rows right
    than none, else None."""
    passing = masked >= confidence[None, :]
    base_pred, _ = choose(masked, confidence, passing)
    base = int(np.sum(base_pred == gold))
    order = np.sort(proba, axis=1)
    lead = order[:, -1] - order[:, -2] if proba.shape[1] > 1 else np.ones(len(gold))
    best_gain, best_margin = 0, None
    for m in np.unique(np.round(np.quantile(lead, np.linspace(0.0, 0.3, 31)), 4)):
        if m <= 0:
            continue
        top = proba.argmax(axis=1)
        ok = lead >= m
        keep = passing & (ok[:, None] & (np.arange(proba.shape[1])[None, :] == top[:, None]))
        pred, _ = choose(masked, confidence, keep)
        gain = int(np.sum(pred == gold)) - base
        if gain > best_gain:
            best_gain, best_margin = gain, float(m)
    return best_margin if best_gain >= min_gain else None
