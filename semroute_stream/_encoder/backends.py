"""Inference backends for the encoder: ONNX Runtime or OpenVINO, in fp32 or bf16.

A backend runs one ONNX graph on a padded batch and knows nothing of tokens or pooling:
:class:`Backend` is that seam (``inputs``, ``outputs``, ``run``). Two implementations:

- :class:`OrtBackend`: ONNX Runtime, fp32, with the execution providers the config names
  (``CPUExecutionProvider`` by default; CUDA, ROCm, ... where the installed ONNX Runtime offers
  them). Always installed.
- :class:`OpenVinoBackend`: OpenVINO's CPU plugin reading the same ``model.onnx``, fp32 or bf16
  (``INFERENCE_PRECISION_HINT``). An optional extra: ``pip install 'semroute-stream[openvino]'``.

Why OpenVINO: on CPUs with native bf16 matrix units (Intel AMX, AVX512-BF16 on Intel Cooper
Lake+ and AMD Zen 4+) its bf16 runs 1.4-1.8x ONNX Runtime fp32 (Zen 5, AVX512-BF16) to 3x (Xeon
with AMX) at a minimum cosine vs fp32 of about 0.99993; its fp32 is only 1.05-1.08x, and slower
than ONNX Runtime when the cores are oversubscribed, so ``auto`` takes it only for bf16
(``benchmarks/encoder.py`` measures it on the machine at hand).

:func:`cpu_features` reads the CPU's flags (``/proc/cpuinfo``) so that defaults follow the
hardware, never an assumption: ``bf16_native`` is what ``precision: auto`` asks for.
"""

from __future__ import annotations

import functools
import importlib.util
import platform
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from .._errors import ModelError

__all__ = [
    "BACKENDS",
    "Backend",
    "CpuFeatures",
    "OpenVinoBackend",
    "OrtBackend",
    "OutputInfo",
    "available_backends",
    "cpu_features",
    "open_backend",
    "pick_backend",
    "supported_precisions",
]

BACKENDS = ("onnxruntime", "openvino")
OPENVINO_HINT = "pip install 'semroute-stream[openvino]'"
#: The CPU flags reported by :meth:`CpuFeatures.as_dict` (x86 names as /proc/cpuinfo spells them).
_FLAGS_OF_INTEREST = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "asimd",
    "bf16",
    "sve",
)


@dataclass(frozen=True)
class CpuFeatures:
    """What the CPU offers for dense maths (read once from ``/proc/cpuinfo``)."""

    model: str
    machine: str
    flags: frozenset[str]

    @property
    def vector(self) -> str:
        """The widest vector extension: avx512, avx2, avx, neon, sse or ``?``."""
        for name, flag in (("avx512", "avx512f"), ("avx2", "avx2"), ("avx", "avx")):
            if flag in self.flags:
                return name
        if "asimd" in self.flags or self.machine in ("aarch64", "arm64"):
            return "neon"
        return "sse" if "sse2" in self.flags else "?"

    @property
    def bf16_native(self) -> bool:
        """Native bf16 matrix arithmetic: Intel AMX, AVX512-BF16, or Arm's BF16 extension."""
        return bool(self.flags & {"amx_bf16", "avx512_bf16", "bf16"})

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "machine": self.machine,
            "vector": self.vector,
            "bf16_native": self.bf16_native,
            "flags": sorted(f for f in _FLAGS_OF_INTEREST if f in self.flags),
        }


@functools.cache
def cpu_features(cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuFeatures:
    """The CPU's model name and flags (empty flags where ``/proc/cpuinfo`` is unreadable)."""
    model, flags = platform.processor() or "?", set[str]()
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and model in ("?", "", platform.machine()):
            model = value.strip()
        elif key in ("flags", "features") and not flags:  # one core's flags stand for all
            flags = set(value.split())
    return CpuFeatures(model=model, machine=platform.machine(), flags=frozenset(flags))


def available_backends() -> list[str]:
    """The backends installed here, in :data:`BACKENDS` order."""
    return [name for name in BACKENDS if importlib.util.find_spec(name) is not None]


def pick_backend(requested: str, providers: list[str], features: CpuFeatures | None = None) -> str:
    """The backend for ``requested``. ``auto``: OpenVINO when it is installed, only the CPU is
    asked for and the CPU has native bf16 units; else ONNX Runtime. (OpenVINO fp32 is 1.05-1.08x
    ONNX Runtime on an idle Zen 5 but 0.68x with the cores oversubscribed; its bf16 is 1.4-1.8x
    idle and 0.8-1.0x oversubscribed.) Raises :class:`ModelError` when it is not installed."""
    installed = available_backends()
    if requested == "auto":
        features = features if features is not None else cpu_features()
        cpu_only = providers == ["CPUExecutionProvider"]
        wins = cpu_only and features.bf16_native and "openvino" in installed
        return "openvino" if wins else "onnxruntime"
    if requested not in installed:
        hint = OPENVINO_HINT if requested == "openvino" else "pip install onnxruntime"
        raise ModelError(f"encoder.backend {requested!r} is not installed: {hint}")
    return requested


def supported_precisions(backend: str, features: CpuFeatures | None = None) -> list[str]:
    """The precisions ``backend`` runs natively on this CPU: fp32 always; bf16 with OpenVINO on
    a CPU with native bf16 units (elsewhere it would be emulated, slower than fp32)."""
    features = features if features is not None else cpu_features()
    if backend == "openvino" and features.bf16_native:
        return ["fp32", "bf16"]
    return ["fp32"]


@dataclass(frozen=True)
class OutputInfo:
    """One model output: its rank and last dimension, where the graph declares them."""

    name: str
    rank: int | None
    dim: int | None


class Backend(Protocol):
    """Runs the model on one padded batch; thread-safe."""

    name: str
    precision: str
    #: The model's inputs and the integer dtype each wants, in graph order.
    inputs: dict[str, type[np.signedinteger[Any]]]
    #: The model's outputs, in graph order.
    outputs: list[OutputInfo]

    def run(self, output: str, feed: dict[str, npt.NDArray[Any]]) -> npt.NDArray[np.float32]: ...


_INT_TYPES: dict[str, type[np.signedinteger[Any]]] = {
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "i64": np.int64,
    "i32": np.int32,
}


def _int_type(path: Path, name: str, declared: str) -> type[np.signedinteger[Any]]:
    if declared not in _INT_TYPES:
        raise ModelError(f"{path}: input {name!r} has type {declared}, not int64/int32")
    return _INT_TYPES[declared]


class OrtBackend:
    """ONNX Runtime (fp32) with the configured execution providers."""

    name = "onnxruntime"
    precision = "fp32"

    def __init__(
        self,
        path: Path,
        *,
        threads: int,
        inter_op_threads: int = 1,
        spinning: bool = False,
        providers: list[str] | None = None,
    ) -> None:
        import onnxruntime as ort

        providers = providers or ["CPUExecutionProvider"]
        offered = ort.get_available_providers()
        missing = [p for p in providers if p not in offered]
        if missing:
            raise ModelError(
                f"encoder.execution_providers {missing} not offered by this onnxruntime "
                f"(it offers {offered}); install the matching build, e.g. onnxruntime-gpu"
            )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = inter_op_threads
        spin = "1" if spinning else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        options.add_session_config_entry("session.inter_op.allow_spinning", spin)
        options.log_severity_level = 3
        self.path = path
        try:
            self._session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:
            raise ModelError(f"cannot load ONNX model {path}: {exc}") from exc
        self.inputs = {a.name: _int_type(path, a.name, a.type) for a in self._session.get_inputs()}
        self.outputs = [
            OutputInfo(o.name, *_rank_dim(o.shape if isinstance(o.shape, list) else None))
            for o in self._session.get_outputs()
        ]

    def run(self, output: str, feed: dict[str, npt.NDArray[Any]]) -> npt.NDArray[np.float32]:
        (raw,) = self._session.run([output], feed)  # InferenceSession.run is thread-safe
        return np.asarray(raw, dtype=np.float32)


def import_openvino() -> Any:
    """``import openvino``, without its telemetry.

    Importing openvino starts its model converter's telemetry (``openvino_telemetry``): unless
    the user opted out, it writes ``~/intel/`` and sends usage events from a process forked off
    the importing one. A router has no business phoning home, and a fork of a process that
    already runs inference and event-loop threads is the kind that deadlocks or crashes. With
    the telemetry package marked missing, openvino uses the no-op stub it ships for that case.
    An application that imported ``openvino_telemetry`` itself keeps it.
    """
    sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]
    import openvino

    return openvino


class OpenVinoBackend:
    """OpenVINO's CPU plugin on the same ONNX file, fp32 or bf16; one infer request per thread."""

    name = "openvino"

    def __init__(self, path: Path, *, threads: int, precision: str) -> None:
        try:
            ov = import_openvino()
        except ImportError as exc:
            raise ModelError(f"encoder.backend openvino is not installed: {OPENVINO_HINT}") from exc
        self.path = path
        self.precision = precision
        core = ov.Core()  # no CACHE_DIR: 87 MB of blobs saved no measurable start-up time
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
            "PERFORMANCE_HINT": "LATENCY",
            # Unpinned: the service's event loop shares the cores. With another busy thread on
            # one of 2 cores, pinned bf16 ran 212-654 texts/s, unpinned 262-826 (same runs).
            "ENABLE_CPU_PINNING": False,
        }
        if threads > 0:
            config["INFERENCE_NUM_THREADS"] = threads
        try:  # the ONNX frontend alone: read_model would try every framework's parser
            frontend = ov.frontend.FrontEndManager().load_by_framework("onnx")
            model = frontend.convert(frontend.load(str(path)))
            self._compiled = core.compile_model(model, "CPU", config)
        except Exception as exc:
            raise ModelError(f"cannot load ONNX model {path} (OpenVINO): {exc}") from exc
        self.inputs = {
            port.get_any_name(): _int_type(path, port.get_any_name(), _ov_type(port))
            for port in self._compiled.inputs
        }
        self.outputs = [
            OutputInfo(port.get_any_name(), *_ov_rank_dim(port)) for port in self._compiled.outputs
        ]
        self._local = threading.local()

    def run(self, output: str, feed: dict[str, npt.NDArray[Any]]) -> npt.NDArray[np.float32]:
        request = getattr(self._local, "request", None)
        if request is None:  # an infer request is not thread-safe: one per calling thread
            request = self._local.request = self._compiled.create_infer_request()
        result = request.infer(feed)
        return np.array(result[self._compiled.output(output)], dtype=np.float32)


def _ov_type(port: Any) -> str:
    return str(port.get_element_type().get_type_name())


def _ov_rank_dim(port: Any) -> tuple[int | None, int | None]:
    shape = port.get_partial_shape()
    if shape.rank.is_dynamic:
        return None, None
    last = shape[shape.rank.get_length() - 1]
    return shape.rank.get_length(), (last.get_length() if last.is_static else None)


def _rank_dim(shape: list[Any] | None) -> tuple[int | None, int | None]:
    if shape is None:
        return None, None
    last = shape[-1] if shape else None
    return len(shape), (last if isinstance(last, int) else None)


def open_backend(
    path: Path,
    name: str,
    precision: str,
    *,
    threads: int,
    inter_op_threads: int = 1,
    spinning: bool = False,
    providers: list[str] | None = None,
) -> Backend:
    """Load ``path`` on backend ``name`` (``onnxruntime`` | ``openvino``) at ``precision``."""
    if name == "openvino":
        return OpenVinoBackend(path, threads=threads, precision=precision)
    if precision != "fp32":
        raise ModelError(f"encoder.precision {precision} needs encoder.backend openvino")
    return OrtBackend(
        path,
        threads=threads,
        inter_op_threads=inter_op_threads,
        spinning=spinning,
        providers=providers,
    )
