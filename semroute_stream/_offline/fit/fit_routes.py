"""The method and its fallback fitted on labelled data: ``fit_routes``.

Every candidate (max, top5_mean, the head at each blend) gets its best global fallback setting
on the data; the winner is then refined per route (thresholds for the similarity methods; for
the head: confidence floors and a margin rule). "Best" is the objective's
(``thresholds.row_weights``): ``balanced`` (the default) maximises the expected overall
accuracy at a stated out-of-scope share rather than at the labelled file's own. Pure numpy;
the routes are never changed in place (``model_copy(update=...)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..._routing.decision import RouteTable, choose
from ..._routing.head_cache import HeadModel
from ..._routing.kernels import finite_softmax
from ..._routing.router import compile_table
from ..._routing.schema import (
    DECISION_METHODS,
    MAX_ENERGY,
    SIMILARITY_METHODS,
    DecisionMethod,
    RoutesConfig,
)
from ..._routing.selection import (
    BLEND_GRID,
    MethodChoice,
    candidate_label,
    choose_method,
    fit_temperature,
)
from .compare import (
    HeadFallback,
    LabelledScores,
    energy_scores,
    head_fallback,
    labelled_scores,
    top1_accuracy,
)
from .evaluate import ratio
from .thresholds import (
    DEFAULT_OBJECTIVE,
    DEFAULT_OOS_RATE,
    Objective,
    fit_thresholds,
    global_cut,
    per_route_cuts,
    row_weights,
)

__all__ = ["FitResult", "fit_routes"]


@dataclass(frozen=True)
class FitResult:
    """The routes to write, the method chosen and every candidate's figures."""

    routes: RoutesConfig
    method: DecisionMethod
    candidates: list[dict[str, Any]]  # each candidate's fitted accuracy on the data


@dataclass
class _Candidates:
    """Every candidate's global fallback on the data, and the best one."""

    options: list[tuple[DecisionMethod, float]]
    results: list[dict[str, Any]] = field(default_factory=list)
    head_settings: dict[int, HeadFallback] = field(default_factory=dict)
    best: int = 0


def fit_routes(
    routes: RoutesConfig,
    table: RouteTable,
    head: HeadModel | None,
    embeddings: np.ndarray,
    labels: Sequence[str | None],
    *,
    texts: Sequence[str] | None = None,
    methods: Sequence[DecisionMethod] = DECISION_METHODS,
    min_support: int = 5,
    min_gain: int = 2,
    max_sweeps: int = 10,
    objective: Objective = DEFAULT_OBJECTIVE,
    oos_rate: float = DEFAULT_OOS_RATE,
) -> FitResult:
    """Pick the method on labelled data and fit its fallback; the routes to write.

    Every candidate (``methods``; the head at each blend of ``BLEND_GRID``) gets its best
    *global* fallback setting on the data -- a threshold for the similarity methods; for the
    head a temperature (fitted on the in-scope rows), a confidence floor and a similarity
    floor -- and the candidate that then gets the most rows right wins (ties: max, top5_mean,
    then the head by increasing blend). Only then is the winner refined per route (routes
    with ``min_support`` labelled rows, moves worth ``min_gain`` rows; for the head also a
    ``min_margin``), so the comparison itself uses few parameters per candidate. What "best"
    means is ``objective`` at ``oos_rate`` (``thresholds.row_weights``); the head's energy
    floor is one of its global settings (kept at the cross-validation's when the data has
    no out-of-scope rows).

    ``table`` compiles ``routes`` (its utterances are used); ``head`` is the head trained on
    those utterances (None: the head is not a candidate); ``texts`` are the labelled rows'
    texts (needed by a head with a lexical view)."""
    if min_gain < 1 or min_support < 1:
        raise ValueError("min_gain and min_support must be >= 1")
    ls = labelled_scores(table, head, embeddings, labels, texts)
    weights = row_weights(ls.gold, objective, oos_rate)
    if len(ls.gold) == 0:
        return FitResult(routes.model_copy(deep=True), table.method, [])
    options: list[tuple[DecisionMethod, float]] = [
        (m, 0.0) for m in SIMILARITY_METHODS if m in methods
    ]
    if head is not None and "head" in methods:
        options += [("head", b) for b in BLEND_GRID]
    if not options:
        raise ValueError(f"no method to fit among {list(methods)!r}")
    cv_choice = choose_method(head.cv, allowed=("head",)) if head and head.cv else None
    found = _score_candidates(routes, ls, options, cv_choice, weights, objective)
    method, blend = options[found.best]
    if method != "head":
        compiled = compile_table(routes, table.utterance_embeddings, method=method)
        fitted = fit_thresholds(
            routes,
            compiled,
            embeddings,
            labels,
            min_support=min_support,
            min_gain=min_gain,
            max_sweeps=max_sweeps,
            objective=objective,
            oos_rate=oos_rate,
        )
        return FitResult(fitted, method, found.results)
    assert head is not None
    fb = found.head_settings[found.best]
    fitted = _fit_head(
        routes,
        ls,
        fb,
        blend,
        weights,
        min_support=min_support,
        min_gain=min_gain,
        max_sweeps=max_sweeps,
    )
    return FitResult(fitted, "head", found.results)


def _score_candidates(
    routes: RoutesConfig,
    ls: LabelledScores,
    options: list[tuple[DecisionMethod, float]],
    cv_choice: MethodChoice | None,
    weights: np.ndarray,
    objective: Objective,
) -> _Candidates:
    """Each candidate's best global fallback and the (weighted) rows it then gets right; the
    first candidate with the most wins."""
    gold = ls.gold
    in_scope = gold >= 0
    n_null = float(np.sum(weights[~in_scope]))
    anchor_conf = cv_choice.min_confidence if cv_choice else 0.0
    anchor_sim = cv_choice.min_similarity if cv_choice else 0.0
    share = _share_below_energy_floor(ls, cv_choice)
    # balanced with no out-of-scope rows to weigh a floor against: the prior-free floor stays
    # (accuracy takes the data's share, none, at its word).
    learn_energy = objective == "accuracy" or bool(np.any(~in_scope))
    found = _Candidates(options)
    best_gain = 0.0
    for i, (method, blend) in enumerate(options):
        s = ls.scores(method, blend)
        if method == "head":
            t = (
                fit_temperature(s[in_scope], gold[in_scope])
                if in_scope.any()
                else (cv_choice.temperature if cv_choice else 1.0)
            )
            anchor_energy = None
            if share is not None:
                energy = energy_scores(s[in_scope], t)
                anchor_energy = round(float(np.quantile(energy, share)), 4)
            fb = head_fallback(
                s,
                ls,
                temperature=t,
                anchor_confidence=anchor_conf,
                anchor_similarity=anchor_sim,
                anchor_energy=anchor_energy,
                weights=weights,
                learn_energy_floor=learn_energy,
            )
            found.head_settings[i] = fb
            gain = fb.gain
        else:
            anchor = routes.effective_default_threshold()
            _, gain, _ = global_cut(s.astype(np.float64), gold, anchor, weights)
        found.results.append(
            {
                "candidate": candidate_label(method, blend),
                "method": method,
                "top1_accuracy": top1_accuracy(s, gold),
                "fitted_overall_accuracy": ratio(gain + n_null, float(weights.sum())),
            }
        )
        if i == 0 or gain > best_gain + 1e-9:
            found.best, best_gain = i, gain
    for i, result in enumerate(found.results):
        result["chosen"] = i == found.best
    return found


def _share_below_energy_floor(ls: LabelledScores, choice: MethodChoice | None) -> float | None:
    """The share of the labelled in-scope rows below the cross-validation's energy floor (at
    its blend and temperature), or None. Each head candidate's energy anchor is the floor
    that rejects this share at its own blend and fitted temperature: the prior-free floor,
    carried over to the scale of the fit."""
    in_scope = ls.gold >= 0
    if choice is None or choice.min_energy is None or not in_scope.any():
        return None
    energy = energy_scores(ls.scores("head", choice.blend)[in_scope], choice.temperature)
    return float(np.mean(energy < choice.min_energy))


def _fit_head(
    routes: RoutesConfig,
    ls: LabelledScores,
    fb: HeadFallback,
    blend: float,
    weights: np.ndarray,
    *,
    min_support: int,
    min_gain: int,
    max_sweeps: int,
) -> RoutesConfig:
    """The head's global fallback ``fb`` refined per route (confidence floors) and with a
    margin rule when one pays: the routes to write."""
    gold = ls.gold
    n_routes = ls.nearest.shape[1]
    s = ls.scores("head", blend)
    proba = finite_softmax(s / fb.temperature)
    energy_ok = energy_scores(s, fb.temperature) >= fb.min_energy
    masked = np.where((ls.nearest >= fb.min_similarity) & energy_ok[:, None], proba, -np.inf)
    support = np.bincount(gold[gold >= 0], minlength=n_routes)
    fittable = [r for r in range(n_routes) if support[r] >= min_support]
    confidence = per_route_cuts(
        masked,
        gold,
        np.full(n_routes, fb.min_confidence),
        fittable,
        fb.min_confidence,
        min_gain=min_gain,
        max_sweeps=max_sweeps,
        weights=weights,
    )
    confidence = np.clip(confidence, 0.0, 1.0)
    margin = _fit_margin(masked, proba, confidence, gold, weights, min_gain=min_gain)
    own = [
        None if support[r] < min_support or float(c) == fb.min_confidence else float(c)
        for r, c in enumerate(confidence)
    ]
    head = routes.head.model_copy(
        update={
            "blend": float(blend),
            "temperature": float(fb.temperature),
            "min_confidence": float(fb.min_confidence),
            "min_margin": margin,
            "min_energy": round(float(np.clip(fb.min_energy, -MAX_ENERGY, MAX_ENERGY)), 4),
        },
        deep=True,
    )
    return routes.model_copy(
        update={
            "method": "head",
            "default_threshold": float(np.clip(fb.min_similarity, -1.0, 1.0)),
            "head": head,
            "routes": [
                route.model_copy(update={"threshold": None, "min_confidence": c}, deep=True)
                for route, c in zip(routes.routes, own, strict=True)
            ],
        },
        deep=True,
    )


def _fit_margin(
    masked: np.ndarray,
    proba: np.ndarray,
    confidence: np.ndarray,
    gold: np.ndarray,
    weights: np.ndarray,
    *,
    min_gain: int,
) -> float | None:
    """A ``min_margin`` (lead over the runner-up) when one gets ``min_gain`` more (weighted)
    rows right than none, else None."""
    passing = masked >= confidence[None, :]
    base_pred, _ = choose(masked, confidence, passing)
    base = float(np.sum(weights[base_pred == gold]))
    order = np.sort(proba, axis=1)
    lead = order[:, -1] - order[:, -2] if proba.shape[1] > 1 else np.ones(len(gold))
    best_gain, best_margin = 0.0, None
    for m in np.unique(np.round(np.quantile(lead, np.linspace(0.0, 0.3, 31)), 4)):
        if m <= 0:
            continue
        top = proba.argmax(axis=1)
        ok = lead >= m
        keep = passing & (ok[:, None] & (np.arange(proba.shape[1])[None, :] == top[:, None]))
        pred, _ = choose(masked, confidence, keep)
        gain = float(np.sum(weights[pred == gold])) - base
        if gain > best_gain:
            best_gain, best_margin = gain, float(m)
    return best_margin if best_gain >= min_gain else None
