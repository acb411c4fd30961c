"""Test doubles: a tiny deterministic encoder with the real Encoder's interface."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import numpy as np

_WORD = re.compile(r"[a-z0-9']+")


class FakeEncoder:
    """Bag-of-words hashing: each word adds 1 to a hashed dimension; rows are L2-normalised.

    Texts sharing words have positive cosine similarity; texts with no common words (modulo
    hash collisions) have zero. Deterministic across runs (md5, not ``hash``).
    """

    def __init__(self, dim: int = 1024, model_name: str = "fake-bow") -> None:
        self.dim = dim
        self.model_name = model_name
        self.calls: list[int] = []

    def _slot(self, word: str) -> int:
        return int.from_bytes(hashlib.md5(word.encode()).digest()[:4], "little") % self.dim

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(len(texts))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in _WORD.findall(text.lower()):
                out[i, self._slot(word)] += 1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        normalised: np.ndarray = out / np.maximum(norms, 1e-12)
        return normalised


def unit(*values: float) -> np.ndarray:
    """A float32 unit vector."""
    v = np.asarray(values, dtype=np.float32)
    return v / np.linalg.norm(v)
