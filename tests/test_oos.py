"""Out-of-scope robustness: the head's energy floor (kernels.logsumexp, HeadParams.min_energy,
the CV default), the fit objectives (thresholds.row_weights, global_cut, head_fallback) and
their validation (the routes schema, ``fit --objective/--expected-oos-rate``). Pure numpy,
synthetic data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from fakes import FakeEncoder

from semroute_stream._cli import offline as _cli_offline
from semroute_stream._cli.app import build_parser, main
from semroute_stream._errors import ConfigError
from semroute_stream._offline.fit.compare import LabelledScores, energy_scores, head_fallback
from semroute_stream._offline.fit.evaluate import evaluate
from semroute_stream._offline.fit.thresholds import DEFAULT_OBJECTIVE, global_cut, row_weights
from semroute_stream._routing.decision import FALLBACK_REASONS, RouteTable, decide
from semroute_stream._routing.head_params import HeadParams
from semroute_stream._routing.kernels import logsumexp
from semroute_stream._routing.router import compile_table
from semroute_stream._routing.schema import RoutesConfig, parse_routes
from semroute_stream._routing.selection import (
    ENERGY_QUANTILE,
    CrossValidation,
    choose_method,
    fit_temperature,
)

# --- the kernel ----------------------------------------------------------------------------


def test_logsumexp_matches_the_definition_and_does_not_overflow() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(size=(5, 7)).astype(np.float32)
    out = logsumexp(z)
    assert out.dtype == np.float32 and out.shape == (5,)
    np.testing.assert_allclose(out, np.log(np.exp(z.astype(np.float64)).sum(axis=1)), rtol=1e-6)
    big = np.array([[1000.0, 1000.0], [-1000.0, -1000.0]])
    np.testing.assert_allclose(logsumexp(big), [1000.0 + np.log(2), -1000.0 + np.log(2)])


def test_energy_sees_what_the_softmax_cannot() -> None:
    # Same probabilities (one row is the other shifted), different evidence.
    z = np.array([[0.0, -5.0], [-3.0, -8.0]])
    p = np.exp(z - logsumexp(z)[:, None])
    np.testing.assert_allclose(p[0], p[1])
    assert logsumexp(z)[0] - logsumexp(z)[1] == pytest.approx(3.0)


# --- the decision --------------------------------------------------------------------------


def _energy_table(min_energy: float | None) -> tuple[RouteTable, np.ndarray]:
    """Two routes on orthogonal axes, a head with blend 2 (energy grows with the nearest
    cosine), no confidence or similarity floor; queries: on route 0's axis, then orthogonal
    to every utterance."""
    eye = np.eye(4, dtype=np.float32)
    cfg = RoutesConfig.model_validate(
        {
            "method": "head",
            "default_threshold": -1.0,
            "routes": [
                {"name": "a", "utterances": ["a"]},
                {"name": "b", "utterances": ["b"]},
            ],
        }
    )
    head = HeadParams(
        weights=np.zeros((4, 2), np.float32),
        bias=np.zeros(2, np.float32),
        blend=2.0,
        temperature=1.0,
        min_confidence=np.zeros(2, np.float32),
        min_energy=min_energy,
    )
    table = compile_table(cfg, eye[:2], head=head)
    return table, eye[[0, 2]]


def test_a_query_below_the_energy_floor_falls_back_with_its_reason() -> None:
    table, queries = _energy_table(None)
    assert decide(table, queries).route.tolist() == [0, 0]  # no floor: both routed
    # energy = log(e^(2 cos_a) + e^(2 cos_b)) - log 2: 2 + log((1 + e^-2) / 2) vs 0.
    table, queries = _energy_table(1.0)
    d = decide(table, queries)
    assert d.route.tolist() == [0, -1]
    assert FALLBACK_REASONS[d.reason[1]] == "low_energy"
    assert d.explain(1, table)["fallback_reason"] == "low_energy"


def test_eval_counts_the_energy_fallbacks() -> None:
    table, queries = _energy_table(1.0)
    figures = evaluate(table, queries, ["a", None])
    assert figures["fallback_reasons"] == {"low_energy": 1}
    assert figures["fallback_recall"] == 1.0


def test_head_params_reject_a_non_finite_energy_floor() -> None:
    with pytest.raises(ValueError, match="min_energy"):
        HeadParams(weights=np.zeros((2, 2)), bias=np.zeros(2), min_energy=float("nan"))


# --- the prior-free default ----------------------------------------------------------------


def test_auto_derives_the_energy_floor_from_the_held_out_utterances() -> None:
    rng = np.random.default_rng(1)
    n, routes = 400, 4
    gold = np.arange(n) % routes
    log_proba = rng.normal(size=(n, routes)).astype(np.float32)
    log_proba[np.arange(n), gold] += 3.0
    cosines = np.full((n, routes), 0.5, np.float32)
    cv = CrossValidation(np.arange(n), gold, log_proba, cosines, cosines)
    choice = choose_method(cv, allowed=("head",), blend=0.0)
    temperature = fit_temperature(log_proba, gold)
    expected = np.quantile(logsumexp(log_proba.astype(np.float64) / temperature), ENERGY_QUANTILE)
    assert choice.min_energy == pytest.approx(expected, abs=1e-4)
    assert choice.as_dict()["min_energy"] == choice.min_energy


# --- the objectives ------------------------------------------------------------------------


def test_row_weights_give_the_expected_overall_accuracy_at_the_stated_share() -> None:
    gold = np.array([0, 1, 1, 0, 1, 0, -1, -1])  # 6 in scope, 2 out of scope (25 %)
    np.testing.assert_array_equal(row_weights(gold, "accuracy", 0.2), np.ones(8))
    weights = row_weights(gold, "balanced", 0.2)
    np.testing.assert_allclose(weights, [1, 1, 1, 1, 1, 1, 0.75, 0.75])  # 0.2/0.8 * 6/2
    pred = np.array([0, 1, 0, 0, -1, 0, -1, 1])  # in scope 4/6 right, recall 1/2
    right = (pred == gold).astype(float)
    weighted = float((weights * right).sum() / weights.sum())
    assert weighted == pytest.approx(0.8 * 4 / 6 + 0.2 * 1 / 2)
    # No out-of-scope rows: nothing to re-weight.
    np.testing.assert_array_equal(row_weights(np.array([0, 1]), "balanced", 0.3), np.ones(2))


@pytest.mark.parametrize(
    ("objective", "rate", "message"),
    [
        ("balanced", 1.0, "in \\[0, 1\\)"),
        ("balanced", -0.1, "in \\[0, 1\\)"),
        ("balanced", float("nan"), "in \\[0, 1\\)"),
        ("recall", 0.2, "unknown objective 'recall'"),
    ],
)
def test_row_weights_reject_bad_arguments(objective: str, rate: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        row_weights(np.array([0, -1]), objective, rate)  # type: ignore[arg-type]


def _three_percent_sample() -> tuple[np.ndarray, np.ndarray]:
    """97 in-scope rows (top route right), 3 out-of-scope rows; 10 in-scope rows score among
    the out-of-scope ones (0.36-0.46), the rest well above (0.6-0.9)."""
    low = np.linspace(0.36, 0.46, 10)
    high = np.linspace(0.6, 0.9, 87)
    oos = np.array([0.35, 0.40, 0.45])
    top = np.concatenate([low, high, oos])
    gold = np.concatenate([np.zeros(97, np.intp), -np.ones(3, np.intp)])
    scores = np.stack([top, top - 0.5], axis=1)  # route 0 always on top
    return scores, gold


def test_the_accuracy_objective_inherits_the_sample_share_and_balanced_does_not() -> None:
    scores, gold = _three_percent_sample()
    low, gain, _ = global_cut(scores, gold, 0.5, row_weights(gold, "accuracy", 0.2))
    # Rows right: a low cut keeps the 10 in-scope rows among the out-of-scope ones and lets
    # two out-of-scope rows through (the third, lowest, is rejected for free).
    assert 0.35 < low < 0.36
    assert gain == pytest.approx(97 - 2)
    high, gain, _ = global_cut(scores, gold, 0.5, row_weights(gold, "balanced", 0.2))
    # At 20 % the 3 rows weigh 0.25 * 97 / 3 each: worth the 9 in-scope rows below the
    # highest of them (0.45); the one at 0.46 stays.
    assert 0.45 < high < 0.46
    assert gain == pytest.approx(88.0)


def test_head_fallback_raises_the_energy_floor_for_the_stated_share() -> None:
    # One route; the softmax is the same for every row, only the energy tells rows apart.
    n_high, n_low, n_oos = 87, 10, 3
    energy = np.concatenate([np.full(n_high, 0.0), np.linspace(-3.4, -2.6, n_low)])
    energy = np.concatenate([energy, [-3.3, -3.0, -2.7]])
    log_proba = np.stack([energy, energy - 5.0], axis=1)
    gold = np.concatenate([np.zeros(n_high + n_low, np.intp), -np.ones(n_oos, np.intp)])
    nearest = np.full(log_proba.shape, 0.5)
    ls = LabelledScores(gold, nearest, nearest, log_proba)
    row_energy = energy_scores(log_proba, 1.0)
    fitted = {
        objective: head_fallback(
            log_proba,
            ls,
            temperature=1.0,
            anchor_confidence=0.0,
            anchor_similarity=-1.0,
            weights=row_weights(gold, objective, 0.2),
        )
        for objective in ("accuracy", "balanced")
    }
    assert fitted["accuracy"].min_energy <= row_energy.min()  # accept every row
    floor = fitted["balanced"].min_energy
    # At 20 % every out-of-scope row is rejected, with the in-scope rows of the low band
    # below the highest of them (all but one).
    assert np.all(row_energy[gold < 0] < floor)
    assert np.sum(row_energy[gold >= 0] < floor) == n_low - 1


def test_head_fallback_keeps_the_anchor_when_told_not_to_learn_the_energy_floor() -> None:
    log_proba = np.array([[0.0, -5.0], [-1.0, -6.0], [-3.0, -8.0]])
    gold = np.array([0, 0, 0])
    nearest = np.full(log_proba.shape, 0.5)
    ls = LabelledScores(gold, nearest, nearest, log_proba)
    fitted = [
        head_fallback(
            log_proba,
            ls,
            temperature=1.0,
            anchor_confidence=0.0,
            anchor_similarity=-1.0,
            anchor_energy=-0.5,
            learn_energy_floor=learn,
        )
        for learn in (False, True)
    ]
    kept, learnt = fitted
    assert kept.min_energy == -0.5  # rejects two in-scope rows: the prior-free floor stays
    assert learnt.min_energy < energy_scores(log_proba, 1.0).min()  # rows right: no floor


def test_the_default_objective_is_balanced() -> None:
    assert DEFAULT_OBJECTIVE == "balanced"


# --- validation ----------------------------------------------------------------------------

_FIT = ["fit", "--routes", "r.yaml", "--data", "d.jsonl", "--out", "o.yaml"]


def test_fit_parses_the_objective_and_the_rate() -> None:
    args = build_parser().parse_args(_FIT)
    assert (args.objective, args.expected_oos_rate) == ("balanced", 0.2)
    args = build_parser().parse_args([*_FIT, "--objective", "accuracy", "--expected-oos-rate", "0"])
    assert (args.objective, args.expected_oos_rate) == ("accuracy", 0.0)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--expected-oos-rate", "1"], "in [0, 1) (0.2 = 20 % out-of-scope), got 1\n"),
        (["--expected-oos-rate", "-0.5"], "must be a share of the traffic in [0, 1)"),
        (["--expected-oos-rate", "lots"], "not a number: 'lots'"),
        (["--objective", "recall"], "invalid choice: 'recall'"),
    ],
)
def test_fit_rejects_bad_arguments(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([*_FIT, *extra])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def _routes(head: dict[str, object]) -> dict[str, object]:
    return {"head": head, "routes": [{"name": "a", "utterances": ["x"]}]}


def test_the_routes_schema_takes_an_energy_floor() -> None:
    assert parse_routes(_routes({"min_energy": -6.5})).head.min_energy == -6.5
    assert parse_routes(_routes({})).head.min_energy is None  # derived by the CV


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (5000.0, "less than or equal to 1000"),
        ("nan", "finite number"),
        ("low", "valid number"),
    ],
)
def test_the_routes_schema_rejects_a_bad_energy_floor(value: object, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_routes(_routes({"min_energy": value}), "routes.yaml")
    text = str(exc.value)
    assert "routes.yaml: head: min_energy:" in text and message in text


def test_fit_says_what_it_tuned_for(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(_cli_offline, "make_encoder", lambda args: FakeEncoder())
    monkeypatch.setenv("SEMROUTE_CACHE_DIR", str(tmp_path / "cache"))
    routes = {
        "routes": [
            {"name": "billing", "utterances": ["refund my charge", "billing invoice wrong"]},
            {"name": "login", "utterances": ["cannot log in", "reset my password"]},
        ]
    }
    rows = [
        {"text": "i want a refund", "label": "billing"},
        {"text": "password reset please", "label": "login"},
        {"text": "tell me a joke", "label": None},
    ]
    (tmp_path / "routes.yaml").write_text(yaml.safe_dump(routes))
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = [
        "fit",
        "--routes",
        str(tmp_path / "routes.yaml"),
        "--data",
        str(tmp_path / "data.jsonl"),
    ]
    argv += ["--out", str(tmp_path / "out.yaml"), "--json"]
    seen = {}
    for extra in ([], ["--expected-oos-rate", "0.35"], ["--objective", "accuracy"]):
        assert main([*argv, *extra]) == 0
        out = capsys.readouterr().out
        summary = json.loads(out.rstrip("\n").splitlines()[-1])
        seen[tuple(extra)] = (summary["objective"], summary["expected_oos_rate"])
    assert seen == {
        (): ("balanced", 0.2),
        ("--expected-oos-rate", "0.35"): ("balanced", 0.35),
        ("--objective", "accuracy"): ("accuracy", None),
    }
