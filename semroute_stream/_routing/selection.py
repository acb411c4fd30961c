"""Cross-validation on the utterances, calibration and ``method: auto``'s choice: pure numpy.

Cross-validation (``FOLDS``-fold, by position within each route) gives held-out scores for
every candidate method -- nearest utterance (``max``), ``top5_mean`` and the head blended with
the nearest-utterance cosine at several weights -- from which ``method: auto`` picks the most
accurate, the head's temperature is calibrated and the default fallback floors are derived.
No labelled data is needed for any of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .kernels import log_softmax, logsumexp, max_by_route, softmax, top5_mean_by_route
from .lexical import LexicalHead
from .schema import DECISION_METHODS, SIMILARITY_METHODS, DecisionMethod
from .training import train_head

__all__ = [
    "AUTO_MIN_HELD_OUT",
    "BLEND_GRID",
    "ENERGY_QUANTILE",
    "FOLDS",
    "CrossValidation",
    "MethodChoice",
    "calibrated_nll",
    "candidate_label",
    "candidate_scores",
    "choose_method",
    "cross_validate",
    "fit_temperature",
    "fold_of",
]

FOLDS = 5
CV_MAX_ITER = 100
CV_GTOL = 1e-4
BLEND_GRID: tuple[float, ...] = (0.0, 2.5, 5.0, 10.0, 20.0, 40.0)
"""Weights of the nearest-utterance cosine added to the head's log-probabilities that
``auto`` compares (0 = the head alone; ``max`` is the limit of a very large weight)."""
AUTO_MIN_HELD_OUT = 20
"""Fewer held-out utterances than this and ``auto`` does not trust the comparison: max."""
CONFIDENCE_QUANTILE = 0.005
"""Default head fallback: the calibrated confidence below which this share of held-out
utterances falls (reject about as few real queries as the utterances suggest)."""
SIMILARITY_QUANTILE = 0.0025
"""Default similarity floor: the nearest-utterance cosine below which this share falls."""
ENERGY_QUANTILE = 0.01
"""Default energy floor of the head: the energy score (``kernels.logsumexp`` of the
calibrated scores) below which this share of held-out utterances falls. No out-of-scope rows
are needed, so it does not learn any out-of-scope share. Chosen on the shared CLINC150 dev
files re-weighted to 3-30 % out-of-scope (docs/benchmarks.md): 0.005 leaves fallback recall
near 0.70, 0.02 and more cost in-scope accuracy faster than they gain recall."""
TIE_SHARE = 0.002
"""Held-out accuracies this close (as a share of the held-out utterances, at least one
utterance) count as a tie: a similarity method wins it, else the head with the best
calibrated log-likelihood."""


# --- cross-validation on the utterances ----------------------------------------------------


@dataclass(frozen=True, eq=False)
class CrossValidation:
    """Held-out scores of every utterance that was held out (``FOLDS`` folds by position
    within each route; routes with one utterance are never held out)."""

    held_out: np.ndarray  # (n,) intp, utterance indices
    gold: np.ndarray  # (n,) intp, their routes
    head_log_proba: np.ndarray  # (n, R) float32, head (+ lexical view) trained without the fold
    max_score: np.ndarray  # (n, R) float32, nearest remaining utterance per route
    top5_score: np.ndarray  # (n, R) float32, top5_mean against the remaining utterances

    def __len__(self) -> int:
        return int(self.held_out.shape[0])


def fold_of(route_of: np.ndarray, folds: int = FOLDS) -> np.ndarray:
    """Each utterance's fold (its position within its route, mod ``folds``); -1 for the
    utterances of single-utterance routes (never held out)."""
    route_of = np.asarray(route_of, dtype=np.intp)
    n_routes = int(route_of.max()) + 1 if len(route_of) else 0
    counts = np.bincount(route_of, minlength=n_routes)
    first = np.searchsorted(route_of, route_of)
    position = np.arange(len(route_of)) - first
    return np.where(counts[route_of] >= 2, position % folds, -1).astype(np.intp)


def cross_validate(
    utterance_embeddings: np.ndarray,
    route_of: np.ndarray,
    extra_embeddings: np.ndarray,
    extra_route_of: np.ndarray,
    n_routes: int,
    *,
    l2: float,
    init: tuple[np.ndarray, np.ndarray] | None = None,
    folds: int = FOLDS,
    lexical: LexicalHead | None = None,
    texts: Sequence[str] = (),
    extra_texts: Sequence[str] = (),
) -> CrossValidation:
    """Train the head ``folds`` times, each time without one fold of the utterances (the
    extra examples -- route names -- always stay in), and score the held-out utterances with
    every method. ``init`` (the full head) warm-starts each fold: same optimum, fewer steps.
    ``lexical`` (the full lexical view; ``texts``/``extra_texts`` are the utterances' and the
    extra examples' texts) is retrained per fold on its vocabulary and warm-started the same
    way."""
    u = np.asarray(utterance_embeddings, dtype=np.float32)
    route_of = np.asarray(route_of, dtype=np.intp)
    fold = fold_of(route_of, folds)
    lex_rows = lexical.vocabulary.transform([*texts, *extra_texts]) if lexical is not None else None
    held: list[np.ndarray] = []
    log_proba: list[np.ndarray] = []
    max_scores: list[np.ndarray] = []
    top5_scores: list[np.ndarray] = []
    for f in range(folds):
        test = np.flatnonzero(fold == f)
        if len(test) == 0:
            continue
        train = fold != f
        features = np.concatenate([u[train], extra_embeddings])
        labels = np.concatenate([route_of[train], extra_route_of])
        weights, bias, _ = train_head(
            features, labels, n_routes, l2=l2, init=init, max_iter=CV_MAX_ITER, gtol=CV_GTOL
        )
        q = u[test]
        sims = q @ u[train].T
        held.append(test)
        lp = log_softmax(q @ weights + bias)
        if lexical is not None and lex_rows is not None:
            lp += _fold_lexical(lexical, lex_rows, len(u), train, test, labels, l2=l2)
        log_proba.append(lp)
        max_scores.append(max_by_route(sims, route_of[train], n_routes))
        top5_scores.append(top5_mean_by_route(sims, route_of[train], n_routes))
    return _held_out_scores(route_of, n_routes, held, log_proba, max_scores, top5_scores)


def _fold_lexical(
    lexical: LexicalHead,
    rows: np.ndarray,
    n_utterances: int,
    train: np.ndarray,
    test: np.ndarray,
    labels: np.ndarray,
    *,
    l2: float,
) -> np.ndarray:
    """The lexical view retrained without one fold (warm-started from the full view):
    ``weight`` times its log-probabilities of the held-out utterances. ``rows`` are the
    TF-IDF rows of the utterances, then of the extra examples."""
    utts, extra = rows[:n_utterances], rows[n_utterances:]
    lex_w, lex_b, _ = train_head(
        np.concatenate([utts[train], extra]),
        labels,
        lexical.n_routes,
        l2=l2,
        init=(lexical.weights, lexical.bias),
        max_iter=CV_MAX_ITER,
        gtol=CV_GTOL,
    )
    out: np.ndarray = np.float32(lexical.weight) * log_softmax(utts[test] @ lex_w + lex_b)
    return out


def _held_out_scores(
    route_of: np.ndarray,
    n_routes: int,
    held: list[np.ndarray],
    log_proba: list[np.ndarray],
    max_scores: list[np.ndarray],
    top5_scores: list[np.ndarray],
) -> CrossValidation:
    """The folds' scores put together in utterance order."""
    if not held:
        empty = np.zeros((0, n_routes), dtype=np.float32)
        return CrossValidation(np.zeros(0, np.intp), np.zeros(0, np.intp), empty, empty, empty)
    order = np.argsort(np.concatenate(held), kind="stable")
    index = np.concatenate(held)[order]
    return CrossValidation(
        held_out=index,
        gold=route_of[index],
        head_log_proba=np.concatenate(log_proba)[order].astype(np.float32),
        max_score=np.concatenate(max_scores)[order].astype(np.float32),
        top5_score=np.concatenate(top5_scores)[order].astype(np.float32),
    )


# --- method choice and calibration ---------------------------------------------------------


def candidate_scores(
    method: DecisionMethod,
    blend: float,
    log_proba: np.ndarray,
    max_score: np.ndarray,
    top5: np.ndarray,
) -> np.ndarray:
    """The ranking scores of one candidate (before calibration)."""
    if method == "max":
        return max_score
    if method == "top5_mean":
        return top5
    finite_max = np.where(np.isfinite(max_score), max_score, -1.0)
    out: np.ndarray = log_proba + np.float32(blend) * finite_max
    return out


def _nll(scores: np.ndarray, gold: np.ndarray, temperature: float) -> float:
    z = scores / temperature
    z -= z.max(axis=1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(gold)), gold]))


def _finite(scores: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.where(np.isfinite(scores), scores, -1e4).astype(np.float64)
    return out


def fit_temperature(scores: np.ndarray, gold: np.ndarray) -> float:
    """The temperature ``T`` minimising the mean negative log-likelihood of
    ``softmax(scores / T)`` at the gold routes (golden-section search on log T)."""
    if len(gold) == 0:
        return 1.0
    s = _finite(scores)
    lo, hi = float(np.log(1e-3)), float(np.log(1e3))
    ratio = (np.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = _nll(s, gold, np.exp(a)), _nll(s, gold, np.exp(b))
    for _ in range(50):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = _nll(s, gold, np.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = _nll(s, gold, np.exp(b))
    return float(np.round(np.exp((lo + hi) / 2.0), 4))


def calibrated_nll(scores: np.ndarray, gold: np.ndarray) -> tuple[float, float]:
    """``(temperature, mean NLL at it)`` of ``softmax(scores / T)``."""
    temperature = fit_temperature(scores, gold)
    return temperature, (_nll(_finite(scores), gold, temperature) if len(gold) else 0.0)


@dataclass(frozen=True)
class MethodChoice:
    """What ``auto`` chose from the cross-validation, and the defaults derived from it."""

    method: DecisionMethod
    blend: float  # head only
    temperature: float  # head only
    min_confidence: float  # head only: default confidence floor
    min_similarity: float  # head: default floor on the nearest-utterance cosine
    similarity_threshold: float  # max / top5_mean: default score threshold
    min_energy: float | None = None  # head only: default energy floor
    cv_accuracy: dict[str, float] = field(default_factory=dict)  # candidate label -> accuracy
    held_out: int = 0
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "blend": self.blend,
            "temperature": self.temperature,
            "min_confidence": self.min_confidence,
            "min_similarity": self.min_similarity,
            "similarity_threshold": self.similarity_threshold,
            "min_energy": self.min_energy,
            "cv_accuracy": self.cv_accuracy,
            "held_out": self.held_out,
            "reason": self.reason,
        }


def candidate_label(method: DecisionMethod, blend: float) -> str:
    return f"head(blend={blend:g})" if method == "head" else method


def _quantile(values: np.ndarray, q: float, default: float) -> float:
    finite = values[np.isfinite(values)]
    if len(finite) == 0:
        return default
    return round(float(np.quantile(finite.astype(np.float64), q)), 4)


def choose_method(
    cv: CrossValidation,
    *,
    allowed: Sequence[DecisionMethod] = DECISION_METHODS,
    blend: float | None = None,
) -> MethodChoice:
    """The candidate with the best held-out accuracy (ties, within ``TIE_SHARE``: max, then
    top5_mean, then the head with the lowest calibrated NLL), its calibrated temperature and
    default fallback floors.

    ``allowed`` limits the methods; ``blend`` fixes the head's blend instead of choosing it.
    When ``allowed`` has a similarity method too, the head needs ``AUTO_MIN_HELD_OUT``
    held-out utterances to be considered (too few to trust the comparison)."""
    candidates: list[tuple[DecisionMethod, float]] = [
        (m, 0.0) for m in SIMILARITY_METHODS if m in allowed
    ]
    few = len(cv) < AUTO_MIN_HELD_OUT and bool(candidates)
    if "head" in allowed and not few:
        candidates += [("head", b) for b in ((blend,) if blend is not None else BLEND_GRID)]
    if not candidates:
        raise ValueError(f"no method to choose from in {list(allowed)!r}")
    accuracy: dict[str, float] = {}
    hits: list[int] = []
    for method, b in candidates:
        scores = candidate_scores(method, b, cv.head_log_proba, cv.max_score, cv.top5_score)
        hits.append(int(np.sum(scores.argmax(axis=1) == cv.gold)))
        accuracy[candidate_label(method, b)] = round(hits[-1] / len(cv), 6) if len(cv) else 0.0
    # Candidates within TIE_SHARE of the best held-out accuracy are tied: a similarity
    # method among them wins (simpler), else the head whose calibrated probabilities fit
    # the held-out utterances best (lowest NLL).
    slack = max(1.0, TIE_SHARE * len(cv))
    tied = [i for i, h in enumerate(hits) if h >= max(hits) - slack]
    if candidates[tied[0]][0] != "head":
        best = candidates[tied[0]]
    elif len(tied) > 1 and len(cv):
        nll = []
        for i in tied:
            method, b = candidates[i]
            scores = candidate_scores(method, b, cv.head_log_proba, cv.max_score, cv.top5_score)
            nll.append(calibrated_nll(scores, cv.gold)[1])
        best = candidates[tied[int(np.argmin(nll))]]
    else:
        best = candidates[int(np.argmax(hits))]
    if few and "head" in allowed:
        reason = f"only {len(cv)} held-out utterances (< {AUTO_MIN_HELD_OUT}): no head"
    else:
        reason = f"best held-out accuracy on {len(cv)} utterances ({FOLDS}-fold CV)"
    return _defaults(cv, best[0], best[1], accuracy, reason)


def _defaults(
    cv: CrossValidation,
    method: DecisionMethod,
    blend: float,
    accuracy: dict[str, float],
    reason: str,
) -> MethodChoice:
    rows = np.arange(len(cv))
    similarity_threshold = 0.5
    temperature = 1.0
    min_confidence = 0.0
    min_similarity = 0.0
    min_energy = None
    if len(cv) == 0:
        return MethodChoice(method, blend, 1.0, 0.0, 0.0, 0.5, None, accuracy, 0, reason)
    if method == "head":
        scores = candidate_scores("head", blend, cv.head_log_proba, cv.max_score, cv.top5_score)
        temperature = fit_temperature(scores, cv.gold)
        proba = softmax(scores.astype(np.float64) / temperature)
        top = proba.argmax(axis=1)
        min_confidence = _quantile(proba[rows, top], CONFIDENCE_QUANTILE, 0.0)
        min_similarity = _quantile(cv.max_score[rows, top], SIMILARITY_QUANTILE, 0.0)
        energy = logsumexp(_finite(scores) / temperature)
        min_energy = float(np.clip(_quantile(energy, ENERGY_QUANTILE, 0.0), -1e3, 1e3))
    else:
        scores = cv.max_score if method == "max" else cv.top5_score
        top = scores.argmax(axis=1)
        similarity_threshold = _quantile(scores[rows, top], CONFIDENCE_QUANTILE, 0.5)
    return MethodChoice(
        method=method,
        blend=float(blend),
        temperature=temperature,
        min_confidence=min_confidence,
        min_similarity=min_similarity,
        similarity_threshold=similarity_threshold,
        min_energy=min_energy,
        cv_accuracy=accuracy,
        held_out=len(cv),
        reason=reason,
    )
