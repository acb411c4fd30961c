"""The routing decision for a whole batch of query embeddings: pure numpy, no I/O.

One matmul gives the (B x U) cosine matrix between queries and every route utterance; an
aggregation method (``METHODS``) turns it into a (B x R) route-score matrix (``-inf`` where a
method gives a route no score); the decision rule is the same for every method:

* the chosen route is the highest-scoring route whose score is ``>=`` its own threshold;
* when no route passes, the query goes to the fallback (``route == -1``);
* ties go to the lowest route index.

``best`` is the chosen route, or, for a fallback, the highest-scoring route (the candidate
that did not make it); ``score`` and ``threshold`` are those of ``best``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from semroute_stream._routes import RoutesConfig

__all__ = [
    "METHODS",
    "Decisions",
    "RouteTable",
    "choose",
    "decide",
    "route_scores",
    "similarities",
]

Aggregation = Callable[["RouteTable", np.ndarray], np.ndarray]
"""``(table, sims (B, U)) -> scores (B, R) float32``; ``-inf`` marks a route with no score."""

TOP5 = 5


def _aggregate_max(table: RouteTable, sims: np.ndarray) -> np.ndarray:
    """Each route scores its nearest utterance's cosine similarity."""
    if sims.shape[0] == 0:
        return np.empty((0, len(table.names)), dtype=np.float32)
    return np.maximum.reduceat(sims, table.route_starts, axis=1).astype(np.float32, copy=False)


def _aggregate_top5_mean(table: RouteTable, sims: np.ndarray) -> np.ndarray:
    """semantic-router's rule: the query's global top-5 utterances, grouped by route; a route
    scores the mean of its utterances among them; routes absent from the top 5 get no score."""
    n_rows, n_utts = sims.shape
    n_routes = len(table.names)
    k = min(TOP5, n_utts)
    # Stable sort: among equal similarities the lower utterance index comes first.
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    top_sims = np.take_along_axis(sims, top, axis=1)
    cells = (np.arange(n_rows)[:, None] * n_routes + table.utterance_route[top]).ravel()
    size = n_rows * n_routes
    sums = np.bincount(cells, weights=top_sims.ravel(), minlength=size).reshape(n_rows, n_routes)
    counts = np.bincount(cells, minlength=size).reshape(n_rows, n_routes)
    means = sums / np.maximum(counts, 1)
    return np.where(counts > 0, means, -np.inf).astype(np.float32)


METHODS: dict[str, Aggregation] = {
    "max": _aggregate_max,
    "top5_mean": _aggregate_top5_mean,
}
"""Aggregation methods by name; the routes file's ``method`` must be one of these."""


def _frozen(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


@dataclass(frozen=True, eq=False)
class RouteTable:
    """The routes compiled with their utterance embeddings (utterances grouped by route)."""

    names: tuple[str, ...]
    fallback: str
    method: str
    top_k: int
    thresholds: np.ndarray  # (R,) float32, default filled in
    utterances: tuple[str, ...]
    utterance_route: np.ndarray  # (U,) intp, non-decreasing, every route present
    utterance_embeddings: np.ndarray  # (U, D) float32, L2-normalised
    route_starts: np.ndarray = field(init=False, repr=False)  # (R,) first utterance of each

    def __post_init__(self) -> None:
        n_routes = len(self.names)
        if n_routes == 0:
            raise ValueError("a route table needs at least one route")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r} (known: {', '.join(METHODS)})")
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
        starts = np.searchsorted(route_of, np.arange(n_routes)).astype(np.intp)
        object.__setattr__(self, "thresholds", _frozen(thresholds))
        object.__setattr__(self, "utterance_route", _frozen(route_of))
        object.__setattr__(self, "utterance_embeddings", _frozen(embeddings))
        object.__setattr__(self, "route_starts", _frozen(starts))

    @classmethod
    def build(cls, routes: RoutesConfig, utterance_embeddings: np.ndarray) -> RouteTable:
        """Compile ``routes``; ``utterance_embeddings`` are its utterances' embeddings, route by
        route in file order (as ``utterances_of(routes)`` lists them)."""
        route_of = [i for i, route in enumerate(routes.routes) for _ in route.utterances]
        return cls(
            names=tuple(route.name for route in routes.routes),
            fallback=routes.fallback.name,
            method=routes.method,
            top_k=routes.top_k,
            thresholds=np.asarray(routes.thresholds(), dtype=np.float32),
            utterances=tuple(utterances_of(routes)),
            utterance_route=np.asarray(route_of, dtype=np.intp),
            utterance_embeddings=utterance_embeddings,
        )

    @property
    def dim(self) -> int:
        return int(self.utterance_embeddings.shape[1])

    def name_of(self, route: int) -> str:
        """A route's name, or the fallback's for -1."""
        return self.names[route] if route >= 0 else self.fallback


def utterances_of(routes: RoutesConfig) -> list[str]:
    """Every utterance, route by route in file order: the rows of a table's embeddings."""
    return [text for route in routes.routes for text in route.utterances]


def _round(value: float) -> float:
    return round(float(value), 6)


@dataclass(frozen=True, eq=False)
class Decisions:
    """One decision per query; every field is a numpy array with one row per query."""

    route: np.ndarray  # (B,) intp, index into names, -1 = fallback
    best: np.ndarray  # (B,) intp, the chosen route, or for a fallback the top-scoring one
    score: np.ndarray  # (B,) float32, score of best
    threshold: np.ndarray  # (B,) float32, the threshold best was compared to
    runner_up: np.ndarray  # (B,) intp, highest-scoring other route, -1 when there is none
    runner_up_score: np.ndarray  # (B,) float32, NaN when runner_up == -1
    margin: np.ndarray  # (B,) float32, score - runner_up_score (NaN when no runner-up)
    nearest_utterance: np.ndarray  # (B,) intp, index into utterances: best's nearest one
    nearest_score: np.ndarray  # (B,) float32
    top_routes: np.ndarray  # (B, k) intp, by score, -1 past the routes that have a score
    top_scores: np.ndarray  # (B, k) float32, -inf past the routes that have a score

    def __len__(self) -> int:
        return int(self.route.shape[0])

    @property
    def is_fallback(self) -> np.ndarray:
        return np.asarray(self.route < 0)

    def explain(self, i: int, table: RouteTable) -> dict[str, Any]:
        """Decision ``i`` as a JSON-ready dict."""
        route = int(self.route[i])
        runner_up = int(self.runner_up[i])
        utterance = int(self.nearest_utterance[i])
        top = [
            {"route": table.names[int(r)], "score": _round(s)}
            for r, s in zip(self.top_routes[i], self.top_scores[i], strict=True)
            if r >= 0
        ]
        return {
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
            "top": top,
        }

    def explain_all(self, table: RouteTable) -> list[dict[str, Any]]:
        return [self.explain(i, table) for i in range(len(self))]


def similarities(table: RouteTable, queries: np.ndarray) -> np.ndarray:
    """The (B x U) cosine matrix between normalised queries and the table's utterances."""
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim == 1 and q.size == 0:
        q = q.reshape(0, table.dim)
    if q.ndim != 2 or q.shape[1] != table.dim:
        raise ValueError(f"queries: expected shape (B, {table.dim}), got {q.shape}")
    sims: np.ndarray = q @ table.utterance_embeddings.T
    return sims


def route_scores(table: RouteTable, sims: np.ndarray) -> np.ndarray:
    """The (B x R) route scores of the table's method; ``-inf`` where a route has no score."""
    return METHODS[table.method](table, sims)


def choose(scores: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(route, best)``: the highest-scoring route that passes its threshold (-1 when none
    does), and that route or, for a fallback, the highest-scoring route."""
    passing = scores >= thresholds[None, :]
    chosen = np.where(passing, scores, -np.inf).argmax(axis=1)
    any_pass = passing.any(axis=1)
    route = np.where(any_pass, chosen, -1).astype(np.intp)
    best = np.where(any_pass, chosen, scores.argmax(axis=1)).astype(np.intp)
    return route, best


def decide(table: RouteTable, queries: np.ndarray) -> Decisions:
    """Route a batch of L2-normalised query embeddings ``(B, D)``."""
    sims = similarities(table, queries)
    scores = route_scores(table, sims)
    n_rows, n_routes = scores.shape
    rows = np.arange(n_rows)
    route, best = choose(scores, table.thresholds)
    score = scores[rows, best]

    others = scores.copy()
    others[rows, best] = -np.inf
    runner_up = others.argmax(axis=1).astype(np.intp) if n_routes > 1 else np.full(n_rows, -1)
    runner_up_score = others[rows, runner_up] if n_routes > 1 else np.full(n_rows, -np.inf)
    has_runner_up = np.isfinite(runner_up_score)
    runner_up = np.where(has_runner_up, runner_up, -1).astype(np.intp)
    runner_up_score = np.where(has_runner_up, runner_up_score, np.nan).astype(np.float32)

    own = np.where(table.utterance_route[None, :] == best[:, None], sims, -np.inf)
    nearest = own.argmax(axis=1).astype(np.intp)

    k = min(table.top_k, n_routes)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k].astype(np.intp)
    top_scores = np.take_along_axis(scores, order, axis=1).astype(np.float32)
    top_routes = np.where(np.isfinite(top_scores), order, -1).astype(np.intp)

    return Decisions(
        route=route,
        best=best,
        score=score.astype(np.float32),
        threshold=table.thresholds[best].astype(np.float32),
        runner_up=runner_up,
        runner_up_score=runner_up_score,
        margin=(score - runner_up_score).astype(np.float32),
        nearest_utterance=nearest,
        nearest_score=sims[rows, nearest].astype(np.float32),
        top_routes=top_routes,
        top_scores=top_scores,
    )
