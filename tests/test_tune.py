"""``semroute-stream tune`` (the ``[tune]`` extra): the JAX forward against the ONNX encoder,
a tiny run through the CLI whose model directory the encoder, the router and the offline
commands load, determinism, the guard, and the error without JAX.

Kept small: one training compile serves the whole file (the step is cached per shape and the
learning rate is an argument), and the runs are a few steps on four routes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from semroute_stream._cli import app as _cli
from semroute_stream._encoder import Encoder, EncoderConfig, fidelity_probe_texts
from semroute_stream._encoder.default_model import DEFAULT_MODEL_ID, locate_weights_dir
from semroute_stream._encoder.onnx_build import BertArch
from semroute_stream._errors import ConfigError
from semroute_stream._offline.tune import bert_jax
from semroute_stream._offline.tune.finetune import _guard
from semroute_stream._offline.tune.tune_data import BUCKETS, Tokens, bucket, hold_out
from semroute_stream._offline.tune.tune_train import TrainSettings, embed, learning_rates, train
from semroute_stream._routing.router import Router
from semroute_stream._routing.schema import load_routes

ROUTES = {
    "default_threshold": 0.2,  # few fallbacks: the guard's figure is mostly top-1 here
    "routes": [
        {
            "name": "weather",
            "utterances": [
                "will it rain tomorrow",
                "what is the forecast for the weekend",
                "how hot will it be today",
                "is it going to snow tonight",
                "do I need an umbrella",
                "what's the temperature outside",
            ],
        },
        {
            "name": "billing",
            "utterances": [
                "I was charged twice on my card",
                "my invoice shows the wrong amount",
                "I want a refund for this payment",
                "why is there an extra fee on my bill",
                "update my credit card details",
                "the subscription price went up",
            ],
        },
        {
            "name": "music",
            "utterances": [
                "play some jazz",
                "skip to the next song",
                "turn the volume up",
                "put on my workout playlist",
                "who sings this track",
                "pause the music",
            ],
        },
        {
            "name": "greeting",
            "utterances": [
                "hello there",
                "good morning",
                "hi, how are you",
                "hey, nice to meet you",
                "good evening to you",
                "greetings friend",
            ],
        },
    ],
}


@pytest.fixture(scope="module")
def base() -> tuple[bert_jax.Params, BertArch, Tokens]:
    directory = locate_weights_dir()
    params, arch = bert_jax.load_params(directory)
    return params, arch, Tokens(directory / "tokenizer.json")


@pytest.fixture
def routes_file(tmp_path: Path) -> Path:
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump(ROUTES), encoding="utf-8")
    return path


def _texts_labels() -> tuple[list[str], np.ndarray]:
    routes: list[dict[str, list[str]]] = ROUTES["routes"]  # type: ignore[assignment]
    texts = [u for r in routes for u in r["utterances"]]
    labels = np.repeat(np.arange(4), 6)
    return texts, labels


def test_jax_forward_matches_the_onnx_encoder(
    base: tuple[bert_jax.Params, BertArch, Tokens],
) -> None:
    params, arch, tokens = base
    texts = fidelity_probe_texts()
    assert len(texts) >= 24
    got = embed(params, arch, texts, tokens)
    ref = Encoder(EncoderConfig(backend="onnxruntime", precision="fp32")).encode(texts)
    cosines = np.sum(got * ref, axis=1)
    assert cosines.min() > 0.9999, cosines.min()


def test_hold_out_is_stratified_and_never_empties_a_route() -> None:
    labels = [0] * 10 + [1] * 5 + [2]
    train_rows, held = hold_out(labels, 0.2, seed=3)
    assert sorted([*train_rows.tolist(), *held.tolist()]) == list(range(16))
    held_labels = [labels[i] for i in held]
    assert held_labels.count(0) == 2 and held_labels.count(1) == 1 and 2 not in held_labels
    assert np.array_equal(hold_out(labels, 0.2, seed=3)[1], held)
    assert [bucket(n) for n in (1, 16, 17, 500)] == [16, 16, 32, BUCKETS[-1]]


def test_learning_rate_warms_up_and_decays() -> None:
    rates = learning_rates(TrainSettings(learning_rate=1e-3, warmup=0.2), 10)
    assert rates.max() == pytest.approx(1e-3)
    assert rates[0] < rates[1] and rates[-1] < rates[3] and rates[-1] > 0


def test_same_seed_same_weights(base: tuple[bert_jax.Params, BertArch, Tokens]) -> None:
    params, arch, tokens = base
    texts, labels = _texts_labels()
    settings = TrainSettings(epochs=0.5, routes_per_batch=4, per_route=2, seed=5)
    one, losses = train(params, arch, texts, labels, tokens, settings)
    two, _ = train(params, arch, texts, labels, tokens, settings)
    other, _ = train(
        params, arch, texts, labels, tokens, TrainSettings(**{**settings.as_dict(), "seed": 6})
    )
    a, b, c = (bert_jax.to_numpy(p) for p in (one, two, other))
    assert len(losses) == settings.steps(len(texts)) == 2
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    assert any(a[k].tobytes() != c[k].tobytes() for k in a)
    assert any(a[k].tobytes() != params[k].tobytes() for k in a)


def test_tune_writes_a_model_directory_the_encoder_loads(
    routes_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tuned"
    argv = ["tune", "--routes", str(routes_file), "--out", str(out), "--epochs", "1"]
    assert _cli.main([*argv, "--routes-per-batch", "4", "--seed", "1", "--json"]) == 0
    card = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    on_disk = json.loads((out / "tune.json").read_text(encoding="utf-8"))
    assert on_disk == card
    assert card["base_model"]["name"] == DEFAULT_MODEL_ID
    assert len(card["base_model"]["model_safetensors_sha256"]) == 64
    assert card["routes"]["routes"] == 4 and len(card["routes"]["sha256"]) == 64
    assert card["data"] is None and card["seed"] == 1 and card["settings"]["epochs"] == 1.0
    held = card["held_out"]["utterances"]
    assert held["rows"] == 4 and held["before"]["overall_accuracy"] is not None
    assert held["after"]["overall_accuracy"] is not None and card["guard"]["passed"]
    assert card["time"]["steps"] == 2 and card["verify"]["onnx_vs_jax_min_cosine"] > 0.9999
    for name in ("model.onnx", "model.safetensors", "tokenizer.json", "1_Pooling/config.json"):
        assert (out / name).is_file(), name
    assert "fine-tuned by `semroute-stream tune`" in (out / "README.md").read_text("utf-8")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    tuned = Encoder(EncoderConfig(model=str(out), backend="onnxruntime", precision="fp32"))
    base_encoder = Encoder(EncoderConfig(backend="onnxruntime", precision="fp32"))
    assert tuned.pooling == "mean" and tuned.dim == 384
    texts = ["will it rain tomorrow", "play some jazz"]
    assert np.min(np.sum(tuned.encode(texts) * base_encoder.encode(texts), axis=1)) < 0.99999
    # The route head's cache key tells the tuned model apart from the base and any other
    # directory of the same name.
    routes = load_routes(routes_file)
    router = Router(routes, tuned, cache_dir=tmp_path / "heads")
    assert router.model_key.startswith("tuned@")
    assert router.model_key != Router(routes, base_encoder, cache=False).model_key
    assert router("is it going to be sunny").route == "weather"

    queries = tmp_path / "queries.jsonl"
    queries.write_text('{"id": "1", "text": "turn up the music"}\n', encoding="utf-8")
    routed = tmp_path / "routed.jsonl"
    common = ["--model", str(out), "--backend", "onnxruntime", "--precision", "fp32"]
    rargs = ["route", "--routes", str(routes_file), "--input", str(queries), "--output"]
    assert _cli.main([*rargs, str(routed), *common]) == 0
    assert json.loads(routed.read_text("utf-8"))["route"] == "music"
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text('{"text": "good morning to you", "label": "greeting"}\n', "utf-8")
    eargs = ["eval", "--routes", str(routes_file), "--data", str(labelled), "--json"]
    assert _cli.main([*eargs, *common]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["model"] == "tuned" and figures["overall_accuracy"] == 1.0


def test_guard_refuses_a_worse_model_and_writes_nothing(
    routes_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ruined"
    argv = ["tune", "--routes", str(routes_file), "--out", str(out), "--epochs", "1"]
    absurd = [*argv, "--routes-per-batch", "4", "--learning-rate", "0.5"]
    assert _cli.main(absurd) == 1
    captured = capsys.readouterr()
    assert "worse on the held-out utterances" in captured.err and "nothing written" in captured.err
    assert "guard: refused" in captured.out
    assert list(tmp_path.iterdir()) == [routes_file]  # no model, no temporary directory
    assert _cli.main([*absurd, "--temperature", "0.1", "--force"]) == 0
    card = json.loads((out / "tune.json").read_text(encoding="utf-8"))
    assert card["guard"]["passed"] is False and "--force" in card["guard"]["verdict"]
    assert card["settings"]["temperature"] == 0.1


def test_out_that_is_not_a_tune_output_is_refused_before_training(
    routes_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine", encoding="utf-8")
    argv = ["tune", "--routes", str(routes_file), "--out", str(tmp_path / "taken")]
    assert _cli.main(argv) == 2
    assert "not an earlier tune output" in capsys.readouterr().err
    assert (tmp_path / "taken" / "keep.txt").read_text(encoding="utf-8") == "mine"


def test_without_jax_the_error_names_the_extra(
    routes_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, "optax", None)  # import optax -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'semroute-stream\[tune\]'"):
        bert_jax.import_jax()
    argv = ["tune", "--routes", str(routes_file), "--out", str(tmp_path / "m")]
    assert _cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "optax" in err and "pip install 'semroute-stream[tune]'" in err
    assert not (tmp_path / "m").exists()


def test_guard_tolerates_one_row_of_noise_and_refuses_more() -> None:
    # Banking77's figures (evaluate rounds to 6 decimals): 88/95 -> 87/95 is one row.
    before = {"data": {"overall_accuracy": 0.926316}, "utterances": {"overall_accuracy": 0.95}}
    rows = {"data": 95, "utterances": 300}
    one_row = _guard(before, {"data": {"overall_accuracy": 0.915789}}, rows, False)
    assert one_row["passed"] and one_row["warning"] and "within noise" in one_row["verdict"]
    assert one_row["figure"] == "data overall_accuracy"  # the labelled rows, not utterances
    worse = _guard(before, {"data": {"overall_accuracy": 0.905263}}, rows, False)
    assert not worse["passed"] and worse["verdict"].startswith("refused")
    better = _guard(before, {"data": {"overall_accuracy": 0.93}}, rows, False)
    assert better["passed"] and not better["warning"]
