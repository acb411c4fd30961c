"""The numeric kernels every routing step shares: pure numpy, no I/O, one home each.

Used by the decision (``decision``), the cross-validation and method choice (``selection``),
and the offline tools (``_offline``). Where two callers need slightly different arithmetic the
kernels are kept apart, named by what differs, so that figures stay bit-identical:
``softmax`` keeps its input's dtype; ``finite_softmax`` first replaces ``±inf`` (routes with
no score) by ``-1e4`` and computes in float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .lexical import LexicalHead

__all__ = [
    "NO_SCORE",
    "TOP5",
    "finite_softmax",
    "head_log_proba",
    "log_softmax",
    "logsumexp",
    "margins",
    "max_by_route",
    "runner_up",
    "softmax",
    "top5_mean_by_route",
]

TOP5 = 5
"""How many nearest utterances ``top5_mean`` averages over (semantic-router's rule)."""
NO_SCORE = -1e4
"""What ``finite_softmax`` puts in place of ``±inf`` scores."""


# --- softmaxes -----------------------------------------------------------------------------


def log_softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax (float32 in, float32 out)."""
    shifted = z - z.max(axis=1, keepdims=True)
    out: np.ndarray = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return out


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax in ``z``'s dtype (scores must be finite)."""
    shifted = np.exp(z - z.max(axis=1, keepdims=True))
    out: np.ndarray = shifted / shifted.sum(axis=1, keepdims=True)
    return out


def logsumexp(z: np.ndarray) -> np.ndarray:
    """Row-wise ``log(sum(exp(z)))`` in ``z``'s dtype (scores must be finite): the head's
    energy score when ``z`` are its calibrated scores. A query like the utterances of some
    route gets a high score from at least one route; one like none of them gets low scores
    from all, whatever their softmax says (the negative free energy of Liu et al., 2020,
    "Energy-based out-of-distribution detection")."""
    top = z.max(axis=1, keepdims=True)
    out: np.ndarray = (top + np.log(np.exp(z - top).sum(axis=1, keepdims=True)))[:, 0]
    return out


def finite_softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 of scores that may hold ``±inf`` (taken as ``NO_SCORE``)."""
    return softmax(np.where(np.isfinite(z), z, NO_SCORE).astype(np.float64))


# --- route scores from utterance similarities ----------------------------------------------


def max_by_route(
    sims: np.ndarray, route_of: np.ndarray, n_routes: int, starts: np.ndarray | None = None
) -> np.ndarray:
    """``(B, U)`` similarities -> ``(B, R)`` float32 nearest-utterance similarity per route;
    ``-inf`` for a route with no utterance among the columns.

    ``route_of`` need not be sorted. ``starts``, when the columns are grouped by route in
    route order with every route present (a route table's ``route_starts``), is each route's
    first column: one ``reduceat`` without sorting (the maximum does not depend on order)."""
    if sims.shape[0] == 0 or sims.shape[1] == 0:
        return np.full((sims.shape[0], n_routes), -np.inf, dtype=np.float32)
    if starts is not None:
        return np.maximum.reduceat(sims, starts, axis=1).astype(np.float32, copy=False)
    out = np.full((sims.shape[0], n_routes), -np.inf, dtype=np.float32)
    order = np.argsort(route_of, kind="stable")
    present, first = np.unique(route_of[order], return_index=True)
    out[:, present] = np.maximum.reduceat(sims[:, order], first, axis=1)
    return out


def top5_mean_by_route(sims: np.ndarray, route_of: np.ndarray, n_routes: int) -> np.ndarray:
    """semantic-router's rule on ``(B, U)`` similarities: the query's global top-5 utterances,
    grouped by route; a route scores the mean of its utterances among them (float32), routes
    absent from the top 5 get ``-inf``."""
    n_rows, n_utts = sims.shape
    k = min(TOP5, n_utts)
    if n_rows == 0 or k == 0:
        return np.full((n_rows, n_routes), -np.inf, dtype=np.float32)
    # Stable sort: among equal similarities the lower utterance index comes first.
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    top_sims = np.take_along_axis(sims, top, axis=1)
    cells = (np.arange(n_rows)[:, None] * n_routes + route_of[top]).ravel()
    size = n_rows * n_routes
    sums = np.bincount(cells, weights=top_sims.ravel(), minlength=size).reshape(n_rows, n_routes)
    counts = np.bincount(cells, minlength=size).reshape(n_rows, n_routes)
    means = sums / np.maximum(counts, 1)
    return np.where(counts > 0, means, -np.inf).astype(np.float32)


# --- the head ------------------------------------------------------------------------------


def head_log_proba(
    weights: np.ndarray,
    bias: np.ndarray,
    lexical: LexicalHead | None,
    queries: np.ndarray,
    texts: Sequence[str] | None,
) -> np.ndarray:
    """The head's (uncalibrated) scores: ``log_softmax(q W + b)``, plus ``lexical.weight``
    times the lexical view's log-probabilities of ``texts`` when the head has one."""
    log_p = log_softmax(queries @ weights + bias)
    if lexical is not None:
        if texts is None or len(texts) != len(queries):
            raise ValueError(
                "this route head has a lexical view: pass the query texts with the embeddings "
                f"({len(queries)} embeddings, {'no' if texts is None else len(texts)} texts)"
            )
        log_p += np.float32(lexical.weight) * log_softmax(lexical.logits(texts))
    return log_p


def margins(scores: np.ndarray) -> np.ndarray:
    """Each route's lead over the best other route (negative for all but the top one)."""
    n_routes = scores.shape[1]
    if n_routes < 2:
        return np.full_like(scores, np.inf)
    order = np.argpartition(-scores, 1, axis=1)[:, :2]
    first = np.take_along_axis(scores, order[:, :1], axis=1)
    second = np.take_along_axis(scores, order[:, 1:2], axis=1)
    top = np.maximum(first, second)
    runner = np.minimum(first, second)
    other = np.where(scores >= top, runner, top)
    out: np.ndarray = scores - other
    return out


def runner_up(scores: np.ndarray, best: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The highest-scoring route other than ``best`` and its score (-1 and NaN: none)."""
    n_rows, n_routes = scores.shape
    rows = np.arange(n_rows)
    others = scores.copy()
    others[rows, best] = -np.inf
    second = others.argmax(axis=1).astype(np.intp) if n_routes > 1 else np.full(n_rows, -1)
    runner_up_score = others[rows, second] if n_routes > 1 else np.full(n_rows, -np.inf)
    has_runner_up = np.isfinite(runner_up_score)
    second = np.where(has_runner_up, second, -1).astype(np.intp)
    runner_up_score = np.where(has_runner_up, runner_up_score, np.nan).astype(np.float32)
    return second, runner_up_score
