"""The routing decision for a whole batch of query embeddings: pure numpy, no I/O.

One matmul gives the (B x U) cosine matrix between queries and every route utterance. A method
turns it into a (B x R) route-score matrix (``-inf`` where a method gives a route no score):

* similarity methods (``METHODS``): ``max`` (each route scores its nearest utterance's cosine)
  and ``top5_mean`` (semantic-router's rule); a route passes when its score is ``>=`` its
  threshold;
* ``head``: a learned route head (multinomial logistic regression, see ``training``, plus
  ``lexical.weight`` times the log-probabilities of its lexical view, see ``lexical``); the
  score is a calibrated probability ``softmax((log p_head + blend * max_cosine) / T)``; a
  route passes when its probability is ``>=`` its ``min_confidence``, its nearest utterance's
  cosine is ``>=`` its threshold (the similarity floor: far-away queries fall back however
  confident the head is) and, when ``min_margin`` is set, it leads every other route by at
  least that much probability; and, when ``min_energy`` is set, the query's energy score
  (``kernels.logsumexp`` of the calibrated scores) reaches it: one out-of-scope test per query.

The decision rule is the same for every method:

* the chosen route is the highest-scoring route that passes;
* when no route passes, the query goes to the fallback (``route == -1``);
* ties go to the lowest route index.

``best`` is the chosen route, or, for a fallback, the highest-scoring route (the candidate
that did not make it); ``score`` and ``threshold`` are those of ``best``, and ``reason`` says
why a fallback happened. The kernels are in ``kernels``, the head's settings in
``head_params``; compiling a routes file into a table is ``router.compile_table``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .head_params import HeadParams, frozen_array
from .kernels import (
    head_log_proba,
    logsumexp,
    margins,
    max_by_route,
    runner_up,
    softmax,
    top5_mean_by_route,
)
from .schema import DECISION_METHODS, DecisionMethod, SimilarityMethod

__all__ = [
    "FALLBACK_REASONS",
    "METHODS",
    "Aggregation",
    "Decisions",
    "HeadParams",
    "RouteTable",
    "ScoreMatrix",
    "choose",
    "decide",
    "fallback_reasons",
    "head_scores",
    "score_matrix",
]

Aggregation = Callable[["RouteTable", np.ndarray], np.ndarray]
"""``(table, sims (B, U)) -> scores (B, R) float32``; ``-inf`` marks a route with no score."""


def _aggregate_max(table: RouteTable, sims: np.ndarray) -> np.ndarray:
    """Each route scores its nearest utterance's cosine similarity."""
    return max_by_route(sims, table.utterance_route, len(table.names), table.route_starts)


def _aggregate_top5_mean(table: RouteTable, sims: np.ndarray) -> np.ndarray:
    """semantic-router's rule: the mean of each route's utterances among the query's top 5."""
    return top5_mean_by_route(sims, table.utterance_route, len(table.names))


METHODS: dict[SimilarityMethod, Aggregation] = {
    "max": _aggregate_max,
    "top5_mean": _aggregate_top5_mean,
}
"""The similarity methods: aggregations of utterance cosines by name."""

FALLBACK_REASONS: tuple[str | None, ...] = (
    None,
    "below_threshold",  # similarity methods: the best score is below its threshold
    "low_confidence",  # head: the calibrated probability is below min_confidence
    "low_similarity",  # head: the nearest utterance's cosine is below the similarity floor
    "low_margin",  # head: the lead over the runner-up is below min_margin
    "low_energy",  # head: the query's energy score is below min_energy
)
"""``Decisions.reason`` codes, as ``explain()`` names them."""


@dataclass(frozen=True, eq=False)
class RouteTable:
    """The routes compiled with their utterance embeddings (utterances grouped by route).

    ``thresholds`` are score thresholds for the similarity methods and the similarity floor
    (on the nearest utterance's cosine) for ``head``; ``head`` holds the trained head."""

    names: tuple[str, ...]
    fallback: str
    method: DecisionMethod
    top_k: int
    thresholds: np.ndarray  # (R,) float32, default filled in
    utterances: tuple[str, ...]
    utterance_route: np.ndarray  # (U,) intp, non-decreasing, every route present
    utterance_embeddings: np.ndarray  # (U, D) float32, L2-normalised
    route_starts: np.ndarray = field(init=False, repr=False)  # (R,) first utterance of each
    head: HeadParams | None = None  # required by method "head"
    auto: bool = False  # the method was chosen by ``method: auto``

    def __post_init__(self) -> None:
        n_routes = len(self.names)
        if n_routes == 0:
            raise ValueError("a route table needs at least one route")
        if self.method not in DECISION_METHODS:
            raise ValueError(
                f"unknown method {self.method!r} (known: {', '.join(DECISION_METHODS)})"
            )
        if self.method == "head" and self.head is None:
            raise ValueError("method 'head' needs a trained head")
        if self.top_k < 1:
            raise ValueError("top_k must be >= 1")
        thresholds = np.ascontiguousarray(self.thresholds, dtype=np.float32)
        route_of = np.ascontiguousarray(self.utterance_route, dtype=np.intp)
        embeddings = np.ascontiguousarray(self.utterance_embeddings, dtype=np.float32)
        if thresholds.shape != (n_routes,):
            raise ValueError(f"thresholds: expected shape ({n_routes},), got {thresholds.shape}")
        n_utts = len(self.utterances)
        if route_of.shape != (n_utts,):
            raise ValueError(f"utterance_route: expected shape ({n_utts},), got {route_of.shape}")
        if embeddings.ndim != 2 or embeddings.shape[0] != n_utts:
            raise ValueError(
                f"utterance_embeddings: expected shape ({n_utts}, D), got {embeddings.shape}"
            )
        if n_utts and (np.any(np.diff(route_of) < 0) or route_of[0] < 0):
            raise ValueError("utterance_route must be grouped by route in route order")
        counts = np.bincount(route_of, minlength=n_routes) if n_utts else np.zeros(n_routes)
        if counts.shape != (n_routes,) or np.any(counts == 0):
            raise ValueError("every route needs at least one utterance, and no other routes")
        if self.head is not None and self.head.weights.shape != (embeddings.shape[1], n_routes):
            raise ValueError(
                f"head: expected weights of shape ({embeddings.shape[1]}, {n_routes}), "
                f"got {self.head.weights.shape}"
            )
        starts = np.searchsorted(route_of, np.arange(n_routes)).astype(np.intp)
        object.__setattr__(self, "thresholds", frozen_array(thresholds))
        object.__setattr__(self, "utterance_route", frozen_array(route_of))
        object.__setattr__(self, "utterance_embeddings", frozen_array(embeddings))
        object.__setattr__(self, "route_starts", frozen_array(starts))

    @property
    def dim(self) -> int:
        return int(self.utterance_embeddings.shape[1])

    def name_of(self, route: int) -> str:
        """A route's name, or the fallback's for -1."""
        return self.names[route] if route >= 0 else self.fallback


def _round(value: float) -> float:
    return round(float(value), 6)


@dataclass(frozen=True, eq=False)
class Decisions:
    """One decision per query; every field is a numpy array with one row per query."""

    route: np.ndarray  # (B,) intp, index into names, -1 = fallback
    best: np.ndarray  # (B,) intp, the chosen route, or for a fallback the top-scoring one
    score: np.ndarray  # (B,) float32, score of best (head: its calibrated probability)
    threshold: np.ndarray  # (B,) float32, the threshold best's score was compared to
    runner_up: np.ndarray  # (B,) intp, highest-scoring other route, -1 when there is none
    runner_up_score: np.ndarray  # (B,) float32, NaN when runner_up == -1
    margin: np.ndarray  # (B,) float32, score - runner_up_score (NaN when no runner-up)
    nearest_utterance: np.ndarray  # (B,) intp, index into utterances: best's nearest one
    nearest_score: np.ndarray  # (B,) float32
    top_routes: np.ndarray  # (B, k) intp, by score, -1 past the routes that have a score
    top_scores: np.ndarray  # (B, k) float32, -inf past the routes that have a score
    reason: np.ndarray  # (B,) int8, index into FALLBACK_REASONS (0 = not a fallback)
    top_similarity: np.ndarray  # (B, k) float32, the top routes' nearest-utterance cosines
    floor: np.ndarray  # (B,) float32, head: best's similarity floor (NaN otherwise)
    #: (B,) intp, the route of the query's nearest utterance (None: not computed)
    nearest_route: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.route.shape[0])

    @property
    def is_fallback(self) -> np.ndarray:
        return np.asarray(self.route < 0)

    def explain(self, i: int, table: RouteTable) -> dict[str, Any]:
        """Decision ``i`` as a JSON-ready dict: which method decided, the chosen route or the
        fallback and why, the scores (head: calibrated probabilities, with each top route's
        nearest-utterance cosine as ``similarity``) and the nearest example utterance."""
        route = int(self.route[i])
        runner_up = int(self.runner_up[i])
        utterance = int(self.nearest_utterance[i])
        is_head = table.method == "head"
        explained: dict[str, Any] = {
            "route": table.name_of(route),
            "is_fallback": route < 0,
            "best": table.names[int(self.best[i])],
            "method": table.method,
            "score": _round(self.score[i]),
            "threshold": _round(self.threshold[i]),
            "runner_up": (
                {"route": table.names[runner_up], "score": _round(self.runner_up_score[i])}
                if runner_up >= 0
                else None
            ),
            "margin": _round(self.margin[i]) if runner_up >= 0 else None,
            "nearest_utterance": {
                "text": table.utterances[utterance],
                "score": _round(self.nearest_score[i]),
            },
            "top": self._top(i, table),
            "fallback_reason": FALLBACK_REASONS[int(self.reason[i])],
        }
        if is_head:
            explained["similarity"] = _round(self.nearest_score[i])
            explained["min_similarity"] = _round(self.floor[i])
        if table.auto:
            explained["auto"] = True
        return explained

    def _top(self, i: int, table: RouteTable) -> list[dict[str, Any]]:
        """Decision ``i``'s top routes (head: with their nearest-utterance cosines)."""
        top = []
        for r, s, sim in zip(
            self.top_routes[i], self.top_scores[i], self.top_similarity[i], strict=True
        ):
            if r < 0:
                continue
            entry: dict[str, Any] = {"route": table.names[int(r)], "score": _round(s)}
            if table.method == "head":
                entry["similarity"] = _round(sim)
            top.append(entry)
        return top


def _queries(table: RouteTable, queries: np.ndarray) -> np.ndarray:
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim == 1 and q.size == 0:
        q = q.reshape(0, table.dim)
    if q.ndim != 2 or q.shape[1] != table.dim:
        raise ValueError(f"queries: expected shape (B, {table.dim}), got {q.shape}")
    return q


@dataclass(frozen=True, eq=False)
class ScoreMatrix:
    """Everything the decision needs for a batch, before choosing."""

    sims: np.ndarray  # (B, U) cosines with every utterance
    scores: np.ndarray  # (B, R) the method's route scores (head: calibrated probabilities)
    nearest: np.ndarray  # (B, R) each route's nearest-utterance cosine
    passing: np.ndarray  # (B, R) bool, the route passes every test of the method
    energy: np.ndarray | None = None  # (B,) head: logsumexp of the calibrated scores


def head_scores(
    head: HeadParams,
    queries: np.ndarray,
    nearest: np.ndarray,
    texts: Sequence[str] | None = None,
) -> np.ndarray:
    """The calibrated scores ``(head_log_proba + blend * nearest) / temperature``, float32."""
    log_p = head_log_proba(head.weights, head.bias, head.lexical, queries, texts)
    out: np.ndarray = (log_p + np.float32(head.blend) * nearest) / np.float32(head.temperature)
    return out


def score_matrix(
    table: RouteTable, queries: np.ndarray, texts: Sequence[str] | None = None
) -> ScoreMatrix:
    """The scores and pass/fail of every route for a batch of normalised queries (``texts``,
    the queries' texts, are needed by a head with a lexical view)."""
    q = _queries(table, queries)
    sims: np.ndarray = q @ table.utterance_embeddings.T
    nearest = _aggregate_max(table, sims)
    energy = None
    if table.method == "head":
        head = table.head
        assert head is not None
        z = head_scores(head, q, nearest, texts)
        scores = softmax(z).astype(np.float32, copy=False)
        passing = (scores >= head.min_confidence[None, :]) & (nearest >= table.thresholds[None, :])
        if head.min_margin is not None:
            passing &= margins(scores) >= np.float32(head.min_margin)
        if head.min_energy is not None:
            energy = logsumexp(z)
            passing &= (energy >= np.float32(head.min_energy))[:, None]
    else:
        scores = nearest if table.method == "max" else METHODS[table.method](table, sims)
        passing = scores >= table.thresholds[None, :]
    return ScoreMatrix(sims=sims, scores=scores, nearest=nearest, passing=passing, energy=energy)


def choose(
    scores: np.ndarray, thresholds: np.ndarray, passing: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(route, best)``: the highest-scoring route that passes (its score ``>=`` its
    threshold, or ``passing`` when given; -1 when none does), and that route or, for a
    fallback, the highest-scoring route."""
    if passing is None:
        passing = scores >= thresholds[None, :]
    chosen = np.where(passing, scores, -np.inf).argmax(axis=1)
    any_pass = passing.any(axis=1)
    route = np.where(any_pass, chosen, -1).astype(np.intp)
    best = np.where(any_pass, chosen, scores.argmax(axis=1)).astype(np.intp)
    return route, best


def fallback_reasons(
    table: RouteTable, m: ScoreMatrix, route: np.ndarray, best: np.ndarray
) -> np.ndarray:
    """Each row's ``FALLBACK_REASONS`` code (int8; 0 where the row is not a fallback)."""
    rows = np.arange(len(route))
    reason = np.zeros(len(route), dtype=np.int8)
    fallback = route < 0
    if table.method != "head":
        reason[fallback] = FALLBACK_REASONS.index("below_threshold")
        return reason
    head = table.head
    assert head is not None
    low_similarity = m.nearest[rows, best] < table.thresholds[best]
    low_confidence = m.scores[rows, best] < head.min_confidence[best]
    code = np.where(
        low_similarity,
        FALLBACK_REASONS.index("low_similarity"),
        np.where(
            low_confidence,
            FALLBACK_REASONS.index("low_confidence"),
            FALLBACK_REASONS.index("low_margin"),
        ),
    )
    if m.energy is not None and head.min_energy is not None:
        low_energy = (m.energy < np.float32(head.min_energy)) & ~low_similarity
        code = np.where(low_energy, FALLBACK_REASONS.index("low_energy"), code)
    reason[fallback] = code[fallback]
    return reason


def decide(table: RouteTable, queries: np.ndarray, texts: Sequence[str] | None = None) -> Decisions:
    """Route a batch of L2-normalised query embeddings ``(B, D)``; ``texts`` (the queries'
    texts, in the same order) are needed when the table's head has a lexical view."""
    m = score_matrix(table, queries, texts)
    scores, sims = m.scores, m.sims
    n_rows, n_routes = scores.shape
    rows = np.arange(n_rows)
    route, best = choose(scores, table.thresholds, m.passing)
    score = scores[rows, best]

    second, runner_up_score = runner_up(scores, best)

    own = np.where(table.utterance_route[None, :] == best[:, None], sims, -np.inf)
    nearest = own.argmax(axis=1).astype(np.intp)

    k = min(table.top_k, n_routes)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k].astype(np.intp)
    top_scores = np.take_along_axis(scores, order, axis=1).astype(np.float32)
    top_routes = np.where(np.isfinite(top_scores), order, -1).astype(np.intp)

    if table.method == "head":
        assert table.head is not None
        threshold = table.head.min_confidence[best]
        floor = table.thresholds[best]
    else:
        threshold = table.thresholds[best]
        floor = np.full(n_rows, np.nan, dtype=np.float32)

    return Decisions(
        route=route,
        best=best,
        score=score.astype(np.float32),
        threshold=threshold.astype(np.float32),
        runner_up=second,
        runner_up_score=runner_up_score,
        margin=(score - runner_up_score).astype(np.float32),
        nearest_utterance=nearest,
        nearest_score=sims[rows, nearest].astype(np.float32),
        top_routes=top_routes,
        top_scores=top_scores,
        reason=fallback_reasons(table, m, route, best),
        top_similarity=np.take_along_axis(m.nearest, order, axis=1).astype(np.float32),
        floor=floor.astype(np.float32),
        nearest_route=m.nearest.argmax(axis=1).astype(np.intp),
    )
