"""Accuracy figures of a route table on labelled data, and authoring aids. Pure numpy.

* ``evaluate``: the figures of a route table on labelled data, with the utterances that most
  often pull queries to a wrong route and the route pairs whose utterances overlap (and, with
  ``detail``, the whole confusion matrix and the fallback's precision/recall curve, which
  ``eval --html`` draws);
* ``suspect_utterances``: the utterances the cross-validation sends to another route (no
  labelled data needed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..._routing.decision import (
    FALLBACK_REASONS,
    RouteTable,
    ScoreMatrix,
    choose,
    fallback_reasons,
    score_matrix,
)
from ..._routing.schema import DecisionMethod
from ..._routing.selection import CrossValidation, candidate_scores
from ..labelled import label_indices
from .fallback_curve import fallback_curve, fallback_slack

__all__ = [
    "AIDS_LISTED",
    "CONFUSIONS_LISTED",
    "EXAMPLES_LISTED",
    "confusing_utterances",
    "confusion_matrix",
    "evaluate",
    "overlapping_routes",
    "ratio",
    "report",
    "suspect_utterances",
]

CONFUSIONS_LISTED = 20
AIDS_LISTED = 10  # confusing utterances and overlapping route pairs listed by eval
EXAMPLES_LISTED = 3


def ratio(numerator: float, denominator: float) -> float | None:
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
    cm = confusion_matrix(n_routes, gold, pred)
    hits = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)

    per_route, f1s = _per_route(table.names, hits, support, predicted)
    confusions = _confusions(table.names, cm)
    n = len(gold)
    return {
        "method": table.method,
        "n": n,
        "n_in_scope": int(in_scope.sum()),
        "n_out_of_scope": int(n - in_scope.sum()),
        "overall_accuracy": ratio(np.sum(pred == gold), n),
        "in_scope_accuracy": ratio(np.sum((pred == gold) & in_scope), in_scope.sum()),
        "top1_accuracy": ratio(np.sum((top1 == gold) & in_scope), in_scope.sum()),
        "fallback_precision": ratio(hits[n_routes], predicted[n_routes]),
        "fallback_recall": ratio(hits[n_routes], support[n_routes]),
        "fallback_rate": ratio(predicted[n_routes], n),
        "macro_f1": round(float(np.mean(f1s)), 6) if f1s else None,
        "per_route": per_route,
        "confusions": confusions,
    }


def confusion_matrix(n_routes: int, gold: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """``(R + 1, R + 1)`` counts, gold by row and predicted by column; the last row and column
    are the fallback (gold: no route; predicted: the fallback taken)."""
    g = np.where(gold < 0, n_routes, gold)
    p = np.where(pred < 0, n_routes, pred)
    cm = np.bincount(g * (n_routes + 1) + p, minlength=(n_routes + 1) ** 2)
    return cm.reshape(n_routes + 1, n_routes + 1)


def _per_route(
    names: Sequence[str], hits: np.ndarray, support: np.ndarray, predicted: np.ndarray
) -> tuple[dict[str, dict[str, Any]], list[float]]:
    """Each route's precision, recall, F1, support and predictions; the F1s of routes with
    labelled rows."""
    per_route: dict[str, dict[str, Any]] = {}
    f1s: list[float] = []
    for r, name in enumerate(names):
        precision = ratio(hits[r], predicted[r])
        recall = ratio(hits[r], support[r])
        f1 = ratio(2 * hits[r], support[r] + predicted[r])
        if support[r]:
            f1s.append(f1 or 0.0)
        per_route[name] = {
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": int(support[r]),
            "predicted": int(predicted[r]),
        }
    return per_route, f1s


def _confusions(names: Sequence[str], cm: np.ndarray) -> list[dict[str, Any]]:
    """The most frequent (gold, predicted) pairs of the confusion matrix ``cm`` (the last row
    and column are the fallback: None)."""
    n_routes = len(names)
    off = cm.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None, kind="stable")[:CONFUSIONS_LISTED]
    return [
        {
            "gold": names[int(i) // (n_routes + 1)]
            if int(i) // (n_routes + 1) < n_routes
            else None,
            "predicted": names[int(i) % (n_routes + 1)]
            if int(i) % (n_routes + 1) < n_routes
            else None,
            "count": int(off.flat[i]),
        }
        for i in flat
        if off.flat[i] > 0
    ]


def evaluate(
    table: RouteTable,
    embeddings: np.ndarray,
    labels: Sequence[str | None],
    texts: Sequence[str] | None = None,
    *,
    detail: bool = False,
) -> dict[str, Any]:
    """Route ``embeddings`` (N, D) with ``table`` and compare with ``labels`` (None = fallback).

    Figures (None where undefined): ``overall_accuracy`` (null labels count as right when the
    fallback was taken), ``in_scope_accuracy`` (rows with a label), ``top1_accuracy`` (in-scope,
    ignoring thresholds), ``fallback_precision``/``fallback_recall``, ``per_route``
    precision/recall/F1, the most frequent ``confusions`` (gold -> predicted; None = fallback),
    ``fallback_reasons`` (how many fallbacks each reason caused), and the authoring aids
    ``confusing_utterances`` and ``overlapping_routes`` (``texts``, the queries, give
    examples; a head with a lexical view needs them). ``detail`` adds ``confusion_matrix``
    (``labels``: the route names then None, the fallback; ``counts``: gold by row, predicted
    by column) and ``fallback_curve`` (see ``fallback_curve.fallback_curve``).
    """
    gold = label_indices(table, labels)
    m = score_matrix(table, embeddings, texts)
    figures = report(table, m.scores, gold, passing=m.passing)
    pred, best = choose(m.scores, table.thresholds, m.passing)
    figures["fallback_reasons"] = _fallback_counts(table, m, pred, best)
    figures["confusing_utterances"] = confusing_utterances(table, m.sims, pred, gold, texts)
    figures["overlapping_routes"] = overlapping_routes(table)
    if detail:
        cm = confusion_matrix(len(table.names), gold, pred)
        figures["confusion_matrix"] = {"labels": [*table.names, None], "counts": cm.tolist()}
        figures["fallback_curve"] = fallback_curve(fallback_slack(table, m), gold)
    return figures


def _fallback_counts(
    table: RouteTable, m: ScoreMatrix, pred: np.ndarray, best: np.ndarray
) -> dict[str, int]:
    """How many fallbacks each reason caused (the decision's codes; reasons with none left
    out)."""
    fallback = pred < 0
    if not fallback.any():
        return {}
    codes = fallback_reasons(table, m, pred, best)[fallback]
    counts = np.bincount(codes, minlength=len(FALLBACK_REASONS))
    names = _HEAD_REASONS if table.method == "head" else ("below_threshold",)
    found = {name: int(counts[FALLBACK_REASONS.index(name)]) for name in names}
    return {name: count for name, count in found.items() if count}


_HEAD_REASONS = ("low_similarity", "low_energy", "low_confidence", "low_margin")


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
    table: RouteTable,
    cv: CrossValidation,
    method: DecisionMethod,
    blend: float,
    limit: int = AIDS_LISTED,
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
    if n_routes < 2:
        return []
    nn, closest = _nearest_neighbours(u, route_of, chunk)
    cross = (nn >= 0) & (route_of[np.maximum(nn, 0)] != route_of)
    pairs = np.sort(np.stack([route_of[cross], route_of[nn[cross]]], axis=1), axis=1)
    pair_counts: dict[tuple[int, int], int] = {}
    for a, b in pairs:
        pair_counts[(int(a), int(b))] = pair_counts.get((int(a), int(b)), 0) + 1
    sizes = np.bincount(route_of, minlength=n_routes)
    csim = _centroid_similarities(u, route_of, n_routes)
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
            "nn_rate": ratio(count, sizes[a] + sizes[b]),
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


def _nearest_neighbours(
    u: np.ndarray, route_of: np.ndarray, chunk: int
) -> tuple[np.ndarray, dict[tuple[int, int], tuple[float, int, int]]]:
    """Each utterance's nearest other utterance (-1: none), and for each route pair ``(a, b)``
    (``a < b``) its closest cross-route utterance pair ``(cosine, i, j)``."""
    n_utts = len(route_of)
    nn = np.full(n_utts, -1, dtype=np.intp)
    closest: dict[tuple[int, int], tuple[float, int, int]] = {}
    for start in range(0, n_utts, chunk):
        block = u[start : start + chunk] @ u.T
        idx = np.arange(start, min(start + chunk, n_utts))
        block[idx - start, idx] = -np.inf  # not itself
        if n_utts > 1:
            nn[idx] = block.argmax(axis=1)
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
    return nn, closest


def _centroid_similarities(u: np.ndarray, route_of: np.ndarray, n_routes: int) -> np.ndarray:
    """The cosines between the routes' mean utterances (``-inf`` on the diagonal)."""
    sums = np.zeros((n_routes, u.shape[1]), dtype=np.float64)
    np.add.at(sums, route_of, u)
    centroids = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    csim: np.ndarray = centroids @ centroids.T
    np.fill_diagonal(csim, -np.inf)
    return csim
