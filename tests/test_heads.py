"""The learned route head (semroute_stream._routing.training/selection/head_cache) and how routes
resolve to a method (…_routing.router): training, cache, cross-validated choice, calibrated
fallback."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from fakes import FakeEncoder

from semroute_stream._routing.decision import FALLBACK_REASONS, decide
from semroute_stream._routing.head_cache import head_cache_key, load_or_train_head
from semroute_stream._routing.router import Router, resolve_routes
from semroute_stream._routing.schema import RoutesConfig
from semroute_stream._routing.selection import (
    FOLDS,
    choose_method,
    cross_validate,
    fit_temperature,
    fold_of,
)
from semroute_stream._routing.training import name_text, train_head

DIM = 24


def unit_rows(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return out


def clusters(
    rng: np.random.Generator, centres: np.ndarray, per_route: int, noise: float
) -> tuple[np.ndarray, np.ndarray]:
    """``per_route`` noisy unit vectors around each centre, grouped by route."""
    route_of = np.repeat(np.arange(len(centres)), per_route)
    points = centres[route_of] + noise * rng.normal(size=(len(route_of), centres.shape[1]))
    return unit_rows(points), route_of


def config(n_routes: int, per_route: int, **extra: object) -> RoutesConfig:
    return RoutesConfig.model_validate(
        {
            "routes": [
                {"name": f"route_{k}", "utterances": [f"r{k} u{i}" for i in range(per_route)]}
                for k in range(n_routes)
            ],
            **extra,
        }
    )


# --- training ------------------------------------------------------------------------------


def test_the_head_learns_a_separable_problem() -> None:
    rng = np.random.default_rng(0)
    centres = np.eye(DIM)[:4] * 3
    x, y = clusters(rng, centres, per_route=8, noise=0.5)
    weights, bias, iterations = train_head(x, y, 4, l2=1e-4)
    assert weights.shape == (DIM, 4) and bias.shape == (4,)
    assert weights.dtype == np.float32 and iterations > 0
    assert np.array_equal((x @ weights + bias).argmax(axis=1), y)
    fresh, truth = clusters(rng, centres, per_route=20, noise=0.5)
    assert np.mean((fresh @ weights + bias).argmax(axis=1) == truth) >= 0.95


def test_training_is_deterministic() -> None:
    rng = np.random.default_rng(1)
    x, y = clusters(rng, rng.normal(size=(5, DIM)), per_route=6, noise=0.8)
    first = train_head(x, y, 5, l2=1e-4)
    second = train_head(x.copy(), y.copy(), 5, l2=1e-4)
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert first[2] == second[2]


def test_stronger_regularisation_gives_smaller_weights() -> None:
    rng = np.random.default_rng(2)
    x, y = clusters(rng, rng.normal(size=(3, DIM)), per_route=6, noise=0.5)
    weak = np.linalg.norm(train_head(x, y, 3, l2=1e-4)[0])
    strong = np.linalg.norm(train_head(x, y, 3, l2=1e-1)[0])
    assert strong < weak


def test_route_names_become_text() -> None:
    assert name_text("lost_or_stolen_card") == "lost or stolen card"
    assert name_text("top-up--failed") == "top up failed"
    assert name_text("billing") == "billing"


def test_folds_hold_out_by_position_and_never_a_single_utterance_route() -> None:
    route_of = np.array([0] * 7 + [1] + [2] * 2)
    fold = fold_of(route_of)
    assert fold.tolist() == [0, 1, 2, 3, 4, 0, 1, -1, 0, 1]
    assert FOLDS == 5


def test_temperature_calibration_recovers_a_known_temperature() -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(scale=3.0, size=(4000, 6))
    true_t = 2.0
    p = np.exp(logits / true_t)
    p /= p.sum(axis=1, keepdims=True)
    gold = np.array([rng.choice(6, p=row) for row in p])
    assert fit_temperature(logits, gold) == pytest.approx(true_t, rel=0.1)


# --- the cache -----------------------------------------------------------------------------


def test_cache_hit_and_miss_by_hash(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    x, y = clusters(rng, rng.normal(size=(3, DIM)), per_route=6, noise=0.5)
    names = [f"route_{k}" for k in range(3)]
    texts = [[f"u{i}" for i in range(6)] for _ in range(3)]

    def key(model: str = "m", utterances: list[list[str]] = texts) -> str:
        return head_cache_key(
            model, names, utterances, l2=1e-4, use_names=False, with_cv=True, dim=DIM
        )

    def load(k: str, embeddings: np.ndarray = x) -> object:
        return load_or_train_head(
            embeddings, y, None, 3, key=k, l2=1e-4, with_cv=True, cache_dir=tmp_path
        )

    miss = load(key())
    assert not miss.cached and (tmp_path / f"{key()}.npz").is_file()  # type: ignore[attr-defined]
    hit = load(key())
    assert hit.cached  # type: ignore[attr-defined]
    assert np.array_equal(hit.weights, miss.weights)  # type: ignore[attr-defined]
    assert np.array_equal(hit.cv.head_log_proba, miss.cv.head_log_proba)  # type: ignore[attr-defined]
    assert list(tmp_path.iterdir()) == [tmp_path / f"{key()}.npz"]  # no temporary files left

    # Anything the weights depend on changes the key; the same inputs give the same key.
    changed = [[*texts[0][:-1], "another utterance"], *texts[1:]]
    assert len({key(), key("other-model"), key(utterances=changed)}) == 3
    assert key() == key()
    assert not load(key("other-model")).cached  # type: ignore[attr-defined]

    # A cache made from other embeddings (same key) is not trusted.
    shifted = unit_rows(x + 0.5)
    assert not load(key(), shifted).cached  # type: ignore[attr-defined]


def test_a_broken_cache_file_is_retrained(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(5)
    x, y = clusters(rng, rng.normal(size=(2, DIM)), per_route=5, noise=0.5)
    (tmp_path / "k.npz").write_bytes(b"not a zip file")
    with caplog.at_level(logging.WARNING):
        model = load_or_train_head(
            x, y, None, 2, key="k", l2=1e-4, with_cv=False, cache_dir=tmp_path
        )
    assert not model.cached and "unreadable" in caplog.text
    again = load_or_train_head(x, y, None, 2, key="k", l2=1e-4, with_cv=False, cache_dir=tmp_path)
    assert again.cached


def test_router_caches_the_head_by_routes_and_model(tmp_path: Path) -> None:
    cfg = RoutesConfig.model_validate(
        {
            "method": "head",
            "routes": [
                {"name": "billing", "utterances": ["charged twice", "refund my payment"]},
                {"name": "shipping", "utterances": ["where is my parcel", "late delivery"]},
            ],
        }
    )
    first = Router(cfg, FakeEncoder(), cache_dir=tmp_path)
    assert first.resolution.head is not None and not first.resolution.head.cached
    second = Router(cfg, FakeEncoder(), cache_dir=tmp_path)
    assert second.resolution.head is not None and second.resolution.head.cached
    other = Router(cfg, FakeEncoder(model_name="other"), cache_dir=tmp_path)
    assert other.resolution.head is not None and not other.resolution.head.cached
    assert len(list(tmp_path.iterdir())) == 2
    uncached = Router(cfg, FakeEncoder(), cache=False)
    assert uncached.resolution.head is not None and not uncached.resolution.head.cached
    # The thresholds and endpoints do not change the head: the cache still hits.
    cfg.routes[0].endpoint = "billing-llm"
    cfg.default_threshold = 0.1
    assert Router(cfg, FakeEncoder(), cache_dir=tmp_path).resolution.head.cached  # type: ignore[union-attr]


# --- the automatic choice ------------------------------------------------------------------


def xor_routes(rng: np.random.Generator, per_cluster: int) -> tuple[np.ndarray, np.ndarray]:
    """Two routes, each the union of two opposite clusters (XOR): no linear head separates
    them, the nearest utterance does."""
    e = np.eye(DIM)
    centres = [e[0] + e[1], -e[0] - e[1], e[0] - e[1], -e[0] + e[1]]
    points = [c + 0.15 * rng.normal(size=(per_cluster, DIM)) for c in centres]
    x = unit_rows(np.concatenate(points))
    route_of = np.repeat([0, 0, 1, 1], per_cluster)
    return x, route_of


def noisy_routes(rng: np.random.Generator, per_route: int) -> tuple[np.ndarray, np.ndarray]:
    """Routes whose utterances are very noisy around well-separated means: the single nearest
    utterance is often another route's, the linear head (which averages) is right."""
    centres = 1.0 * np.eye(DIM)[:4]
    return clusters(rng, centres, per_route, noise=0.45)


def cv_of(x: np.ndarray, route_of: np.ndarray, n_routes: int) -> object:
    empty = np.zeros((0, x.shape[1]), np.float32)
    return cross_validate(x, route_of, empty, np.zeros(0, np.intp), n_routes, l2=1e-4)


def test_auto_picks_the_nearest_utterance_where_it_wins(tmp_path: Path) -> None:
    x, route_of = xor_routes(np.random.default_rng(6), per_cluster=10)
    choice = choose_method(cv_of(x, route_of, 2))  # type: ignore[arg-type]
    assert choice.method == "max"
    assert choice.cv_accuracy["max"] == 1.0
    assert choice.cv_accuracy["head(blend=0)"] < 0.8

    cfg = config(2, 20, head={"use_names": False, "lexical": 0})
    resolution = resolve_routes(cfg, x, None, model_name="m", cache_dir=tmp_path)
    assert resolution.method == "max" and resolution.table.auto
    assert resolution.choice is not None and resolution.choice.method == "max"
    # The default threshold comes from the cross-validation (the file sets none).
    assert resolution.table.thresholds[0] == pytest.approx(resolution.choice.similarity_threshold)


def test_auto_picks_the_head_where_it_wins(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    x, route_of = noisy_routes(rng, per_route=15)
    choice = choose_method(cv_of(x, route_of, 4))  # type: ignore[arg-type]
    assert choice.method == "head"
    assert choice.cv_accuracy[f"head(blend={choice.blend:g})"] > choice.cv_accuracy["max"]

    cfg = config(4, 15, head={"use_names": False, "lexical": 0})
    resolution = resolve_routes(cfg, x, None, model_name="m", cache_dir=tmp_path)
    assert resolution.method == "head" and resolution.table.head is not None
    assert resolution.table.head.blend == choice.blend
    # And it is right on fresh queries more often than the nearest utterance.
    queries, truth = clusters(rng, 1.0 * np.eye(DIM)[:4], 50, noise=0.45)
    head_acc = np.mean(decide(resolution.table, queries).best == truth)
    max_table = resolve_routes(
        cfg.model_copy(update={"method": "max"}), x, None, model_name="m", cache_dir=tmp_path
    ).table
    assert head_acc > np.mean(decide(max_table, queries).best == truth)
    # Deterministic: resolving again (from the cache, or without it) gives the same choice.
    again = resolve_routes(cfg, x, None, model_name="m", cache_dir=None)
    assert again.choice == resolution.choice


def test_auto_with_too_few_utterances_is_the_nearest_utterance() -> None:
    cfg = config(3, 3)
    encoder = FakeEncoder()
    router = Router(cfg, encoder, cache=False)
    assert router.table.method == "max" and router.table.auto
    assert router.resolution.head is None
    assert "too few utterances" in router.resolution.note
    assert encoder.calls == [9]  # no names encoded, no head trained
    assert router.table.thresholds.tolist() == [0.5, 0.5, 0.5]


# --- the calibrated fallback and the explanation -------------------------------------------


def head_router(tmp_path: Path, **extra: object) -> Router:
    cfg = RoutesConfig.model_validate(
        {
            "method": "head",
            "top_k": 2,
            "routes": [
                {
                    "name": "billing",
                    "utterances": [
                        "charged twice on my card",
                        "refund my payment",
                        "invoice shows the wrong amount",
                        "card payment charged two times",
                        "refund the double charge",
                    ],
                },
                {
                    "name": "shipping",
                    "utterances": [
                        "where is my parcel",
                        "parcel delivery is late",
                        "tracking number for my parcel",
                        "late delivery of my order",
                        "my order has not arrived",
                    ],
                },
                {
                    "name": "login",
                    "utterances": [
                        "cannot log in",
                        "reset my password",
                        "account locked after login",
                        "password reset email missing",
                        "login fails with my password",
                    ],
                },
            ],
            **extra,
        }
    )
    return Router(cfg, FakeEncoder(), cache_dir=tmp_path)


def test_calibrated_fallback_rejects_far_away_queries(tmp_path: Path) -> None:
    router = head_router(tmp_path)
    table = router.table
    assert table.method == "head" and table.head is not None
    encoder = router.encoder
    texts = ["my parcel is late", "bananas and zebras sing opera"]
    d = router.decide(encoder.encode(texts), texts)
    assert d.route.tolist() == [1, -1]
    # The far-away query: nothing in common with any utterance, so below the similarity
    # floor, whatever the head's probabilities say.
    assert d.nearest_score[1] < table.thresholds[d.best[1]]
    assert FALLBACK_REASONS[d.reason[1]] == "low_similarity"
    explained = d.explain(1, table)
    assert explained["is_fallback"] is True and explained["fallback_reason"] == "low_similarity"


def test_the_confidence_floor_and_margin_reject_unsure_queries(tmp_path: Path) -> None:
    # An explicit floor: a query half billing, half shipping is not confident enough.
    router = head_router(
        tmp_path,
        default_threshold=0.0,
        head={"min_confidence": 0.9, "temperature": 1.0, "blend": 0.0, "lexical": 0},
    )
    texts = ["refund my payment where is my parcel", "reset my password"]
    vectors = router.encoder.encode(texts)
    d = router.decide(vectors, texts)
    assert d.route.tolist() == [-1, 2]
    assert FALLBACK_REASONS[d.reason[0]] == "low_confidence"
    assert d.score[0] < 0.9 == pytest.approx(d.threshold[0])
    margin = head_router(
        tmp_path,
        default_threshold=0.0,
        head={
            "min_margin": 0.99,
            "min_confidence": 0.0,
            "temperature": 1.0,
            "blend": 0.0,
            "lexical": 0,
        },
    )
    m = margin.decide(vectors, texts)
    assert m.route.tolist() == [-1, -1]
    assert FALLBACK_REASONS[m.reason[0]] == "low_margin"


def test_explain_for_the_head(tmp_path: Path) -> None:
    router = head_router(tmp_path)
    results = router.route(["I was charged twice, refund please"])
    explained = results[0]
    assert explained["route"] == "billing" and explained["is_fallback"] is False
    assert explained["method"] == "head" and "auto" not in explained
    assert explained["fallback_reason"] is None
    # The score is the calibrated probability, compared with min_confidence.
    top = explained["top"]
    assert top[0]["route"] == "billing" and len(top) == 2
    assert 0 < sum(t["score"] for t in top) <= 1.0 + 1e-6
    assert top[0]["score"] >= top[1]["score"] and explained["score"] == top[0]["score"]
    assert all(-1 <= t["similarity"] <= 1 for t in top)
    assert explained["threshold"] == pytest.approx(router.table.head.min_confidence[0])  # type: ignore[union-attr]
    assert explained["runner_up"]["route"] == top[1]["route"]
    assert explained["margin"] == pytest.approx(top[0]["score"] - top[1]["score"], abs=1e-5)
    # The nearest example utterance of the chosen route, and its cosine (the similarity).
    assert explained["nearest_utterance"]["text"] in router.routes.routes[0].utterances
    assert explained["similarity"] == explained["nearest_utterance"]["score"]
    assert explained["min_similarity"] == pytest.approx(router.table.thresholds[0], abs=1e-6)
    assert explained["model"] == "fake-bow" and explained["routes_version"] == router.version
    # method: auto says so.
    auto = Router(router.routes.model_copy(update={"method": "auto"}), FakeEncoder())
    assert auto.route(["refund"])[0].get("auto") is True


def test_auto_leaves_the_head_out_when_it_would_be_too_slow_to_train(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from semroute_stream._routing import router as _router

    x, _ = noisy_routes(np.random.default_rng(8), per_route=15)
    cfg = config(4, 15, head={"use_names": False, "lexical": 0})
    monkeypatch.setattr(_router, "AUTO_MAX_CELLS", 4 * 60 - 1)
    resolution = resolve_routes(cfg, x, None, model_name="m", cache_dir=tmp_path)
    assert resolution.method == "max" and resolution.head is None
    assert "too much to train" in resolution.note
    assert resolution.summary()["note"] == resolution.note
    # Asked for explicitly, the head is trained whatever the size.
    forced = cfg.model_copy(update={"method": "head"})
    assert resolve_routes(forced, x, None, model_name="m", cache_dir=tmp_path).method == "head"
    assert list(tmp_path.iterdir())
