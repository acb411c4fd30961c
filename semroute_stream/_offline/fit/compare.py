"""Every candidate method on labelled data: the raw scores, the head's fallback search and
``compare_methods`` (what ``eval`` prints next to the cross-validated accuracy)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..._routing.decision import METHODS, RouteTable
from ..._routing.head_cache import HeadModel
from ..._routing.kernels import finite_softmax, logsumexp
from ..._routing.schema import MAX_ENERGY, SIMILARITY_METHODS, DecisionMethod
from ..._routing.selection import (
    BLEND_GRID,
    CrossValidation,
    candidate_label,
    candidate_scores,
    choose_method,
)
from ..labelled import label_indices
from .evaluate import ratio
from .thresholds import best_cut, global_cut, tidy

__all__ = [
    "HeadFallback",
    "LabelledScores",
    "accuracy",
    "compare_methods",
    "energy_scores",
    "head_fallback",
    "labelled_scores",
    "top1_accuracy",
]


@dataclass(frozen=True, eq=False)
class LabelledScores:
    """Every candidate's raw ingredients on a labelled set."""

    gold: np.ndarray  # (N,) route indices, -1 = no route
    nearest: np.ndarray  # (N, R) max cosine per route
    top5: np.ndarray  # (N, R) top5_mean
    log_proba: np.ndarray | None  # (N, R) the head's log-probabilities (None: no head)

    def scores(self, method: DecisionMethod, blend: float) -> np.ndarray:
        """One candidate's ranking scores (see ``selection.candidate_scores``)."""
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


def accuracy(pred: np.ndarray, gold: np.ndarray) -> float | None:
    return ratio(np.sum(pred == gold), len(gold))


def top1_accuracy(scores: np.ndarray, gold: np.ndarray) -> float | None:
    in_scope = gold >= 0
    if not in_scope.any():
        return None
    return ratio(np.sum(scores.argmax(axis=1)[in_scope] == gold[in_scope]), in_scope.sum())


@dataclass(frozen=True)
class HeadFallback:
    """The head's calibrated fallback settings (global)."""

    temperature: float
    min_confidence: float
    min_similarity: float
    gain: float
    min_energy: float = -MAX_ENERGY  # -MAX_ENERGY: no energy floor


ENERGY_GRID = np.linspace(0.0, 0.2, 21)
"""The energy floors ``head_fallback`` tries: these quantiles of the in-scope rows' energy
scores (0: below every row), plus the cross-validation's floor."""


def energy_scores(s: np.ndarray, temperature: float) -> np.ndarray:
    """The energy score of each row (``logsumexp`` of the calibrated scores), float64."""
    return logsumexp(np.where(np.isfinite(s), s, -1e4).astype(np.float64) / temperature)


def _energy_floors(
    energy: np.ndarray, gold: np.ndarray, anchor: float | None, learn: bool
) -> np.ndarray:
    """The energy floors to try: quantiles of the in-scope rows' energy and ``anchor``; only
    ``anchor`` when not ``learn`` or there are no in-scope rows."""
    in_scope = energy[gold >= 0]
    if not learn or len(in_scope) == 0:
        return np.array([-MAX_ENERGY if anchor is None else anchor])
    grid = np.round(np.quantile(in_scope, ENERGY_GRID), 4)
    grid[0] = max(-MAX_ENERGY, float(in_scope.min()) - 1.0)
    extra = [] if anchor is None else [anchor]
    return np.unique(np.concatenate([grid, extra]))


def head_fallback(
    s: np.ndarray,
    ls: LabelledScores,
    *,
    temperature: float,
    anchor_confidence: float,
    anchor_similarity: float,
    anchor_energy: float | None = None,
    weights: np.ndarray | None = None,
    learn_energy_floor: bool = True,
) -> HeadFallback:
    """The global confidence, similarity and energy floors that get the most rows right
    (top route only; rows weighted by ``weights``, see ``thresholds.row_weights``): for each
    candidate similarity and energy floor, the exact best confidence cut. Ties go to the
    floors nearest the anchors (the cross-validation's). Without ``learn_energy_floor`` the
    energy floor stays ``anchor_energy``."""
    gold = ls.gold
    rows = np.arange(len(gold))
    proba = finite_softmax(s / temperature)
    top = proba.argmax(axis=1)
    p_top = proba[rows, top]
    sim_top = ls.nearest[rows, top].astype(np.float64)
    energy = energy_scores(s, temperature)
    gains = (gold == top).astype(np.float64) - (gold < 0)
    if weights is not None:
        gains = gains * weights
    floors = np.unique(
        np.concatenate(
            [
                [-1.0, anchor_similarity],
                np.round(np.quantile(sim_top, np.linspace(0.0, 0.5, 51)), 4) if len(gold) else [],
            ]
        )
    )
    anchor_e = anchor_energy if anchor_energy is not None else -MAX_ENERGY
    # (gain, -|energy floor - anchor|, -|floor - anchor|, floor, confidence, energy floor)
    best: tuple[float, float, float, float, float, float] | None = None
    for e_floor in _energy_floors(energy, gold, anchor_energy, learn_energy_floor):
        for floor in floors:
            ok = (sim_top >= floor) & (energy >= e_floor)
            if ok.any():
                c, gain, uniq = best_cut(p_top[ok], gains[ok], anchor_confidence)
                c = max(0.0, tidy(c, uniq))
            else:
                c, gain = anchor_confidence, 0.0
            key = (
                round(gain, 6),
                -abs(float(e_floor) - anchor_e),
                -abs(float(floor) - anchor_similarity),
                round(float(floor), 4),
                c,
                float(e_floor),
            )
            if best is None or key[:3] > best[:3]:
                best = key
    assert best is not None
    return HeadFallback(temperature, float(best[4]), float(best[3]), float(best[0]), float(best[5]))


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
    candidates: list[tuple[DecisionMethod, float]] = [(m, 0.0) for m in SIMILARITY_METHODS]
    if ls.log_proba is not None:
        candidates += [("head", b) for b in BLEND_GRID]
    return [_compare_one(ls, cv, method, blend) for method, blend in candidates]


def _compare_one(
    ls: LabelledScores, cv: CrossValidation | None, method: DecisionMethod, blend: float
) -> dict[str, Any]:
    """One candidate's row of ``compare_methods``."""
    rows = np.arange(len(ls.gold))
    s = ls.scores(method, blend)
    label = candidate_label(method, blend)
    entry: dict[str, Any] = {
        "candidate": label,
        "method": method,
        "top1_accuracy": top1_accuracy(s, ls.gold),
    }
    choice = choose_method(cv, allowed=(method,), blend=blend) if cv is not None else None
    if choice is not None:
        entry["cv_accuracy"] = choice.cv_accuracy.get(label)
    if method == "head":
        t = choice.temperature if choice is not None else 1.0
        proba = finite_softmax(s / t)
        top = proba.argmax(axis=1)
        conf = choice.min_confidence if choice is not None else 0.0
        floor = choice.min_similarity if choice is not None else -1.0
        e_floor = choice.min_energy if choice is not None else None
        accept = (proba[rows, top] >= conf) & (ls.nearest[rows, top] >= floor)
        if e_floor is not None:
            accept &= energy_scores(s, t) >= e_floor
        entry["overall_accuracy"] = accuracy(np.where(accept, top, -1), ls.gold)
        fb = head_fallback(
            s,
            ls,
            temperature=t,
            anchor_confidence=conf,
            anchor_similarity=floor,
            anchor_energy=e_floor,
        )
        gain = fb.gain
    else:
        thr = choice.similarity_threshold if choice is not None else 0.5
        top = s.argmax(axis=1)
        accept = s[rows, top] >= thr
        entry["overall_accuracy"] = accuracy(np.where(accept, top, -1), ls.gold)
        _, gain, _ = global_cut(s.astype(np.float64), ls.gold, thr)
    entry["fitted_overall_accuracy"] = ratio(gain + np.sum(ls.gold < 0), len(ls.gold))
    return entry
