"""Encoder backends (semroute_stream._encoder.backends): ONNX Runtime and OpenVINO, fp32 and bf16.

Every combination the machine supports runs the same fidelity and batch-invariance checks; on a
CPU without native bf16 units the bf16 checks become checks that bf16 is refused (auto: fp32).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from test_encoder import MIXED, REFERENCE, cosines

from semroute_stream._encoder import FIDELITY_MIN, Encoder, EncoderConfig, fidelity_probe_texts
from semroute_stream._encoder import backends as _backends
from semroute_stream._encoder import encoder as _encoder
from semroute_stream._encoder.backends import (
    CpuFeatures,
    available_backends,
    cpu_features,
    pick_backend,
    supported_precisions,
)
from semroute_stream._errors import ModelError

BF16_HERE = "bf16" in supported_precisions("openvino")
COMBOS = [("onnxruntime", "fp32"), ("openvino", "fp32")] + (
    [("openvino", "bf16")] if BF16_HERE else []
)

CPUINFO_XEON_AMX = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
"""
CPUINFO_ZEN5 = """processor\t: 0
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512_vnni avx512_bf16 avx_vnni
"""
CPUINFO_AVX2 = """processor\t: 0
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse2 avx avx2 fma
"""
CPUINFO_GRAVITON3 = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp bf16 sve
CPU implementer\t: 0x41
"""


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "semroute-model-cache"


@pytest.fixture(scope="module", params=COMBOS, ids=["-".join(c) for c in COMBOS])
def encoder(request: pytest.FixtureRequest, model_cache: Path) -> Encoder:
    backend, precision = request.param
    return Encoder(EncoderConfig(cache_dir=model_cache, backend=backend, precision=precision))


@pytest.fixture(scope="module")
def fp32(model_cache: Path) -> Encoder:
    return Encoder(EncoderConfig(cache_dir=model_cache, backend="onnxruntime"))


def features_from(text: str, tmp_path: Path) -> CpuFeatures:
    path = tmp_path / "cpuinfo"
    path.write_text(text, encoding="utf-8")
    return cpu_features.__wrapped__(path)


# ------------------------------------------------------------------------------------------------
# CPU features and backend choice
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cpuinfo", "vector", "bf16"),
    [
        (CPUINFO_XEON_AMX, "avx512", True),
        (CPUINFO_ZEN5, "avx512", True),
        (CPUINFO_AVX2, "avx2", False),
        (CPUINFO_GRAVITON3, "neon", True),
    ],
    ids=["xeon-amx", "zen5", "avx2-only", "graviton3"],
)
def test_cpu_features(cpuinfo: str, vector: str, bf16: bool, tmp_path: Path) -> None:
    features = features_from(cpuinfo, tmp_path)
    assert features.vector == vector
    assert features.bf16_native is bf16
    assert supported_precisions("openvino", features) == (["fp32", "bf16"] if bf16 else ["fp32"])
    assert supported_precisions("onnxruntime", features) == ["fp32"]
    assert features.as_dict()["bf16_native"] is bf16


def test_cpu_features_of_this_machine() -> None:
    here = cpu_features().as_dict()
    assert here["vector"] in ("avx512", "avx2", "avx", "neon", "sse", "?")
    assert set(here) == {"model", "machine", "vector", "bf16_native", "flags"}


def test_unreadable_cpuinfo_means_no_flags(tmp_path: Path) -> None:
    features = cpu_features.__wrapped__(tmp_path / "missing")
    assert features.flags == frozenset()
    assert not features.bf16_native


def test_auto_takes_openvino_for_bf16_on_the_cpu_only(tmp_path: Path) -> None:
    assert "openvino" in available_backends(), "the dev install includes the [openvino] extra"
    cpu = ["CPUExecutionProvider"]
    zen5, avx2 = features_from(CPUINFO_ZEN5, tmp_path), features_from(CPUINFO_AVX2, tmp_path)
    assert pick_backend("auto", cpu, zen5) == "openvino"
    assert pick_backend("auto", cpu, avx2) == "onnxruntime"  # OpenVINO fp32 is no clear win
    assert pick_backend("auto", ["CUDAExecutionProvider", *cpu], zen5) == "onnxruntime"
    assert pick_backend("onnxruntime", cpu, zen5) == "onnxruntime"
    assert pick_backend("openvino", cpu, avx2) == "openvino"  # asked for: given
    assert pick_backend("auto", cpu) == ("openvino" if BF16_HERE else "onnxruntime")


def test_missing_openvino_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, model_cache: Path
) -> None:
    monkeypatch.setattr(_backends, "available_backends", lambda: ["onnxruntime"])
    assert pick_backend("auto", ["CPUExecutionProvider"]) == "onnxruntime"
    with pytest.raises(ModelError, match=r"pip install 'semroute-stream\[openvino\]'"):
        Encoder(EncoderConfig(cache_dir=model_cache, backend="openvino"))


def test_unknown_execution_provider_is_refused(model_cache: Path) -> None:
    with pytest.raises(ModelError, match=r"CUDAExecutionProvider.*not offered"):
        Encoder(EncoderConfig(cache_dir=model_cache, execution_providers=["CUDAExecutionProvider"]))


def test_bf16_on_onnxruntime_is_refused(model_cache: Path) -> None:
    with pytest.raises(ModelError, match=r"bf16 needs encoder\.backend openvino"):
        Encoder(EncoderConfig(cache_dir=model_cache, backend="onnxruntime", precision="bf16"))


# ------------------------------------------------------------------------------------------------
# Every backend x precision: fidelity, batch invariance, thread safety
# ------------------------------------------------------------------------------------------------


def test_reported_backend_and_precision(encoder: Encoder) -> None:
    assert (encoder.backend, encoder.precision) in COMBOS
    assert encoder.backend in repr(encoder) and encoder.precision in repr(encoder)


def test_reference_fidelity(encoder: Encoder, fp32: Encoder) -> None:
    reference = json.loads(REFERENCE.read_text(encoding="utf-8"))
    sentences = reference["sentences"]
    got = encoder.encode(sentences)
    if encoder.precision == "fp32":  # sentence-transformers' own vectors
        expected = np.asarray(reference["embeddings"], dtype=np.float32)
        assert cosines(got, expected).min() >= 0.9999
    else:  # bf16: within the fidelity bound of fp32 on texts it was not probed with
        assert cosines(got, fp32.encode(sentences)).min() >= FIDELITY_MIN


def test_batch_invariance(encoder: Encoder) -> None:
    alone = np.vstack([encoder.encode([t]) for t in MIXED])
    mixed = encoder.encode(MIXED)
    assert cosines(alone, mixed).min() > 0.99999
    bigger = [*MIXED, *[f"filler query number {i} about invoices" for i in range(40)]]
    rows = encoder.encode(bigger[::-1])[::-1][: len(MIXED)]
    assert cosines(alone, rows).min() > 0.99999


def test_concurrent_encodes_agree(encoder: Encoder) -> None:
    texts = fidelity_probe_texts()
    expected = encoder.encode(texts)
    results: list[np.ndarray] = []
    errors: list[BaseException] = []

    def work(shift: int) -> None:
        try:
            results.append(np.roll(encoder.encode(np.roll(texts, shift).tolist()), -shift, axis=0))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 4
    for got in results:
        assert cosines(got, expected).min() > 0.99999


# ------------------------------------------------------------------------------------------------
# precision: auto
# ------------------------------------------------------------------------------------------------


def test_auto_precision_follows_the_cpu(model_cache: Path) -> None:
    enc = Encoder(EncoderConfig(cache_dir=model_cache))
    assert enc.backend == ("openvino" if BF16_HERE else "onnxruntime")
    if BF16_HERE:
        assert enc.precision == "bf16"
        assert enc.fidelity is not None and enc.fidelity >= FIDELITY_MIN
    else:
        assert enc.precision == "fp32" and enc.fidelity is None


def test_auto_precision_stays_fp32_without_native_bf16(
    monkeypatch: pytest.MonkeyPatch, model_cache: Path, tmp_path: Path
) -> None:
    avx2 = features_from(CPUINFO_AVX2, tmp_path)
    monkeypatch.setattr(_backends, "cpu_features", lambda: avx2)
    monkeypatch.setattr(_encoder, "cpu_features", lambda: avx2)
    monkeypatch.setattr(
        _encoder, "supported_precisions", lambda b: _backends.supported_precisions(b, avx2)
    )
    enc = Encoder(EncoderConfig(cache_dir=model_cache, backend="openvino"))
    assert (enc.precision, enc.fidelity) == ("fp32", None)
    with pytest.raises(ModelError, match="native bf16 units"):
        Encoder(EncoderConfig(cache_dir=model_cache, backend="openvino", precision="bf16"))


@pytest.mark.skipif(not BF16_HERE, reason="needs a CPU with native bf16 (AMX or AVX512-BF16)")
def test_auto_precision_falls_back_when_the_probe_fails(
    monkeypatch: pytest.MonkeyPatch, model_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_encoder, "FIDELITY_MIN", 1.000001)  # no bf16 model can pass this
    with caplog.at_level(logging.WARNING, logger="semroute_stream.encoder"):
        enc = Encoder(EncoderConfig(cache_dir=model_cache, backend="openvino"))
    assert enc.precision == "fp32"
    assert enc.fidelity is not None and enc.fidelity < 1.000001
    assert "staying on fp32" in caplog.text
    forced = Encoder(EncoderConfig(cache_dir=model_cache, backend="openvino", precision="bf16"))
    assert forced.precision == "bf16"  # asked for explicitly: kept, with its fidelity reported


def test_probe_verdict_is_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    opened: list[str] = []
    real_open = _backends.open_backend

    def counting_open(path: Path, name: str, precision: str, **kw: object) -> _backends.Backend:
        opened.append(precision)
        return real_open(path, name, precision, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(_encoder, "open_backend", counting_open)
    first = Encoder(EncoderConfig(cache_dir=tmp_path, backend="openvino"))
    probes = list((tmp_path / "probes").glob("*"))
    if not BF16_HERE:  # nothing to probe: fp32 only, no verdict written
        assert (opened, probes, first.precision) == (["fp32"], [], "fp32")
        return
    assert opened == ["fp32", "bf16"] and len(probes) == 1
    opened.clear()
    second = Encoder(EncoderConfig(cache_dir=tmp_path, backend="openvino"))
    assert opened == ["bf16"]  # the verdict was read: no fp32 compile, no probe
    assert (second.precision, second.fidelity) == ("bf16", first.fidelity)
    text = ["how do I get a refund"]
    assert cosines(first.encode(text), second.encode(text)).min() > 0.99999
    probes[0].write_text("{not json", encoding="utf-8")  # a damaged verdict: probe again
    opened.clear()
    third = Encoder(EncoderConfig(cache_dir=tmp_path, backend="openvino"))
    assert opened == ["fp32", "bf16"] and third.fidelity == first.fidelity


NO_PHONE_HOME = """
import json, os, sys
forks = []
os.register_at_fork(before=lambda: forks.append(1))
from semroute_stream._encoder import Encoder, EncoderConfig
encoder = Encoder(EncoderConfig(backend="openvino", precision="fp32", cache_dir=sys.argv[1]))
vectors = encoder.encode(["where is my parcel", "refund my card payment"])
print(json.dumps({
    "shape": list(vectors.shape),
    "forks": len(forks),
    "telemetry": sys.modules.get("openvino_telemetry") is not None,
    "home": sorted(os.listdir(os.environ["HOME"])),
}))
"""


def test_openvino_is_loaded_without_its_telemetry(model_cache: Path, tmp_path: Path) -> None:
    """Importing openvino starts its telemetry (files under ~/intel, usage events sent from a
    forked process) unless the user opted out: the router loads it with the telemetry off."""
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home)}
    env.pop("CI", None)  # the telemetry stays off in CI by itself: test the ordinary case
    out = subprocess.run(
        [sys.executable, "-c", NO_PHONE_HOME, str(model_cache)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["shape"] == [2, 384]
    assert seen == {"shape": [2, 384], "forks": 0, "telemetry": False, "home": []}
