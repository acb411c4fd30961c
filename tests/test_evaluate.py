"""Evaluation figures and threshold fitting (semroute_stream._evaluate) with known answers."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
from fakes import unit

from semroute_stream._decision import RouteTable, decide
from semroute_stream._errors import ConfigError
from semroute_stream._evaluate import evaluate, fit_thresholds, load_labelled
from semroute_stream._routes import RoutesConfig

DIM = 64
E = np.eye(DIM, dtype=np.float32)


def at(route_axis: int, cosine: float, slot: int) -> np.ndarray:
    """A unit vector with cosine ``cosine`` to basis vector ``route_axis`` (``slot`` is spare)."""
    v = np.zeros(DIM)
    v[route_axis] = cosine
    v[slot] = math.sqrt(1 - cosine**2)
    return v.astype(np.float32)


def two_routes(default_threshold: float = 0.5, **extra: object) -> RoutesConfig:
    return RoutesConfig.model_validate(
        {
            "default_threshold": default_threshold,
            "routes": [
                {"name": "a", "utterances": ["a"]},
                {"name": "b", "utterances": ["b"]},
            ],
            **extra,
        }
    )


def test_evaluate_figures_on_a_tiny_known_case() -> None:
    cfg = two_routes()
    table = RouteTable.build(cfg, E[:2])
    queries = np.stack(
        [
            E[0],  # -> a, gold a: right
            E[1],  # -> b, gold b: right
            unit(1, 0.9, *[0] * (DIM - 2)),  # -> a (.74), gold b: wrong
            E[2],  # -> fallback, gold null: right
            E[2],  # -> fallback, gold a: wrong (top-1 ignoring thresholds is a: tie -> index 0)
            unit(0.6, 0, 0.8, *[0] * (DIM - 3)),  # -> a (.6), gold null: wrong
        ]
    )
    labels = ["a", "b", "b", None, "a", None]
    figures = evaluate(table, queries, labels)
    assert figures["n"] == 6 and figures["n_in_scope"] == 4 and figures["n_out_of_scope"] == 2
    assert figures["overall_accuracy"] == 0.5
    assert figures["in_scope_accuracy"] == 0.5
    assert figures["top1_accuracy"] == 0.75
    assert figures["fallback_precision"] == 0.5
    assert figures["fallback_recall"] == 0.5
    assert figures["per_route"]["a"] == {
        "precision": pytest.approx(1 / 3, abs=1e-6),
        "recall": 0.5,
        "f1": 0.4,
        "support": 2,
        "predicted": 3,
    }
    assert figures["per_route"]["b"]["precision"] == 1.0
    assert figures["per_route"]["b"]["recall"] == 0.5
    assert figures["per_route"]["b"]["f1"] == pytest.approx(2 / 3, abs=1e-6)
    assert figures["macro_f1"] == pytest.approx((0.4 + 2 / 3) / 2, abs=1e-6)
    assert figures["confusions"] == [
        {"gold": "a", "predicted": None, "count": 1},
        {"gold": "b", "predicted": "a", "count": 1},
        {"gold": None, "predicted": "a", "count": 1},
    ]


def test_evaluate_undefined_figures_are_none() -> None:
    table = RouteTable.build(two_routes(), E[:2])
    figures = evaluate(table, E[:2], ["a", "b"])  # no null labels, no fallbacks
    assert figures["overall_accuracy"] == 1.0
    assert figures["fallback_precision"] is None and figures["fallback_recall"] is None
    empty = evaluate(table, np.zeros((0, DIM), dtype=np.float32), [])
    assert empty["n"] == 0 and empty["overall_accuracy"] is None


def test_evaluate_rejects_unknown_labels() -> None:
    table = RouteTable.build(two_routes(), E[:2])
    with pytest.raises(ValueError, match="'zzz'"):
        evaluate(table, E[:1], ["zzz"])


def test_load_labelled(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "hello", "label": "a"}\n\n{"text": "x", "label": null, "extra": 1}\n')
    data = load_labelled(good, ["a", "b"])
    assert data.texts == ["hello", "x"] and data.labels == ["a", None] and len(data) == 2

    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        "\n".join(
            [
                '{"text": "ok", "label": "a"}',
                "{not json",
                '{"text": 5, "label": "a"}',
                '{"text": "t", "label": "nope"}',
                '{"text": "t"}',
                "[1, 2]",
            ]
        )
    )
    with pytest.raises(ConfigError) as info:
        load_labelled(bad, ["a", "b"])
    lines = str(info.value).splitlines()
    assert [line.split(": ")[1] for line in lines] == [f"line {n}" for n in range(2, 7)]
    assert all(line.startswith(f"{bad}: ") for line in lines)
    assert "label 'nope' names no route" in lines[2]
    with pytest.raises(ConfigError, match="cannot read"):
        load_labelled(tmp_path / "missing.jsonl")


def test_fit_repairs_a_bad_default_threshold() -> None:
    # In-scope queries sit at .70-.90 from their route, out-of-scope ones at .30-.40:
    # any default threshold in (.40, .70] is perfect; .95 rejects everything.
    cfg = two_routes(default_threshold=0.95)
    table = RouteTable.build(cfg, E[:2])
    rows, labels = [], []
    slot = iter(range(2, DIM))
    for route, name in ((0, "a"), (1, "b")):
        for c in (0.70, 0.75, 0.80, 0.90):
            rows.append(at(route, c, next(slot)))
            labels.append(name)
        for c in (0.30, 0.35, 0.40):
            rows.append(at(route, c, next(slot)))
            labels.append(None)
    queries = np.stack(rows)
    before = evaluate(table, queries, labels)
    assert before["overall_accuracy"] == pytest.approx(6 / 14, abs=1e-6)

    fitted = fit_thresholds(cfg, table, queries, labels)
    assert 0.40 < fitted.default_threshold <= 0.70
    assert [route.threshold for route in fitted.routes] == [None, None]
    after = evaluate(RouteTable.build(fitted, E[:2]), queries, labels)
    assert after["overall_accuracy"] == 1.0
    assert cfg.default_threshold == 0.95  # the input is left alone


def test_fit_sets_per_route_thresholds_where_one_global_threshold_cannot_do() -> None:
    # Route a: right answers at .80-.90, out-of-scope near a at .60-.70.
    # Route b: right answers at .50-.60, out-of-scope near b at .20-.30.
    # No single threshold gets everything; a in (.70, .80] and b in (.30, .50] do.
    cfg = two_routes(default_threshold=0.5)
    table = RouteTable.build(cfg, E[:2])
    rows, labels = [], []
    slot = iter(range(2, DIM))
    cases = {
        (0, "a"): (0.80, 0.82, 0.84, 0.86, 0.88, 0.90),
        (0, None): (0.60, 0.62, 0.65, 0.68, 0.70),
        (1, "b"): (0.50, 0.52, 0.54, 0.56, 0.58, 0.60),
        (1, None): (0.20, 0.25, 0.30),
    }
    for (route, name), cosines in cases.items():
        for c in cosines:
            rows.append(at(route, c, next(slot)))
            labels.append(name)
    queries = np.stack(rows)
    fitted = fit_thresholds(cfg, table, queries, labels)
    thresholds = fitted.thresholds()
    assert 0.70 < thresholds[0] <= 0.80
    assert 0.30 < thresholds[1] <= 0.50
    after = evaluate(RouteTable.build(fitted, E[:2]), queries, labels)
    assert after["overall_accuracy"] == 1.0

    # With too little labelled data per route, routes keep the global threshold.
    few = fit_thresholds(cfg, table, queries, labels, min_support=7)
    assert [route.threshold for route in few.routes] == [None, None]


def test_fit_keeps_metadata_and_method_and_handles_no_data() -> None:
    cfg = two_routes(method="top5_mean")
    cfg.routes[0].metadata["team"] = "x"
    table = RouteTable.build(cfg, E[:2])
    same = fit_thresholds(cfg, table, np.zeros((0, DIM), dtype=np.float32), [])
    assert same == cfg and same is not cfg
    fitted = fit_thresholds(cfg, table, E[:2], ["a", "b"])
    assert fitted.method == "top5_mean" and fitted.routes[0].metadata == {"team": "x"}


def test_fit_is_fast_at_clinc150_size() -> None:
    rng = np.random.default_rng(3)
    n_routes, per_route, n_rows, dim = 150, 10, 3000, 48
    centres = rng.normal(size=(n_routes, dim))
    utts = np.repeat(centres, per_route, axis=0) + rng.normal(size=(n_routes * per_route, dim))
    utts /= np.linalg.norm(utts, axis=1, keepdims=True)
    gold = rng.integers(0, n_routes, size=n_rows)
    queries = centres[gold] + 1.2 * rng.normal(size=(n_rows, dim))
    labels: list[str | None] = [f"r{g}" for g in gold]
    queries[-300:] = rng.normal(size=(300, dim))
    labels[-300:] = [None] * 300
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    cfg = RoutesConfig.model_validate(
        {
            "routes": [
                {"name": f"r{k}", "utterances": [f"r{k} {i}" for i in range(per_route)]}
                for k in range(n_routes)
            ]
        }
    )
    table = RouteTable.build(cfg, utts.astype(np.float32))
    started = time.perf_counter()
    fitted = fit_thresholds(cfg, table, queries.astype(np.float32), labels)
    seconds = time.perf_counter() - started
    assert seconds < 20
    before = evaluate(table, queries.astype(np.float32), labels)["overall_accuracy"]
    after_table = RouteTable.build(fitted, utts.astype(np.float32))
    after = evaluate(after_table, queries.astype(np.float32), labels)["overall_accuracy"]
    assert after >= before
    assert len(decide(after_table, queries[:5].astype(np.float32))) == 5
