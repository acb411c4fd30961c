"""The training loop of ``semroute-stream tune``: supervised contrastive fine-tuning of the
whole encoder with JAX + optax (the ``[tune]`` extra).

Each batch holds P routes x K texts; the loss is the supervised contrastive loss (Khosla et
al. 2020) over the in-batch cosines scaled by ``1 / temperature``: for every text, the other
texts of its route are positives and all the rest negatives (with K = 2 it is the symmetric
MultipleNegativesRanking loss of sentence-transformers). AdamW with linear warm-up and decay,
gradients clipped to norm 1. Deterministic: the batches come from a seeded numpy generator and
XLA on CPU computes the same bytes for the same inputs and shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..._encoder.onnx_build import BertArch
from .bert_jax import Params, import_jax, pooled
from .tune_data import Tokens, contrastive_batches

__all__ = ["TrainSettings", "embed", "train"]

#: Rows per batch when embedding (evaluation): a fixed count so shapes stay bounded.
EMBED_ROWS = 64


@dataclass(frozen=True)
class TrainSettings:
    """The hyperparameters (recorded in the model card)."""

    epochs: float = 3.0
    routes_per_batch: int = 32
    per_route: int = 2
    learning_rate: float = 3e-5
    warmup: float = 0.1
    weight_decay: float = 0.01
    temperature: float = 0.05
    seed: int = 0

    def steps(self, n_rows: int) -> int:
        """Optimizer steps: ``epochs`` passes over ``n_rows`` texts, at least one."""
        rows = self.routes_per_batch * self.per_route
        return max(1, round(self.epochs * n_rows / rows))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _supcon(jnp: Any, emb: Any, labels: Any, temperature: float) -> Any:
    sims = (emb @ emb.T) / temperature
    n = emb.shape[0]
    eye = jnp.eye(n, dtype=bool)
    sims = jnp.where(eye, -1e9, sims)
    log_prob = sims - jax_logsumexp(jnp, sims)
    positive = (labels[:, None] == labels[None, :]) & ~eye
    count = positive.sum(axis=1)
    per_anchor = -(jnp.where(positive, log_prob, 0.0).sum(axis=1)) / jnp.maximum(count, 1)
    has = count > 0
    return jnp.where(has, per_anchor, 0.0).sum() / jnp.maximum(has.sum(), 1)


def jax_logsumexp(jnp: Any, x: Any) -> Any:
    top = jnp.max(x, axis=1, keepdims=True)
    return top + jnp.log(jnp.sum(jnp.exp(x - top), axis=1, keepdims=True))


_STEPS: dict[tuple[BertArch, float, float], tuple[Any, Any]] = {}


def _step_fn(arch: BertArch, temperature: float, weight_decay: float) -> tuple[Any, Any]:
    """``(optimizer, jitted step)``: AdamW as optax composes it, with the learning rate an
    argument of the step (so one compile serves every schedule; cached per shape)."""
    key = (arch, temperature, weight_decay)
    if key in _STEPS:
        return _STEPS[key]
    jax, jnp = import_jax()
    import optax

    optimizer = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.scale_by_adam(),
        optax.add_decayed_weights(weight_decay),
    )

    def loss_fn(p: Params, ids: Any, mask: Any, y: Any) -> Any:
        return _supcon(jnp, pooled(p, ids, mask, arch), y, temperature)

    def step(p: Params, s: Any, lr: Any, ids: Any, mask: Any, y: Any) -> tuple[Params, Any, Any]:
        loss, grads = jax.value_and_grad(loss_fn)(p, ids, mask, y)
        updates, s = optimizer.update(grads, s, p)
        updates = jax.tree_util.tree_map(lambda u: -lr * u, updates)
        return optax.apply_updates(p, updates), s, loss

    _STEPS[key] = (optimizer, jax.jit(step))
    return _STEPS[key]


def learning_rates(settings: TrainSettings, steps: int) -> np.ndarray:
    """The rate of every step: linear warm-up to ``learning_rate``, then linear decay to 0."""
    warm = max(1, int(settings.warmup * steps))
    t = np.arange(steps, dtype=np.float64)
    up = (t + 1) / warm
    down = (steps - t) / max(1, steps - warm + 1)
    return (settings.learning_rate * np.where(t < warm, up, down)).astype(np.float32)


def train(
    params: Params,
    arch: BertArch,
    texts: Sequence[str],
    labels: np.ndarray,
    tokens: Tokens,
    settings: TrainSettings,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[Params, list[float]]:
    """Fine-tune ``params`` on ``texts`` (route index per text); returns the new parameters
    (jax arrays) and the loss of every step."""
    _, jnp = import_jax()
    optimizer, step = _step_fn(arch, settings.temperature, settings.weight_decay)
    steps = settings.steps(len(texts))
    rates = learning_rates(settings, steps)
    current = {k: jnp.asarray(v) for k, v in params.items()}
    state = optimizer.init(current)
    losses: list[float] = []
    batches = contrastive_batches(
        tokens.ids(texts),
        labels,
        tokens,
        routes_per_batch=settings.routes_per_batch,
        per_route=settings.per_route,
        steps=steps,
        seed=settings.seed,
    )
    for i, batch in enumerate(batches):
        current, state, loss = step(current, state, rates[i], batch.ids, batch.mask, batch.labels)
        losses.append(float(loss))
        if on_step is not None:
            on_step(i, losses[-1])
    return current, losses


def embed(params: Params, arch: BertArch, texts: Sequence[str], tokens: Tokens) -> np.ndarray:
    """Unit embeddings of ``texts`` (float32 ``[n, hidden]``), sorted into length buckets in
    fixed batches of :data:`EMBED_ROWS` rows."""
    from .bert_jax import encode

    ids = tokens.ids(texts)
    order = np.argsort([len(r) for r in ids], kind="stable")
    out = np.zeros((len(texts), arch.hidden), dtype=np.float32)
    for start in range(0, len(order), EMBED_ROWS):
        rows = order[start : start + EMBED_ROWS]
        padded_ids, mask = tokens.pad([ids[r] for r in rows], EMBED_ROWS)
        out[rows] = encode(params, arch, padded_ids, mask)[: len(rows)]
    return out
