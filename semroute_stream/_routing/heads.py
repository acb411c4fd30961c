"""The learned route head: a multinomial logistic regression on the utterance embeddings.

Pure numpy. The head is trained when routes load, on every route's example utterances (and,
by default, each route's name as one more example: ``lost_or_stolen_card`` -> "lost or
stolen card"), with L2 regularisation and a compact full-batch L-BFGS. A second regression on
the same texts' words (``_lexical``: TF-IDF of words and word pairs) is its lexical view; its
log-probabilities are added with the weight ``head.lexical`` (0 turns it off). Training is
deterministic (zero start, fixed iteration rules) and takes a few seconds for 150 routes x
1,500 utterances on two cores.

Cross-validation on the utterances (``FOLDS``-fold, by position within each route) gives
held-out scores for every candidate method -- nearest utterance (``max``), ``top5_mean`` and
the head blended with the nearest-utterance cosine at several weights -- from which
``method: auto`` picks the most accurate, the head's temperature is calibrated and the default
fallback floors are derived. No labelled data is needed for any of it.

Weights and cross-validation scores are cached in ``<cache root>/heads/<key>.npz`` (the
encoder's cache root: ``$SEMROUTE_CACHE_DIR``, ``$XDG_CACHE_HOME/semroute-stream`` or
``~/.cache/semroute-stream``), keyed by a hash of the model name, the route names and
utterances and the head's training settings; files are written to a temporary name and moved
into place, and a cache that cannot be read or written is only a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .decision import head_log_proba, log_softmax
from .lexical import MAX_TERMS, LexicalHead, Vocabulary

__all__ = [
    "AUTO_MIN_HELD_OUT",
    "BLEND_GRID",
    "FOLDS",
    "CrossValidation",
    "HeadModel",
    "MethodChoice",
    "calibrated_nll",
    "candidate_label",
    "candidate_scores",
    "choose_method",
    "cross_validate",
    "default_head_cache_dir",
    "fit_temperature",
    "fold_of",
    "head_cache_key",
    "load_or_train_head",
    "log_softmax",
    "max_by_route",
    "name_text",
    "softmax",
    "top5_mean_by_route",
    "train_head",
    "train_lexical",
]

log = logging.getLogger(__name__)

HEAD_VERSION = 2
"""Bump when training changes: it is part of the cache key."""

FOLDS = 5
MAX_ITER = 300
GTOL = 1e-5
MEMORY = 10
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
TIE_SHARE = 0.002
"""Held-out accuracies this close (as a share of the held-out utterances, at least one
utterance) count as a tie: a similarity method wins it, else the head with the best
calibrated log-likelihood."""
TOP5 = 5


# --- small numeric helpers -----------------------------------------------------------------


def softmax(z: np.ndarray) -> np.ndarray:
    shifted = np.exp(z - z.max(axis=1, keepdims=True))
    out: np.ndarray = shifted / shifted.sum(axis=1, keepdims=True)
    return out


def max_by_route(sims: np.ndarray, route_of: np.ndarray, n_routes: int) -> np.ndarray:
    """``(B, U)`` similarities -> ``(B, R)`` nearest-utterance similarity per route; ``-inf``
    for a route with no utterance among the columns. ``route_of`` need not be sorted."""
    out = np.full((sims.shape[0], n_routes), -np.inf, dtype=np.float32)
    if sims.shape[0] == 0 or sims.shape[1] == 0:
        return out
    order = np.argsort(route_of, kind="stable")
    ordered = route_of[order]
    present, starts = np.unique(ordered, return_index=True)
    out[:, present] = np.maximum.reduceat(sims[:, order], starts, axis=1)
    return out


def top5_mean_by_route(sims: np.ndarray, route_of: np.ndarray, n_routes: int) -> np.ndarray:
    """semantic-router's rule on ``(B, U)`` similarities: the mean of each route's utterances
    among the global top 5; ``-inf`` for routes outside it."""
    n_rows, n_utts = sims.shape
    k = min(TOP5, n_utts)
    if n_rows == 0 or k == 0:
        return np.full((n_rows, n_routes), -np.inf, dtype=np.float32)
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    top_sims = np.take_along_axis(sims, top, axis=1)
    cells = (np.arange(n_rows)[:, None] * n_routes + route_of[top]).ravel()
    size = n_rows * n_routes
    sums = np.bincount(cells, weights=top_sims.ravel(), minlength=size).reshape(n_rows, n_routes)
    counts = np.bincount(cells, minlength=size).reshape(n_rows, n_routes)
    means = sums / np.maximum(counts, 1)
    return np.where(counts > 0, means, -np.inf).astype(np.float32)


def name_text(name: str) -> str:
    """A route name as a training example: ``lost_or_stolen-card`` -> ``lost or stolen card``."""
    return " ".join(name.replace("_", " ").replace("-", " ").split()) or name


# --- training ------------------------------------------------------------------------------


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    # numpy's own loop: a BLAS level-1 call can be 20x slower when other processes load
    # the cores and OpenBLAS threads wait for each other.
    return float(np.einsum("i,i->", a, b))


def _lbfgs(
    fun: Any, x0: np.ndarray, *, max_iter: int, gtol: float, memory: int = MEMORY
) -> tuple[np.ndarray, int]:
    """Minimise a smooth convex ``fun(x) -> (value, gradient)``: L-BFGS with Armijo
    backtracking. Stops at ``max_iter``, when the largest gradient entry is ``<= gtol``, or
    when a line search finds no decrease (float32 noise near the optimum)."""
    x = x0
    value, grad = fun(x)
    steps: list[tuple[np.ndarray, np.ndarray, float]] = []  # (s, y, 1 / y.s)
    iteration = 0
    for iteration in range(1, max_iter + 1):  # noqa: B007 - reported to the caller
        if float(np.max(np.abs(grad))) <= gtol:
            break
        q = -grad
        if steps:
            alphas: list[float] = []
            for s, y, rho in reversed(steps):
                a = rho * _dot(s, q)
                alphas.append(a)
                q -= a * y
            s, y, rho = steps[-1]
            q *= 1.0 / (rho * _dot(y, y))
            for (s, y, rho), a in zip(steps, reversed(alphas), strict=True):
                q += (a - rho * _dot(y, q)) * s
        slope = _dot(grad, q)
        if slope >= 0:  # not a descent direction: restart from the gradient
            steps.clear()
            q = -grad
            slope = -_dot(grad, grad)
        step = 1.0 if steps else min(1.0, 1.0 / max(float(np.max(np.abs(grad))), 1e-12))
        for _ in range(40):
            candidate = x + step * q
            new_value, new_grad = fun(candidate)
            if new_value <= value + 1e-4 * step * slope:
                break
            step *= 0.5
        else:
            break
        s, y = candidate - x, new_grad - grad
        ys = _dot(y, s)
        if ys > 1e-12:
            steps.append((s, y, 1.0 / ys))
            if len(steps) > memory:
                steps.pop(0)
        x, value, grad = candidate, new_value, new_grad
    return x, iteration


def train_head(
    features: np.ndarray,
    labels: np.ndarray,
    n_routes: int,
    *,
    l2: float,
    init: tuple[np.ndarray, np.ndarray] | None = None,
    max_iter: int = MAX_ITER,
    gtol: float = GTOL,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Multinomial logistic regression: minimise mean cross-entropy + ``l2``/2 ||W||^2 (the
    bias is not penalised). Returns ``(W (D, R) float32, b (R,) float32, iterations)``.

    Matrix products run in float32, the optimiser state in float64. Deterministic for the
    same inputs on the same machine."""
    x = np.ascontiguousarray(features, dtype=np.float32)
    y = np.asarray(labels, dtype=np.intp)
    n, dim = x.shape
    if n == 0:
        raise ValueError("the head needs at least one training example")
    rows = np.arange(n)
    size = dim * n_routes

    def fun(w: np.ndarray) -> tuple[float, np.ndarray]:
        weights = w[:size].reshape(dim, n_routes)
        z = x @ weights.astype(np.float32)
        z += w[size:].astype(np.float32)
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        total = e.sum(axis=1)
        loss = float(np.mean(np.log(total.astype(np.float64)) - z[rows, y]))
        loss += 0.5 * l2 * float(np.sum(weights * weights))
        g = e / total[:, None]
        g[rows, y] -= 1.0
        g /= n
        grad_w = (x.T @ g).astype(np.float64) + l2 * weights
        return loss, np.concatenate([grad_w.ravel(), g.sum(axis=0, dtype=np.float64)])

    if init is None:
        x0 = np.zeros(size + n_routes)
    else:
        x0 = np.concatenate([np.asarray(init[0], np.float64).ravel(), np.asarray(init[1])])
    w, iterations = _lbfgs(fun, x0, max_iter=max_iter, gtol=gtol)
    weights = w[:size].reshape(dim, n_routes).astype(np.float32)
    bias = w[size:].astype(np.float32)
    return weights, bias, iterations


def train_lexical(
    texts: Sequence[str],
    labels: np.ndarray,
    n_routes: int,
    *,
    l2: float,
    weight: float,
) -> LexicalHead:
    """The lexical view: a regression on the TF-IDF rows of ``texts``, vocabulary fitted on
    them."""
    vocabulary = Vocabulary.fit(texts)
    weights, bias, _ = train_head(vocabulary.transform(texts), labels, n_routes, l2=l2)
    return LexicalHead(vocabulary, weights, bias, weight)


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
    if lexical is not None:
        lex_rows = lexical.vocabulary.transform([*texts, *extra_texts])
        lex_utts, lex_extra = lex_rows[: len(u)], lex_rows[len(u) :]
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
        if lexical is not None:
            lex_w, lex_b, _ = train_head(
                np.concatenate([lex_utts[train], lex_extra]),
                labels,
                n_routes,
                l2=l2,
                init=(lexical.weights, lexical.bias),
                max_iter=CV_MAX_ITER,
                gtol=CV_GTOL,
            )
            lp += np.float32(lexical.weight) * log_softmax(lex_utts[test] @ lex_w + lex_b)
        log_proba.append(lp)
        max_scores.append(max_by_route(sims, route_of[train], n_routes))
        top5_scores.append(top5_mean_by_route(sims, route_of[train], n_routes))
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
    method: str, blend: float, log_proba: np.ndarray, max_score: np.ndarray, top5: np.ndarray
) -> np.ndarray:
    """The ranking scores of one candidate (before calibration)."""
    if method == "max":
        return max_score
    if method == "top5_mean":
        return top5
    finite_max = np.where(np.isfinite(max_score), max_score, -1.0)
    out: np.ndarray = log_proba + np.float32(blend) * finite_max
    return out


def _candidates() -> list[tuple[str, float]]:
    return [("max", 0.0), ("top5_mean", 0.0), *(("head", b) for b in BLEND_GRID)]


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

    method: str  # "max", "top5_mean" or "head"
    blend: float  # head only
    temperature: float  # head only
    min_confidence: float  # head only: default confidence floor
    min_similarity: float  # head: default floor on the nearest-utterance cosine
    similarity_threshold: float  # max / top5_mean: default score threshold
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
            "cv_accuracy": self.cv_accuracy,
            "held_out": self.held_out,
            "reason": self.reason,
        }


def candidate_label(method: str, blend: float) -> str:
    return f"head(blend={blend:g})" if method == "head" else method


def _quantile(values: np.ndarray, q: float, default: float) -> float:
    finite = values[np.isfinite(values)]
    if len(finite) == 0:
        return default
    return round(float(np.quantile(finite.astype(np.float64), q)), 4)


def choose_method(
    cv: CrossValidation,
    *,
    allowed: Sequence[str] = ("max", "top5_mean", "head"),
    blend: float | None = None,
) -> MethodChoice:
    """The candidate with the best held-out accuracy (ties, within ``TIE_SHARE``: max, then
    top5_mean, then the head with the lowest calibrated NLL), its calibrated temperature and
    default fallback floors.

    ``allowed`` limits the methods; ``blend`` fixes the head's blend instead of choosing it.
    When ``allowed`` has a similarity method too, the head needs ``AUTO_MIN_HELD_OUT``
    held-out utterances to be considered (too few to trust the comparison)."""
    candidates = [(m, 0.0) for m in ("max", "top5_mean") if m in allowed]
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
    cv: CrossValidation, method: str, blend: float, accuracy: dict[str, float], reason: str
) -> MethodChoice:
    rows = np.arange(len(cv))
    similarity_threshold = 0.5
    temperature = 1.0
    min_confidence = 0.0
    min_similarity = 0.0
    if len(cv) == 0:
        return MethodChoice(method, blend, 1.0, 0.0, 0.0, 0.5, accuracy, 0, reason)
    if method == "head":
        scores = candidate_scores("head", blend, cv.head_log_proba, cv.max_score, cv.top5_score)
        temperature = fit_temperature(scores, cv.gold)
        proba = softmax(scores.astype(np.float64) / temperature)
        top = proba.argmax(axis=1)
        min_confidence = _quantile(proba[rows, top], CONFIDENCE_QUANTILE, 0.0)
        min_similarity = _quantile(cv.max_score[rows, top], SIMILARITY_QUANTILE, 0.0)
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
        cv_accuracy=accuracy,
        held_out=len(cv),
        reason=reason,
    )


# --- the trained head and its cache --------------------------------------------------------


@dataclass(frozen=True, eq=False)
class HeadModel:
    weights: np.ndarray  # (D, R) float32
    bias: np.ndarray  # (R,) float32
    cv: CrossValidation | None
    key: str
    cached: bool  # loaded from the cache
    seconds: float  # training (+ cross-validation) time, or cache load time
    iterations: int = 0
    lexical: LexicalHead | None = None  # the lexical view (None: head.lexical is 0)

    def log_proba(self, queries: np.ndarray, texts: Sequence[str] | None) -> np.ndarray:
        """The head's uncalibrated scores for normalised queries (and their texts)."""
        return head_log_proba(self.weights, self.bias, self.lexical, queries, texts)


def head_cache_key(
    model_name: str,
    route_names: Sequence[str],
    utterances: Sequence[Sequence[str]],
    *,
    l2: float,
    use_names: bool,
    with_cv: bool,
    dim: int,
    lexical: float = 0.0,
) -> str:
    """A hash of everything the head's weights depend on (not thresholds, endpoints, ...)."""
    payload = json.dumps(
        {
            "version": HEAD_VERSION,
            "model": model_name,
            "dim": dim,
            "l2": l2,
            "use_names": use_names,
            "lexical": lexical,
            "max_terms": MAX_TERMS,
            "cv": with_cv,
            "folds": FOLDS,
            "routes": [[n, list(u)] for n, u in zip(route_names, utterances, strict=True)],
        },
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


def default_head_cache_dir() -> Path:
    from .._model_build import default_cache_root

    return default_cache_root() / "heads"


_CACHE_ARRAYS = ("weights", "bias", "fingerprint")
_CV_ARRAYS = ("held_out", "gold", "head_log_proba", "max_score", "top5_score")
_LEX_ARRAYS = ("lex_terms", "lex_idf", "lex_weights", "lex_bias")


def _fingerprint(utterance_embeddings: np.ndarray, route_of: np.ndarray, n: int) -> np.ndarray:
    """Each route's mean utterance embedding: checks the cache was made with these vectors."""
    sums = np.zeros((n, utterance_embeddings.shape[1]), dtype=np.float64)
    np.add.at(sums, route_of, utterance_embeddings)
    counts = np.maximum(np.bincount(route_of, minlength=n), 1)
    out: np.ndarray = (sums / counts[:, None]).astype(np.float32)
    return out


def _read_cache(
    path: Path, fingerprint: np.ndarray, with_cv: bool, lexical: float
) -> HeadModel | None:
    started = time.perf_counter()
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        log.warning("route head cache %s is unreadable (%s): retraining", path, err)
        return None
    needed = _CACHE_ARRAYS + (_CV_ARRAYS if with_cv else ()) + (_LEX_ARRAYS if lexical else ())
    if any(name not in arrays for name in needed):
        return None
    stored = arrays["fingerprint"]
    if stored.shape != fingerprint.shape or not np.allclose(stored, fingerprint, atol=1e-3):
        log.info("route head cache %s was made with other embeddings: retraining", path)
        return None
    cv = CrossValidation(**{name: arrays[name] for name in _CV_ARRAYS}) if with_cv else None
    lexical_head = None
    if lexical:
        vocabulary = Vocabulary(tuple(str(t) for t in arrays["lex_terms"]), arrays["lex_idf"])
        lexical_head = LexicalHead(
            vocabulary, arrays["lex_weights"], arrays["lex_bias"], float(lexical)
        )
    return HeadModel(
        weights=arrays["weights"],
        bias=arrays["bias"],
        cv=cv,
        key=path.stem,
        cached=True,
        seconds=time.perf_counter() - started,
        lexical=lexical_head,
    )


def _write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)  # type: ignore[arg-type]
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as err:
        log.warning("cannot write the route head cache %s: %s", path, err)


def load_or_train_head(
    utterance_embeddings: np.ndarray,
    route_of: np.ndarray,
    name_embeddings: np.ndarray | None,
    n_routes: int,
    *,
    key: str,
    l2: float,
    with_cv: bool,
    cache_dir: Path | None,
    lexical: float = 0.0,
    texts: Sequence[str] = (),
    name_texts: Sequence[str] = (),
) -> HeadModel:
    """The head (and, with ``with_cv``, its cross-validation): from ``cache_dir/<key>.npz``
    when there, else trained and written there. ``cache_dir=None`` disables the cache.

    ``lexical`` > 0 adds the lexical view with that weight, trained on ``texts`` (the
    utterances) and ``name_texts`` (the names' texts, when ``name_embeddings`` is given)."""
    u = np.ascontiguousarray(utterance_embeddings, dtype=np.float32)
    route_of = np.asarray(route_of, dtype=np.intp)
    fingerprint = _fingerprint(u, route_of, n_routes)
    path = cache_dir / f"{key}.npz" if cache_dir is not None else None
    if path is not None:
        hit = _read_cache(path, fingerprint, with_cv, lexical)
        if hit is not None:
            return hit
    started = time.perf_counter()
    if name_embeddings is not None and len(name_embeddings):
        extra = np.ascontiguousarray(name_embeddings, dtype=np.float32)
        extra_route = np.arange(n_routes, dtype=np.intp)
    else:
        extra = np.zeros((0, u.shape[1]), dtype=np.float32)
        extra_route = np.zeros(0, dtype=np.intp)
    features = np.concatenate([u, extra])
    labels = np.concatenate([route_of, extra_route])
    weights, bias, iterations = train_head(features, labels, n_routes, l2=l2)
    extra_texts = list(name_texts) if len(extra) else []
    lexical_head = None
    if lexical:
        if len(texts) != len(u) or len(extra_texts) != len(extra):
            raise ValueError("the lexical view needs the text of every utterance and name")
        lexical_head = train_lexical(
            [*texts, *extra_texts], labels, n_routes, l2=l2, weight=lexical
        )
    cv = (
        cross_validate(
            u,
            route_of,
            extra,
            extra_route,
            n_routes,
            l2=l2,
            init=(weights, bias),
            lexical=lexical_head,
            texts=texts,
            extra_texts=extra_texts,
        )
        if with_cv
        else None
    )
    seconds = time.perf_counter() - started
    if path is not None:
        arrays: dict[str, np.ndarray] = {
            "weights": weights,
            "bias": bias,
            "fingerprint": fingerprint,
        }
        if cv is not None:
            arrays.update({name: getattr(cv, name) for name in _CV_ARRAYS})
        if lexical_head is not None:
            arrays["lex_terms"] = np.array(lexical_head.vocabulary.terms, dtype=str)
            arrays["lex_idf"] = lexical_head.vocabulary.idf
            arrays["lex_weights"] = lexical_head.weights
            arrays["lex_bias"] = lexical_head.bias
        _write_cache(path, arrays)
    key_out = path.stem if path is not None else key
    return HeadModel(weights, bias, cv, key_out, False, seconds, iterations, lexical_head)
