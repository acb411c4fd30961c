"""A trained route head and its calibrated decision settings (``HeadParams``): pure numpy.

The decision (``decision``) applies them; ``router`` builds them from a trained head and the
routes file's ``head`` section.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .lexical import LexicalHead

__all__ = ["HeadParams", "frozen_array"]


def frozen_array(array: np.ndarray) -> np.ndarray:
    """``array``, made read-only (in place)."""
    array.setflags(write=False)
    return array


@dataclass(frozen=True, eq=False)
class HeadParams:
    """A trained route head and its calibrated decision settings."""

    weights: np.ndarray  # (D, R) float32
    bias: np.ndarray  # (R,) float32
    blend: float = 0.0  # weight of the nearest-utterance cosine added to log-probabilities
    temperature: float = 1.0  # probabilities = softmax(scores / temperature)
    min_confidence: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # (R,)
    min_margin: float | None = None
    lexical: LexicalHead | None = None  # the lexical view (decisions then need the texts)
    min_energy: float | None = None  # floor on logsumexp of the calibrated scores (None: none)

    def __post_init__(self) -> None:
        weights = np.ascontiguousarray(self.weights, dtype=np.float32)
        bias = np.ascontiguousarray(self.bias, dtype=np.float32)
        n_routes = weights.shape[1] if weights.ndim == 2 else -1
        confidence = np.asarray(self.min_confidence, dtype=np.float32)
        if confidence.shape == (0,):
            confidence = np.zeros(max(n_routes, 0), dtype=np.float32)
        if weights.ndim != 2 or bias.shape != (n_routes,) or confidence.shape != (n_routes,):
            raise ValueError(
                f"head: weights (D, R), bias (R,) and min_confidence (R,) expected, got "
                f"{weights.shape}, {bias.shape}, {confidence.shape}"
            )
        if not (self.temperature > 0 and np.isfinite(self.temperature)):
            raise ValueError("head: temperature must be > 0")
        if not (self.blend >= 0 and np.isfinite(self.blend)):
            raise ValueError("head: blend must be >= 0")
        if self.min_energy is not None and not np.isfinite(self.min_energy):
            raise ValueError("head: min_energy must be finite (or None: no energy floor)")
        if self.lexical is not None and self.lexical.n_routes != n_routes:
            raise ValueError(
                f"head: the lexical view has {self.lexical.n_routes} routes, not {n_routes}"
            )
        object.__setattr__(self, "weights", frozen_array(weights))
        object.__setattr__(self, "bias", frozen_array(bias))
        object.__setattr__(self, "min_confidence", frozen_array(np.ascontiguousarray(confidence)))
