"""Fallback thresholds fitted on labelled data: exact cuts by sorting, then per route.

A threshold only matters where it changes which route (or the fallback) a row gets, so every
cut is the exact best one over the observed scores: ``best_cut`` for one set of rows,
``global_cut`` for one threshold shared by all routes, ``per_route_cuts`` for coordinate ascent
over routes, and ``fit_thresholds`` for the routes file of a similarity method.

What a cut maximises is the objective (``row_weights``): ``accuracy`` counts rows, so the
labelled file's share of out-of-scope rows becomes the share the cuts are fitted for;
``balanced`` re-weights the rows to an expected out-of-scope share ``oos_rate`` and maximises
the expected overall accuracy there, ``(1 - oos_rate) * in-scope accuracy + oos_rate *
fallback recall``, whatever the file's own share.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import numpy as np

from ..._routing.decision import METHODS, RouteTable, score_matrix
from ..._routing.schema import RoutesConfig
from ..labelled import label_indices

__all__ = [
    "DEFAULT_OBJECTIVE",
    "DEFAULT_OOS_RATE",
    "EDGE_MARGIN",
    "OBJECTIVES",
    "Objective",
    "best_cut",
    "fit_thresholds",
    "global_cut",
    "per_route_cuts",
    "row_weights",
    "tidy",
]

EDGE_MARGIN = 0.02  # how far past the lowest/highest score a threshold is put

Objective = Literal["balanced", "accuracy"]
"""What ``fit`` maximises: see ``row_weights``."""
OBJECTIVES: tuple[Objective, ...] = get_args(Objective)
DEFAULT_OBJECTIVE: Objective = "balanced"
DEFAULT_OOS_RATE = 0.2
"""The out-of-scope share ``balanced`` fits for when none is given (docs/benchmarks.md: fits
for 0.2 hold up from 3 % to 30 % out-of-scope traffic)."""


def row_weights(gold: np.ndarray, objective: Objective, oos_rate: float) -> np.ndarray:
    """Each labelled row's weight in the objective (float64; in-scope rows weigh 1).

    ``accuracy``: every row weighs 1 (rows right on the data, at the data's out-of-scope
    share). ``balanced``: out-of-scope rows (gold -1) weigh ``oos_rate / (1 - oos_rate) *
    n_in_scope / n_out_of_scope``, so the weighted accuracy is the expected overall accuracy
    of traffic with ``oos_rate`` out-of-scope queries. ``0 <= oos_rate < 1``."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r} (known: {', '.join(OBJECTIVES)})")
    if not (0.0 <= oos_rate < 1.0):
        raise ValueError(f"the expected out-of-scope rate must be in [0, 1), got {oos_rate!r}")
    weights = np.ones(len(gold), dtype=np.float64)
    oos = gold < 0
    n_oos, n_in = int(oos.sum()), int((~oos).sum())
    if objective == "balanced" and n_oos and n_in:
        weights[oos] = oos_rate / (1.0 - oos_rate) * n_in / n_oos
    return weights


def best_cut(
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


def tidy(t: float, uniq: np.ndarray) -> float:
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


def global_cut(
    scores: np.ndarray, gold: np.ndarray, anchor: float, weights: np.ndarray | None = None
) -> tuple[float, float, np.ndarray]:
    """One threshold for all routes (a row goes to its top route when that passes):
    ``(threshold, rows gained over rejecting everything, distinct top scores)``; ``weights``
    (``row_weights``; None: 1 each) weigh the rows."""
    rows = np.arange(len(gold))
    top = scores.argmax(axis=1)
    top_score = scores[rows, top]
    accept_gain = (gold == top).astype(np.float64) - (gold < 0)
    if weights is not None:
        accept_gain = accept_gain * weights
    finite = np.isfinite(top_score)
    if not finite.any():
        return anchor, 0.0, np.array([anchor])
    return best_cut(top_score[finite], accept_gain[finite], anchor)


def per_route_cuts(
    scores: np.ndarray,
    gold: np.ndarray,
    thresholds: np.ndarray,
    fittable: Sequence[int],
    anchor: float,
    *,
    min_gain: int,
    max_sweeps: int,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """Coordinate ascent over routes under the "highest-scoring passing route" rule: for each
    route, the exact best threshold given all the others (a threshold only matters on rows
    where that route would win if it passed), moved only when that gets at least
    ``min_gain`` more rows right (weighted by ``weights``, in-scope rows weighing 1).
    ``scores`` may hold ``-inf`` (the route cannot pass)."""
    w = np.ones(len(gold)) if weights is None else weights
    thresholds = thresholds.astype(np.float64).copy()
    rows = np.arange(len(gold))
    passing = np.where(scores >= thresholds, scores, -np.inf)
    for _ in range(max_sweeps):
        changed = False
        for r in fittable:
            own = scores[:, r]
            others = passing.copy()
            others[:, r] = -np.inf
            alt = others.argmax(axis=1)
            alt_score = others[rows, alt]
            alt = np.where(np.isfinite(alt_score), alt, -1)
            wins = np.isfinite(own) & ((own > alt_score) | ((own == alt_score) & (r < alt)))
            if not wins.any():
                continue
            gains = ((gold[wins] == r).astype(np.float64) - (gold[wins] == alt[wins])) * w[wins]
            t, gain, uniq = best_cut(own[wins], gains, anchor)
            if gain >= _gain_at(own[wins], gains, thresholds[r]) + min_gain:
                thresholds[r] = tidy(t, uniq)
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
    objective: Objective = "accuracy",
    oos_rate: float = DEFAULT_OOS_RATE,
) -> RoutesConfig:
    """New routes whose default and per-route thresholds maximise the objective on the data
    (``row_weights``; similarity methods: ``table.method`` must be max or top5_mean).

    The route-score matrix is computed once. First one global threshold (exact, by sorting);
    then coordinate ascent over routes (``per_route_cuts``). Routes with fewer than
    ``min_support`` labelled rows keep the global threshold (None in the file). ``table`` must
    be ``routes`` compiled. Both guards against overfitting were chosen by 2-fold
    cross-validation on the shared CLINC150 and Banking77 dev sets.
    """
    if min_gain < 1 or min_support < 1:
        raise ValueError("min_gain and min_support must be >= 1")
    if table.method not in METHODS:
        raise ValueError(f"fit_thresholds: {table.method!r} is not a similarity method")
    gold = label_indices(table, labels)
    weights = row_weights(gold, objective, oos_rate)
    scores = score_matrix(table, embeddings).scores.astype(np.float64)
    n_rows, n_routes = scores.shape
    if n_rows == 0:
        return routes.model_copy(deep=True)

    anchor = routes.effective_default_threshold(float(np.median(table.thresholds)))
    default, _, uniq = global_cut(scores, gold, anchor, weights)
    default = tidy(default, uniq)
    support = np.bincount(gold[gold >= 0], minlength=n_routes)
    fittable = [r for r in range(n_routes) if support[r] >= min_support]
    thresholds = per_route_cuts(
        scores,
        gold,
        np.full(n_routes, default),
        fittable,
        default,
        min_gain=min_gain,
        max_sweeps=max_sweeps,
        weights=weights,
    )

    own = [
        None if support[r] < min_support or float(t) == default else float(t)
        for r, t in enumerate(thresholds)
    ]
    return routes.model_copy(
        update={
            "method": table.method,
            "default_threshold": float(default),
            "routes": [
                route.model_copy(update={"threshold": t}, deep=True)
                for route, t in zip(routes.routes, own, strict=True)
            ],
        },
        deep=True,
    )
