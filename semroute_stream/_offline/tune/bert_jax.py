"""A BERT sentence encoder in JAX, for ``semroute-stream tune`` only (the ``[tune]`` extra).

It reads the same ``model.safetensors`` + ``config.json`` as the ONNX builder
(:mod:`semroute_stream._encoder.onnx_build`): the tensors keep their Hugging Face names
(``embeddings.word_embeddings.weight``, ``encoder.layer.0.attention.self.query.weight``, ...,
torch ``Linear`` weights as ``[out, in]``), any ``bert.``-style prefix dropped the same way, and
the shape comes from :meth:`BertArch.from_config`. The forward is the builder's graph op for op
(token type 0, absolute positions, exact erf GELU, additive -10000 mask), then mean pooling
and L2 normalisation like the encoder; ``tests/test_tune.py`` checks it against the ONNX model.

Nothing here is imported at run time: the encoder and the service only load the ONNX graph.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..._encoder.onnx_build import MASK_NEG, BertArch, strip_prefix
from ..._errors import ConfigError, ModelError

__all__ = ["INSTALL_HINT", "Params", "encode", "import_jax", "load_params", "pooled", "to_numpy"]

INSTALL_HINT = "pip install 'semroute-stream[tune]'"

#: A flat mapping of Hugging Face tensor names to arrays (numpy on disk, jax in training).
Params = dict[str, Any]


def import_jax() -> tuple[Any, Any]:
    """``(jax, jax.numpy)``, with x64 off and the CPU platform; a clear error without them."""
    try:
        import jax
        import jax.numpy as jnp
        import optax  # noqa: F401  (checked here so that the error names the extra once)
    except ImportError as exc:
        raise ConfigError(
            f"semroute-stream tune needs JAX and optax ({exc.name or exc} is missing): "
            f"run `{INSTALL_HINT}`"
        ) from None
    return jax, jnp


def load_params(model_dir: Path) -> tuple[Params, BertArch]:
    """The weights (float32 numpy) and shape of the BERT checkpoint in ``model_dir``."""
    from safetensors.numpy import load_file

    config_path = model_dir / "config.json"
    weights_path = model_dir / "model.safetensors"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        raw = load_file(str(weights_path))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the base model in {model_dir}: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelError(f"{config_path}: expected a JSON object")
    arch = BertArch.from_config(config, str(config_path))
    weights = strip_prefix(raw)
    params = {k: np.asarray(v, dtype=np.float32) for k, v in weights.items() if _used(k, arch)}
    if "embeddings.word_embeddings.weight" not in params:
        raise ModelError(f"{weights_path}: not a BERT checkpoint (no word embeddings)")
    return params, arch


def _used(name: str, arch: BertArch) -> bool:
    """The tensors the forward reads (not the pooler, not position_ids buffers)."""
    if name.startswith("embeddings."):
        return not name.endswith("position_ids")
    return any(name.startswith(f"encoder.layer.{i}.") for i in range(arch.layers))


def to_numpy(params: Params) -> dict[str, np.ndarray]:
    """Float32 numpy copies of ``params``, in sorted key order (for safetensors)."""
    return {k: np.asarray(params[k], dtype=np.float32) for k in sorted(params)}


def _layer_norm(jnp: Any, x: Any, params: Params, prefix: str, eps: float) -> Any:
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    normed = (x - mean) / jnp.sqrt(var + eps)
    return normed * params[f"{prefix}.weight"] + params[f"{prefix}.bias"]


def _linear(x: Any, params: Params, prefix: str) -> Any:
    return x @ params[f"{prefix}.weight"].T + params[f"{prefix}.bias"]


def _layer(jax: Any, jnp: Any, h: Any, mask: Any, params: Params, i: int, arch: BertArch) -> Any:
    p = f"encoder.layer.{i}"
    b, s, _ = h.shape

    def heads(x: Any) -> Any:
        return x.reshape(b, s, arch.heads, arch.head_dim).transpose(0, 2, 1, 3)

    q = heads(_linear(h, params, f"{p}.attention.self.query"))
    k = heads(_linear(h, params, f"{p}.attention.self.key"))
    v = heads(_linear(h, params, f"{p}.attention.self.value"))
    scores = (q @ k.transpose(0, 1, 3, 2)) / np.sqrt(np.float32(arch.head_dim)) + mask
    ctx = jax.nn.softmax(scores, axis=-1) @ v
    ctx = ctx.transpose(0, 2, 1, 3).reshape(b, s, arch.hidden)
    attn = _linear(ctx, params, f"{p}.attention.output.dense") + h
    h = _layer_norm(jnp, attn, params, f"{p}.attention.output.LayerNorm", arch.layer_norm_eps)
    inter = jax.nn.gelu(_linear(h, params, f"{p}.intermediate.dense"), approximate=False)
    out = _linear(inter, params, f"{p}.output.dense") + h
    return _layer_norm(jnp, out, params, f"{p}.output.LayerNorm", arch.layer_norm_eps)


def pooled(params: Params, ids: Any, mask: Any, arch: BertArch) -> Any:
    """Mean-pooled, L2-normalised sentence embeddings ``[batch, hidden]`` (traceable)."""
    jax, jnp = import_jax()
    seq = ids.shape[1]
    x = params["embeddings.word_embeddings.weight"][ids]
    x = x + params["embeddings.token_type_embeddings.weight"][0]
    x = x + params["embeddings.position_embeddings.weight"][:seq]
    h = _layer_norm(jnp, x, params, "embeddings.LayerNorm", arch.layer_norm_eps)
    m = mask.astype(jnp.float32)
    additive = ((1.0 - m) * MASK_NEG)[:, None, None, :]
    for i in range(arch.layers):
        h = _layer(jax, jnp, h, additive, params, i, arch)
    summed = jnp.einsum("bs,bsh->bh", m, h)
    mean = summed / jnp.maximum(m.sum(axis=1, keepdims=True), 1e-9)
    return mean / jnp.maximum(jnp.linalg.norm(mean, axis=1, keepdims=True), 1e-12)


def encode(params: Params, arch: BertArch, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """:func:`pooled` on one padded batch, jitted (one compile per shape), as numpy float32."""
    jax, _ = import_jax()
    fn = _jitted(jax, arch)
    return np.asarray(fn(params, ids, mask), dtype=np.float32)


_JIT_CACHE: dict[BertArch, Any] = {}


def _jitted(jax: Any, arch: BertArch) -> Any:
    if arch not in _JIT_CACHE:
        _JIT_CACHE[arch] = jax.jit(lambda p, i, m: pooled(p, i, m, arch))
    return _JIT_CACHE[arch]
