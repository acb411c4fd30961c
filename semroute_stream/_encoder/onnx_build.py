"""The deterministic ONNX graph builder for BERT encoders (no torch): `BertArch`, `build_bert_onnx`.

:func:`build_bert_onnx` writes a BERT encoder (the shape, :class:`BertArch`, read from the
checkpoint's ``config.json``) as plain ONNX ops (opset 17, no contrib ops) with numpy + the
``onnx`` package; the build is deterministic: the same weights give the same bytes. The default
model (:mod:`.default_model`) is built with it from the weights package, and :mod:`.hub` uses it
for Hub repos that ship ``model.safetensors`` but no ``onnx/model.onnx``.

Graph optimisation (checked with onnxruntime 1.32, ``ORT_ENABLE_ALL``): the erf GELU + bias
becomes ``BiasGelu`` and the scaled Q·Kᵀ a ``FusedMatMul`` in every layer; LayerNormalization is a
native op at opset 17. ORT's attention fusion does not fire at this opset, and neither does its
SkipLayerNorm fusion (the broadcast position-embedding add hides the sequence dimension); a
variant where SkipLayerNorm fused, and a hand-written graph of contrib ops (Attention,
SkipLayerNormalization, EmbedLayerNormalization, BiasGelu), measured no faster on a 2-core AVX2
CPU, so the plain graph is kept.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .._errors import ModelError
from .._files import atomic_write_bytes

__all__ = [
    "BUILDABLE_MODEL_TYPES",
    "BUILD_VERSION",
    "MASK_NEG",
    "MINILM_L6",
    "OPSET",
    "BertArch",
    "build_bert_onnx",
    "strip_prefix",
]

#: Bump whenever the graph layout changes: it names the cache subdirectories.
BUILD_VERSION = 1
OPSET = 17

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

    model = _make_model(strip_prefix(weights), arch, name)
    data: bytes = model.SerializeToString(deterministic=True)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_path, data, durable=True, mode=0o644)
    return out_path


def strip_prefix(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop the tensor-name prefix (``bert.``, ``model.``...) in front of ``embeddings.``."""
    anchor = "embeddings.word_embeddings.weight"
    if anchor in weights:
        return weights
    prefix = next((k[: -len(anchor)] for k in sorted(weights) if k.endswith("." + anchor)), None)
    if prefix is None:
        return weights  # _weights() names the missing tensor
    return {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
