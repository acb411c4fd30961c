"""The batch decision (_routing.decision) on hand-made vectors with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from fakes import FakeEncoder

from semroute_stream._routing.decision import (
    FALLBACK_REASONS,
    METHODS,
    Decisions,
    HeadParams,
    RouteTable,
    decide,
)
from semroute_stream._routing.router import Router, compile_table
from semroute_stream._routing.schema import RoutesConfig, routes_version

DIM = 32
QUERY = np.eye(DIM, dtype=np.float32)[0]


def at(cosine: float, slot: int) -> np.ndarray:
    """A unit vector whose cosine with QUERY is exactly ``cosine`` (``slot`` keeps it apart)."""
    v = np.zeros(DIM, dtype=np.float64)
    v[0] = cosine
    v[slot] = math.sqrt(1.0 - cosine**2)
    return v.astype(np.float32)


def table_from_cosines(
    routes: dict[str, list[float]],
    *,
    method: str = "max",
    default_threshold: float = 0.5,
    thresholds: dict[str, float] | None = None,
    top_k: int = 3,
) -> RouteTable:
    """A table whose utterances have the given cosines with QUERY, route by route."""
    thresholds = thresholds or {}
    cfg = RoutesConfig.model_validate(
        {
            "default_threshold": default_threshold,
            "method": method,
            "top_k": top_k,
            "routes": [
                {
                    "name": name,
                    "utterances": [f"{name} {i}" for i in range(len(cosines))],
                    "threshold": thresholds.get(name),
                }
                for name, cosines in routes.items()
            ],
        }
    )
    slots = iter(range(1, DIM))
    vectors = [at(c, next(slots)) for cosines in routes.values() for c in cosines]
    return compile_table(cfg, np.stack(vectors))


def one(table: RouteTable) -> Decisions:
    return decide(table, QUERY[None, :])


def test_max_picks_the_route_of_the_nearest_utterance() -> None:
    table = table_from_cosines({"a": [0.2, 0.7], "b": [0.9, 0.1], "c": [0.6]})
    d = one(table)
    assert len(d) == 1
    assert d.route[0] == 1 and d.best[0] == 1
    assert d.score[0] == pytest.approx(0.9)
    assert d.threshold[0] == pytest.approx(0.5)
    assert d.runner_up[0] == 0 and d.runner_up_score[0] == pytest.approx(0.7)
    assert d.margin[0] == pytest.approx(0.2)
    assert table.utterances[d.nearest_utterance[0]] == "b 0"
    assert d.nearest_score[0] == pytest.approx(0.9)
    assert d.top_routes[0].tolist() == [1, 0, 2]
    assert d.top_scores[0] == pytest.approx([0.9, 0.7, 0.6])


def test_top5_mean_follows_semantic_router() -> None:
    # Global top 5: .90 a, .85 b, .84 b, .83 b, .62 a -> a = mean(.90, .62) = .76,
    # b = mean(.85, .84, .83) = .84, c (.5) is not in the top 5 and gets no score.
    routes = {"a": [0.90, 0.62, 0.1], "b": [0.85, 0.84, 0.83], "c": [0.5]}
    d = one(table_from_cosines(routes, method="top5_mean"))
    assert d.route[0] == 1
    assert d.score[0] == pytest.approx(0.84)
    assert d.runner_up[0] == 0 and d.runner_up_score[0] == pytest.approx(0.76)
    assert d.top_routes[0].tolist() == [1, 0, -1]
    assert d.top_scores[0][:2] == pytest.approx([0.84, 0.76])
    assert d.top_scores[0][2] == -np.inf
    assert d.nearest_score[0] == pytest.approx(0.85)
    # The same table with "max" prefers a (nearest utterance .90).
    assert one(table_from_cosines(routes, method="max")).route[0] == 0


def test_top5_mean_takes_the_best_route_that_passes_its_own_threshold() -> None:
    routes = {"a": [0.90, 0.62], "b": [0.85, 0.84, 0.83], "c": [0.5]}
    table = table_from_cosines(routes, method="top5_mean", thresholds={"b": 0.9})
    d = one(table)
    assert d.route[0] == 0  # b (.84) fails .9, a (.76) passes .5
    assert d.best[0] == 0
    assert d.score[0] == pytest.approx(0.76)
    assert d.threshold[0] == pytest.approx(0.5)
    assert d.runner_up[0] == 1 and d.margin[0] == pytest.approx(-0.08)


def test_top5_mean_with_fewer_than_five_utterances() -> None:
    d = one(table_from_cosines({"a": [0.8, 0.6], "b": [0.7]}, method="top5_mean"))
    assert d.route[0] == 0 and d.score[0] == pytest.approx(0.7)
    assert d.runner_up_score[0] == pytest.approx(0.7)
    assert d.margin[0] == pytest.approx(0.0, abs=1e-6)


def test_per_route_thresholds() -> None:
    routes = {"a": [0.9], "b": [0.8], "c": [0.3]}
    strict_a = one(table_from_cosines(routes, thresholds={"a": 0.95}))
    assert strict_a.route[0] == 1 and strict_a.best[0] == 1
    assert strict_a.threshold[0] == pytest.approx(0.5)
    strict_ab = one(table_from_cosines(routes, thresholds={"a": 0.95, "b": 0.85, "c": 0.2}))
    assert strict_ab.route[0] == 2 and strict_ab.score[0] == pytest.approx(0.3)
    lenient_c = one(table_from_cosines(routes, default_threshold=0.95, thresholds={"c": 0.1}))
    assert lenient_c.route[0] == 2


def test_all_below_threshold_goes_to_the_fallback_but_reports_the_best_candidate() -> None:
    table = table_from_cosines({"a": [0.4, 0.2], "b": [0.45]}, default_threshold=0.5)
    d = one(table)
    assert d.route[0] == -1
    assert d.is_fallback.tolist() == [True]
    assert d.best[0] == 1
    assert d.score[0] == pytest.approx(0.45)
    assert d.threshold[0] == pytest.approx(0.5)
    assert d.runner_up[0] == 0


def test_a_score_equal_to_the_threshold_passes() -> None:
    table = table_from_cosines({"a": [0.5]}, default_threshold=0.5)
    assert one(table).route[0] == 0


@pytest.mark.parametrize("method", sorted(METHODS))
def test_ties_go_to_the_lowest_route_index(method: str) -> None:
    vectors = np.stack([at(0.7, 1), at(0.7, 1), at(0.7, 1)])  # identical utterances
    cfg = RoutesConfig.model_validate(
        {
            "method": method,
            "routes": [{"name": n, "utterances": [n]} for n in ("x", "y", "z")],
        }
    )
    table = compile_table(cfg, vectors)
    d = one(table)
    assert d.route[0] == 0 and d.runner_up[0] == 1
    assert d.top_routes[0].tolist() == [0, 1, 2]
    # Repeatable.
    assert decide(table, np.stack([QUERY] * 4)).route.tolist() == [0] * 4


def test_single_route_has_no_runner_up() -> None:
    table = table_from_cosines({"only": [0.8, 0.3]})
    d = one(table)
    assert d.route[0] == 0 and d.runner_up[0] == -1
    assert math.isnan(d.runner_up_score[0]) and math.isnan(d.margin[0])
    assert d.top_routes.shape == (1, 1)
    explained = d.explain(0, table)
    assert explained["runner_up"] is None and explained["margin"] is None


@pytest.mark.parametrize("method", sorted(METHODS))
def test_empty_batch(method: str) -> None:
    table = table_from_cosines({"a": [0.8], "b": [0.3]}, method=method)
    d = decide(table, np.zeros((0, DIM), dtype=np.float32))
    assert len(d) == 0
    for name in ("route", "best", "score", "threshold", "runner_up", "margin"):
        assert getattr(d, name).shape == (0,)
    assert d.top_routes.shape == (0, 2) and d.top_scores.shape == (0, 2)


def test_queries_must_match_the_dimension() -> None:
    table = table_from_cosines({"a": [0.8]})
    with pytest.raises(ValueError, match="expected shape"):
        decide(table, np.zeros((2, DIM + 1), dtype=np.float32))


def test_explain_is_json_ready_and_complete() -> None:
    table = table_from_cosines({"a": [0.2, 0.7], "b": [0.9], "c": [0.6]}, top_k=2)
    table_fallback = table_from_cosines({"a": [0.2], "b": [0.3]})
    explained = one(table).explain(0, table)
    assert explained == {
        "route": "b",
        "is_fallback": False,
        "best": "b",
        "method": "max",
        "score": pytest.approx(0.9),
        "threshold": 0.5,
        "runner_up": {"route": "a", "score": pytest.approx(0.7)},
        "margin": pytest.approx(0.2),
        "nearest_utterance": {"text": "b 0", "score": pytest.approx(0.9)},
        "top": [
            {"route": "b", "score": pytest.approx(0.9)},
            {"route": "a", "score": pytest.approx(0.7)},
        ],
        "fallback_reason": None,
    }
    fallback = one(table_fallback).explain(0, table_fallback)
    assert fallback["route"] == "fallback" and fallback["is_fallback"] is True
    assert fallback["best"] == "b"
    assert fallback["fallback_reason"] == "below_threshold"
    for value in (explained["score"], explained["threshold"], explained["margin"]):
        assert type(value) is float


def _reference(table: RouteTable, q: np.ndarray) -> tuple[int, int, list[float]]:
    """A slow, obvious implementation of the decision for one query."""
    sims = [float(np.dot(q, u)) for u in table.utterance_embeddings]
    n_routes = len(table.names)
    if table.method == "max":
        pairs = list(zip(sims, table.utterance_route, strict=True))
        scores = [max(s for s, r in pairs if r == k) for k in range(n_routes)]
    else:
        top = sorted(range(len(sims)), key=lambda i: (-sims[i], i))[:5]
        scores = []
        for k in range(n_routes):
            mine = [sims[i] for i in top if table.utterance_route[i] == k]
            scores.append(sum(mine) / len(mine) if mine else -math.inf)
    order = sorted(range(n_routes), key=lambda k: (-scores[k], k))
    passing = [k for k in order if scores[k] >= table.thresholds[k]]
    route = passing[0] if passing else -1
    best = route if route >= 0 else order[0]
    return route, best, scores


@pytest.mark.parametrize("method", sorted(METHODS))
def test_matches_a_naive_reference_on_random_data(method: str) -> None:
    rng = np.random.default_rng(7)
    sizes = [1, 3, 2, 4, 1, 2, 3]
    utts = rng.normal(size=(sum(sizes), 8))
    utts /= np.linalg.norm(utts, axis=1, keepdims=True)
    queries = rng.normal(size=(60, 8))
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    cfg = RoutesConfig.model_validate(
        {
            "method": method,
            "default_threshold": 0.2,
            "routes": [
                {
                    "name": f"r{k}",
                    "utterances": [f"r{k} {i}" for i in range(n)],
                    "threshold": float(rng.uniform(-0.2, 0.8)) if k % 2 else None,
                }
                for k, n in enumerate(sizes)
            ],
        }
    )
    table = compile_table(cfg, utts.astype(np.float32))
    d = decide(table, queries.astype(np.float32))
    for i, q in enumerate(queries.astype(np.float32)):
        route, best, scores = _reference(table, q)
        assert d.route[i] == route
        assert d.best[i] == best
        assert d.score[i] == pytest.approx(scores[best], abs=1e-5)


def test_route_table_rejects_inconsistent_input() -> None:
    good = {
        "names": ("a", "b"),
        "fallback": "fallback",
        "method": "max",
        "top_k": 2,
        "thresholds": np.array([0.5, 0.5]),
        "utterances": ("x", "y"),
        "utterance_route": np.array([0, 1]),
        "utterance_embeddings": np.eye(2, dtype=np.float32),
    }
    RouteTable(**good)  # type: ignore[arg-type]
    bad_cases: list[dict[str, object]] = [
        {"method": "nope"},
        {"thresholds": np.array([0.5])},
        {"utterance_route": np.array([1, 0])},
        {"utterance_route": np.array([0, 0])},
        {"utterance_embeddings": np.eye(3, dtype=np.float32)},
    ]
    for change in bad_cases:
        with pytest.raises(ValueError):
            RouteTable(**{**good, **change})  # type: ignore[arg-type]


def test_route_table_arrays_are_read_only() -> None:
    table = table_from_cosines({"a": [0.8]})
    with pytest.raises(ValueError):
        table.thresholds[0] = 0.0


def test_router_encodes_utterances_once_and_explains_each_text() -> None:
    cfg = RoutesConfig.model_validate(
        {
            "fallback": {"name": "other"},
            "routes": [
                {"name": "billing", "utterances": ["charged twice", "wrong invoice"]},
                {"name": "shipping", "utterances": ["where is my parcel"]},
            ],
        }
    )
    encoder = FakeEncoder()
    router = Router(cfg, encoder)
    assert encoder.calls == [3]
    assert router.table.names == ("billing", "shipping") and router.table.dim == encoder.dim
    assert router.version == routes_version(cfg)
    results = router.route(["I was charged twice", "my parcel", "bananas"])
    assert [r["route"] for r in results] == ["billing", "shipping", "other"]
    assert all(r["model"] == "fake-bow" and r["routes_version"] == router.version for r in results)
    assert router.route([]) == []
    assert encoder.calls == [3, 3]
    assert len(router.decide(encoder.encode(["x", "y"]))) == 2


# --- the head method -----------------------------------------------------------------------


def _head_reference(table: RouteTable, q: np.ndarray) -> tuple[int, int, list[float], str | None]:
    """A slow, obvious implementation of the head's decision for one query."""
    head = table.head
    assert head is not None
    n_routes = len(table.names)
    sims = [float(np.dot(q, u)) for u in table.utterance_embeddings]
    nearest = [
        max(s for s, r in zip(sims, table.utterance_route, strict=True) if r == k)
        for k in range(n_routes)
    ]
    logits = [float(np.dot(q, head.weights[:, k]) + head.bias[k]) for k in range(n_routes)]
    log_z = math.log(sum(math.exp(v) for v in logits))
    scores = [
        (v - log_z + head.blend * n) / head.temperature
        for v, n in zip(logits, nearest, strict=True)
    ]
    z = sum(math.exp(s) for s in scores)
    p = [math.exp(s) / z for s in scores]

    def passes(k: int) -> bool:
        lead = p[k] - max(p[j] for j in range(n_routes) if j != k)
        return (
            p[k] >= head.min_confidence[k]
            and nearest[k] >= table.thresholds[k]
            and (head.min_margin is None or lead >= head.min_margin)
        )

    order = sorted(range(n_routes), key=lambda k: (-p[k], k))
    passing = [k for k in order if passes(k)]
    route = passing[0] if passing else -1
    best = route if route >= 0 else order[0]
    reason = None
    if route < 0:
        if nearest[best] < table.thresholds[best]:
            reason = "low_similarity"
        elif p[best] < head.min_confidence[best]:
            reason = "low_confidence"
        else:
            reason = "low_margin"
    return route, best, p, reason


@pytest.mark.parametrize("min_margin", [None, 0.2])
def test_head_matches_a_naive_reference_on_random_data(min_margin: float | None) -> None:
    rng = np.random.default_rng(11)
    sizes = [2, 3, 1, 4, 2]
    n_routes = len(sizes)
    utts = rng.normal(size=(sum(sizes), 8))
    utts /= np.linalg.norm(utts, axis=1, keepdims=True)
    queries = rng.normal(size=(80, 8))
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    cfg = RoutesConfig.model_validate(
        {
            "method": "head",
            "default_threshold": -0.1,
            "routes": [
                {
                    "name": f"r{k}",
                    "utterances": [f"r{k} {i}" for i in range(n)],
                    "threshold": 0.3 if k == 1 else None,
                }
                for k, n in enumerate(sizes)
            ],
        }
    )
    head = HeadParams(
        weights=rng.normal(size=(8, n_routes)).astype(np.float32),
        bias=rng.normal(size=n_routes).astype(np.float32),
        blend=1.5,
        temperature=0.7,
        min_confidence=np.array([0.3, 0.2, 0.5, 0.25, 0.4], dtype=np.float32),
        min_margin=min_margin,
    )
    table = compile_table(cfg, utts.astype(np.float32), head=head)
    d = decide(table, queries.astype(np.float32))
    reasons: set[str | None] = set()
    for i, q in enumerate(queries.astype(np.float32)):
        route, best, p, reason = _head_reference(table, q)
        assert d.route[i] == route
        assert d.best[i] == best
        assert d.score[i] == pytest.approx(p[best], abs=1e-5)
        assert d.threshold[i] == pytest.approx(head.min_confidence[best])
        assert FALLBACK_REASONS[d.reason[i]] == reason
        reasons.add(reason)
    assert {None, "low_confidence", "low_similarity"} <= reasons
    if min_margin is not None:
        assert "low_margin" in reasons


def test_a_head_table_needs_a_head_of_the_right_shape() -> None:
    cfg = RoutesConfig.model_validate(
        {"method": "head", "routes": [{"name": "a", "utterances": ["x"]}]}
    )
    with pytest.raises(ValueError, match="needs a trained head"):
        compile_table(cfg, np.eye(1, 4, dtype=np.float32))
    wrong = HeadParams(weights=np.zeros((3, 1), np.float32), bias=np.zeros(1, np.float32))
    with pytest.raises(ValueError, match="weights of shape"):
        compile_table(cfg, np.eye(1, 4, dtype=np.float32), head=wrong)
    with pytest.raises(ValueError, match="temperature"):
        HeadParams(np.zeros((4, 1)), np.zeros(1), temperature=0.0)
    with pytest.raises(ValueError, match="min_confidence"):
        HeadParams(np.zeros((4, 2)), np.zeros(2), min_confidence=np.zeros(3))
    # A routes file saying auto compiles as max when built directly (Router resolves auto).
    auto = RoutesConfig.model_validate({"routes": [{"name": "a", "utterances": ["x"]}]})
    table = compile_table(auto, np.eye(1, 4, dtype=np.float32))
    assert table.method == "max" and table.auto
