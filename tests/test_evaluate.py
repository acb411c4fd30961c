"""Evaluation figures and threshold fitting (_offline.*) with known answers."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fakes import unit

from semroute_stream._errors import ConfigError
from semroute_stream._offline.fit.compare import compare_methods
from semroute_stream._offline.fit.evaluate import evaluate, suspect_utterances
from semroute_stream._offline.fit.fit_routes import fit_routes
from semroute_stream._offline.fit.thresholds import fit_thresholds
from semroute_stream._offline.fit.workflows import add_labelled_utterances
from semroute_stream._offline.labelled import load_labelled
from semroute_stream._routing.decision import decide
from semroute_stream._routing.router import compile_table, resolve_routes, train_route_head
from semroute_stream._routing.schema import RoutesConfig

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
    table = compile_table(cfg, E[:2])
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
    table = compile_table(two_routes(), E[:2])
    figures = evaluate(table, E[:2], ["a", "b"])  # no null labels, no fallbacks
    assert figures["overall_accuracy"] == 1.0
    assert figures["fallback_precision"] is None and figures["fallback_recall"] is None
    empty = evaluate(table, np.zeros((0, DIM), dtype=np.float32), [])
    assert empty["n"] == 0 and empty["overall_accuracy"] is None


def test_evaluate_rejects_unknown_labels() -> None:
    table = compile_table(two_routes(), E[:2])
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
    table = compile_table(cfg, E[:2])
    rows: list[np.ndarray] = []
    labels: list[str | None] = []
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
    assert fitted.default_threshold is not None
    assert 0.40 < fitted.default_threshold <= 0.70
    assert [route.threshold for route in fitted.routes] == [None, None]
    after = evaluate(compile_table(fitted, E[:2]), queries, labels)
    assert after["overall_accuracy"] == 1.0
    assert cfg.default_threshold == 0.95  # the input is left alone


def test_fit_sets_per_route_thresholds_where_one_global_threshold_cannot_do() -> None:
    # Route a: right answers at .80-.90, out-of-scope near a at .60-.70.
    # Route b: right answers at .50-.60, out-of-scope near b at .20-.30.
    # No single threshold gets everything; a in (.70, .80] and b in (.30, .50] do.
    cfg = two_routes(default_threshold=0.5)
    table = compile_table(cfg, E[:2])
    rows: list[np.ndarray] = []
    labels: list[str | None] = []
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
    after = evaluate(compile_table(fitted, E[:2]), queries, labels)
    assert after["overall_accuracy"] == 1.0

    # With too little labelled data per route, routes keep the global threshold.
    few = fit_thresholds(cfg, table, queries, labels, min_support=7)
    assert [route.threshold for route in few.routes] == [None, None]


def test_fit_keeps_metadata_and_method_and_handles_no_data() -> None:
    cfg = two_routes(method="top5_mean")
    cfg.routes[0].metadata["team"] = "x"
    table = compile_table(cfg, E[:2])
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
    table = compile_table(cfg, utts.astype(np.float32))
    started = time.perf_counter()
    fitted = fit_thresholds(cfg, table, queries.astype(np.float32), labels)
    seconds = time.perf_counter() - started
    assert seconds < 20
    before = evaluate(table, queries.astype(np.float32), labels)["overall_accuracy"]
    after_table = compile_table(fitted, utts.astype(np.float32))
    after = evaluate(after_table, queries.astype(np.float32), labels)["overall_accuracy"]
    assert after >= before
    assert len(decide(after_table, queries[:5].astype(np.float32))) == 5


# --- authoring aids ------------------------------------------------------------------------


def test_confusing_utterances_and_overlapping_routes_on_a_tiny_case() -> None:
    # Route a: utterances on axes 0 and 1; b on axes 2 and 3, plus one stray utterance "b 2"
    # that sits almost on a's axis 0 (a mislabelled example).
    cfg = RoutesConfig.model_validate(
        {
            "method": "max",
            "default_threshold": 0.3,
            "routes": [
                {"name": "a", "utterances": ["a 0", "a 1"]},
                {"name": "b", "utterances": ["b 0", "b 1", "b 2"]},
            ],
        }
    )
    rest = [0.0] * (DIM - 5)
    utterances = [
        unit(1, 0.3, 0, 0, 0, *rest),  # a 0
        unit(0.3, 1, 0, 0, 0, *rest),  # a 1
        unit(0, 0, 1, 0.3, 0, *rest),  # b 0
        unit(0, 0, 0.3, 1, 0, *rest),  # b 1
        unit(0.95, 0, 0, 0, 0.3, *rest),  # b 2, the stray one
    ]
    table = compile_table(cfg, np.stack(utterances))
    queries = np.stack(
        [
            unit(1, 0, 0, 0, 0.4, *[0] * (DIM - 5)),  # gold a, pulled to b by "b 2"
            unit(1, 0, 0, 0, 0.5, *[0] * (DIM - 5)),  # gold a, pulled to b by "b 2"
            unit(0, 1, 0.1, *[0] * (DIM - 3)),  # gold a: right
            unit(0, 0, 1, *[0] * (DIM - 3)),  # gold b: right
            unit(0.9, 0, 0, 0, 0.6, *[0] * (DIM - 5)),  # gold null, routed to b by "b 2"
        ]
    )
    labels = ["a", "a", "a", "b", None]
    texts = ["q0", "q1", "q2", "q3", "q4"]
    figures = evaluate(table, queries, labels, texts)
    confusing = figures["confusing_utterances"]
    assert confusing == [
        {
            "utterance": "b 2",
            "route": "b",
            "count": 3,
            "pulled_from": {"a": 2, "(no route)": 1},
            "examples": ["q0", "q1", "q4"],
        }
    ]
    overlap = figures["overlapping_routes"]
    assert len(overlap) == 1 and overlap[0]["routes"] == ["a", "b"]
    # "a 0" and "b 2" are each other's nearest neighbours: 2 of the 5 utterances.
    assert overlap[0]["nn_count"] == 2 and overlap[0]["nn_rate"] == 0.4
    assert overlap[0]["closest_pair"]["utterances"] == ["a 0", "b 2"]
    closest = float(utterances[0] @ utterances[4])
    assert overlap[0]["closest_pair"]["similarity"] == pytest.approx(closest, abs=1e-4)
    assert -1 <= overlap[0]["centroid_similarity"] <= 1
    assert figures["fallback_reasons"] == {}
    # Nothing wrong, nothing listed.
    assert evaluate(table, queries[2:4], labels[2:4])["confusing_utterances"] == []


# --- method comparison and fitting with the head -------------------------------------------


def _head_case(
    rng: np.random.Generator, noise: float, per_route: int = 12, n_routes: int = 4
) -> tuple[RoutesConfig, np.ndarray, np.ndarray, list[str | None]]:
    """Noisy utterances around well-separated means (the head averages the noise away),
    labelled queries from the same routes plus out-of-scope ones on other axes."""
    centres = np.eye(DIM)[:n_routes]
    route_of = np.repeat(np.arange(n_routes), per_route)
    utts = centres[route_of] + noise * rng.normal(size=(len(route_of), DIM))
    gold = np.repeat(np.arange(n_routes), 15)
    queries = centres[gold] + noise * rng.normal(size=(len(gold), DIM))
    far = np.eye(DIM)[n_routes : n_routes + 10] + 0.2 * rng.normal(size=(10, DIM))
    labels: list[str | None] = [f"r{g}" for g in gold] + [None] * len(far)
    cfg = RoutesConfig.model_validate(
        {
            "head": {"use_names": False, "lexical": 0},
            "routes": [
                {"name": f"r{k}", "utterances": [f"r{k} {i}" for i in range(per_route)]}
                for k in range(n_routes)
            ],
        }
    )
    return cfg, unit_rows(utts), unit_rows(np.concatenate([queries, far])), labels


def unit_rows(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return out


def test_fit_picks_and_records_the_head_where_it_wins(tmp_path: Path) -> None:
    cfg, utts, queries, labels = _head_case(np.random.default_rng(11), noise=0.25)
    head = train_route_head(cfg, utts, None, model_name="m", cache_dir=tmp_path)
    base = compile_table(cfg, utts, method="max")
    result = fit_routes(cfg, base, head, queries, labels)
    assert result.method == "head" and result.routes.method == "head"
    chosen = [c for c in result.candidates if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["method"] == "head"
    best_max = next(c for c in result.candidates if c["candidate"] == "max")
    assert chosen[0]["fitted_overall_accuracy"] > best_max["fitted_overall_accuracy"]
    fitted = result.routes
    assert fitted.head.blend is not None and fitted.head.temperature is not None
    assert fitted.head.min_confidence is not None and fitted.default_threshold is not None
    # What fit wrote is complete: loading it needs no cross-validation, and the far-away
    # out-of-scope queries fall back.
    resolved = resolve_routes(fitted, utts, None, model_name="m", cache_dir=tmp_path)
    assert resolved.choice is None and resolved.method == "head"
    figures = evaluate(resolved.table, queries, labels)
    assert figures["overall_accuracy"] >= 0.9 and figures["fallback_recall"] >= 0.8
    # The head never on the table: fit compares the similarity methods only.
    only = fit_routes(cfg, base, None, queries, labels)
    assert only.method in ("max", "top5_mean") and len(only.candidates) == 2
    assert only.routes.method == only.method
    forced = fit_routes(cfg, base, head, queries, labels, methods=("max",))
    assert forced.routes.method == "max" and [c["candidate"] for c in forced.candidates] == ["max"]


def test_fit_picks_max_where_the_nearest_utterance_wins(tmp_path: Path) -> None:
    # XOR: each route is two opposite clusters; no linear head separates them.
    rng = np.random.default_rng(12)
    e = np.eye(DIM)
    centres = np.stack([e[0] + e[1], -e[0] - e[1], e[0] - e[1], -e[0] + e[1]])
    utts = unit_rows(np.repeat(centres, 8, axis=0) + 0.15 * rng.normal(size=(32, DIM)))
    pick = np.repeat(np.arange(4), 10)
    queries = unit_rows(centres[pick] + 0.15 * rng.normal(size=(40, DIM)))
    labels: list[str | None] = ["x" if p < 2 else "y" for p in pick]
    cfg = RoutesConfig.model_validate(
        {
            "head": {"use_names": False, "lexical": 0},
            "routes": [
                {"name": "x", "utterances": [f"x{i}" for i in range(16)]},
                {"name": "y", "utterances": [f"y{i}" for i in range(16)]},
            ],
        }
    )
    head = train_route_head(cfg, utts, None, model_name="m", cache_dir=None)
    result = fit_routes(cfg, compile_table(cfg, utts, method="max"), head, queries, labels)
    assert result.method == "max" and result.routes.method == "max"
    comparison = compare_methods(compile_table(cfg, utts), head, queries, labels)
    by_name = {row["candidate"]: row for row in comparison}
    assert by_name["max"]["top1_accuracy"] == 1.0
    assert by_name["head(blend=0)"]["top1_accuracy"] < 0.8
    assert by_name["max"]["cv_accuracy"] == 1.0
    assert {"overall_accuracy", "fitted_overall_accuracy"} <= set(by_name["max"])


def test_adding_labelled_rows_as_utterances() -> None:
    cfg = two_routes()
    utts = E[:2]
    queries = np.stack([E[2], E[3], E[4], E[5]])
    texts = ["new a", "b", "null row", "new b"]
    labels: list[str | None] = ["a", "b", None, "b"]
    out, matrix, added = add_labelled_utterances(cfg, utts, texts, labels, queries)
    assert added == 2  # "b" is already an utterance of b; null rows belong to no route
    assert out.routes[0].utterances == ["a", "new a"]
    assert out.routes[1].utterances == ["b", "new b"]
    assert np.array_equal(matrix, np.stack([E[0], E[2], E[1], E[5]]))
    assert cfg.routes[0].utterances == ["a"]  # the input is left alone
    only = add_labelled_utterances(cfg, utts, texts, labels, queries, np.array([0, 0, 0, 1]))
    assert only[2] == 1 and only[0].routes[0].utterances == ["a"]


# --- the eval and fit commands with the head -----------------------------------------------

TOPICS = {
    "billing": ["charged", "invoice", "refund", "payment", "card", "bill", "price", "fee"],
    "shipping": ["parcel", "delivery", "tracking", "package", "courier", "address", "late"],
    "login": ["password", "login", "account", "locked", "reset", "username", "email"],
}


def _cli_files(tmp_path: Path) -> dict[str, Path]:
    import json

    rng = np.random.default_rng(0)
    routes = {
        "fallback": {"name": "other"},
        "routes": [
            {
                "name": name,
                "utterances": [
                    " ".join(rng.choice(words, size=3, replace=False)) for _ in range(8)
                ],
            }
            for name, words in TOPICS.items()
        ],
    }
    rows: list[dict[str, str | None]] = [
        {"text": " ".join(rng.choice(words, size=2, replace=False)), "label": name}
        for name, words in TOPICS.items()
        for _ in range(6)
    ]
    rows += [{"text": t, "label": None} for t in ("weather in paris", "tell me a joke")]
    files = {"routes": tmp_path / "routes.yaml", "data": tmp_path / "data.jsonl"}
    files["routes"].write_text(json.dumps(routes))
    files["data"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return files


@pytest.fixture
def fake_cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    from fakes import FakeEncoder

    from semroute_stream._cli import offline as _cli_offline

    encoder = FakeEncoder()
    monkeypatch.setattr(_cli_offline, "make_encoder", lambda args: encoder)
    monkeypatch.setenv("SEMROUTE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    import json

    from semroute_stream._cli import app as _cli

    code = _cli.main(argv)
    out = capsys.readouterr().out
    assert code == 0, out
    return code, json.loads(out.rstrip("\n").splitlines()[-1])


def test_eval_method_auto_compares_the_methods(
    fake_cli: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = _cli_files(fake_cli)
    argv = ["eval", "--routes", str(files["routes"]), "--data", str(files["data"]), "--json"]
    _, figures = _run([*argv, "--method", "auto"], capsys)
    assert figures["method_requested"] == "auto"
    resolution = figures["resolution"]
    assert resolution["requested"] == "auto" and resolution["method"] == figures["method"]
    assert resolution["head_cache"] == "miss"
    candidates = [row["candidate"] for row in figures["methods"]]
    assert candidates[:3] == ["max", "top5_mean", "head(blend=0)"]
    assert all(0 <= row["top1_accuracy"] <= 1 for row in figures["methods"])
    assert "confusing_utterances" in figures and "overlapping_routes" in figures
    assert len(figures["overlapping_routes"]) == 3  # every pair of the three routes
    # The second run loads the head from the cache, and decides the same way.
    _, again = _run([*argv, "--method", "auto"], capsys)
    assert again["resolution"]["head_cache"] == "hit"
    assert again["overall_accuracy"] == figures["overall_accuracy"]
    # The file says no method: auto too.
    _, default = _run(argv, capsys)
    assert default["method_requested"] == "auto" and default["methods"] is not None
    _, forced = _run([*argv, "--method", "max"], capsys)
    assert forced["method"] == "max" and forced["methods"] is None


def test_fit_records_the_method(fake_cli: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from semroute_stream._routing.schema import load_routes

    files = _cli_files(fake_cli)
    out = fake_cli / "fitted.yaml"
    argv = ["fit", "--routes", str(files["routes"]), "--data", str(files["data"])]
    _, summary = _run([*argv, "--out", str(out), "--json"], capsys)
    fitted = load_routes(out)
    assert fitted.method == summary["method"] and fitted.method in ("max", "top5_mean", "head")
    assert len(summary["candidates"]) == 8 and sum(c["chosen"] for c in summary["candidates"]) == 1
    assert summary["after"]["overall_accuracy"] >= summary["before"]["overall_accuracy"]
    eval_argv = ["eval", "--routes", str(out), "--data", str(files["data"]), "--json"]
    _, figures = _run(eval_argv, capsys)
    assert figures["overall_accuracy"] == summary["after"]["overall_accuracy"]
    # The file is complete: loading it cross-validates nothing.
    assert "choice" not in figures["resolution"]
    if fitted.method == "head":
        assert fitted.head.blend is not None and fitted.head.temperature is not None

    forced = fake_cli / "max.yaml"
    _, summary = _run([*argv, "--out", str(forced), "--method", "max", "--json"], capsys)
    assert load_routes(forced).method == "max" and summary["method"] == "max"


def test_fit_adding_utterances(fake_cli: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from semroute_stream._routing.schema import load_routes

    files = _cli_files(fake_cli)
    out = fake_cli / "more.json"
    argv = ["fit", "--routes", str(files["routes"]), "--data", str(files["data"])]
    _, summary = _run([*argv, "--out", str(out), "--add-utterances", "all", "--json"], capsys)
    fitted = load_routes(out)
    assert summary["added_utterances"] > 0
    assert sum(len(r.utterances) for r in fitted.routes) == 24 + summary["added_utterances"]
    assert fitted.method in ("max", "top5_mean", "head")  # recorded, not auto
    assert fitted.default_threshold is not None


def test_suspect_utterances_find_a_mislabelled_example() -> None:
    from semroute_stream._routing.selection import cross_validate

    rng = np.random.default_rng(13)
    centres = 2.0 * np.eye(DIM)[:3]
    utts = unit_rows(np.repeat(centres, 6, axis=0) + 0.3 * rng.normal(size=(18, DIM)))
    utts[2] = unit_rows(centres[1:2] + 0.1)[0]  # route r0's third utterance is about r1
    cfg = RoutesConfig.model_validate(
        {
            "method": "max",
            "routes": [
                {"name": f"r{k}", "utterances": [f"r{k} {i}" for i in range(6)]} for k in range(3)
            ],
        }
    )
    table = compile_table(cfg, utts)
    empty = np.zeros((0, DIM), np.float32)
    cv = cross_validate(utts, table.utterance_route, empty, np.zeros(0, np.intp), 3, l2=1e-4)
    for method in ("max", "head"):
        suspects = suspect_utterances(table, cv, method, 0.0)
        assert suspects[0]["utterance"] == "r0 2"
        assert suspects[0]["route"] == "r0" and suspects[0]["goes_to"] == "r1"
        assert suspects[0]["lead"] > 0
