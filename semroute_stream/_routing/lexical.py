"""The route head's lexical view: TF-IDF of words and word pairs, pure numpy, no I/O.

Sentence embeddings blur the exact words that tell close routes apart ("reverted" vs
"failed", "pending" vs "declined", a product code). The head therefore adds, with a fixed
weight, the log-probabilities of a second logistic regression trained on the utterances'
words: lower-cased runs of two or more word characters, and each pair of adjacent words.

Features are those of the usual TF-IDF recipe: sublinear term frequency ``1 + ln(tf)``, smooth
inverse document frequency ``ln((1 + n) / (1 + df)) + 1`` over the training texts, rows
L2-normalised. The vocabulary is the training texts' terms, at most ``MAX_TERMS`` of them (the
most frequent; ties in alphabetical order), so training memory stays at most
``rows x MAX_TERMS`` floats. Terms a query has that no training text had are ignored.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np

__all__ = ["MAX_TERMS", "LexicalHead", "Vocabulary", "terms"]

MAX_TERMS = 2048
_WORD = re.compile(r"\w\w+")


def terms(text: str) -> list[str]:
    """A text's terms: its words (lower-cased, two characters or more) and adjacent pairs."""
    words = _WORD.findall(text.lower())
    return words + [f"{a} {b}" for a, b in pairwise(words)]


@dataclass(frozen=True, eq=False)
class Vocabulary:
    """Terms and their inverse document frequencies; ``transform`` gives TF-IDF rows."""

    terms: tuple[str, ...]
    idf: np.ndarray  # (V,) float32
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        idf = np.ascontiguousarray(self.idf, dtype=np.float32)
        if idf.shape != (len(self.terms),):
            raise ValueError(f"idf: expected shape ({len(self.terms)},), got {idf.shape}")
        idf.setflags(write=False)
        object.__setattr__(self, "idf", idf)
        object.__setattr__(self, "index", {t: i for i, t in enumerate(self.terms)})

    @classmethod
    def fit(cls, texts: Sequence[str], max_terms: int = MAX_TERMS) -> Vocabulary:
        df: Counter[str] = Counter()
        for text in texts:
            df.update(set(terms(text)))
        kept = sorted(df, key=lambda t: (-df[t], t))[:max_terms]
        kept.sort()
        n = len(texts)
        idf = np.array([np.log((1 + n) / (1 + df[t])) + 1.0 for t in kept], dtype=np.float32)
        return cls(tuple(kept), idf)

    def __len__(self) -> int:
        return len(self.terms)

    def transform(self, texts: Sequence[str]) -> np.ndarray:
        """``(len(texts), V)`` float32 TF-IDF rows (all zero for a text with no known term)."""
        out = np.zeros((len(texts), len(self.terms)), dtype=np.float32)
        for row, text in enumerate(texts):
            counts = Counter(i for t in terms(text) if (i := self.index.get(t)) is not None)
            if not counts:
                continue
            cols = np.fromiter(counts.keys(), dtype=np.intp, count=len(counts))
            tf = np.fromiter(counts.values(), dtype=np.float32, count=len(counts))
            values = (1.0 + np.log(tf)) * self.idf[cols]
            out[row, cols] = values / np.float32(np.linalg.norm(values))
        return out


@dataclass(frozen=True, eq=False)
class LexicalHead:
    """A logistic regression on TF-IDF rows; the head adds ``weight`` times the
    log-softmax of its ``logits``."""

    vocabulary: Vocabulary
    weights: np.ndarray  # (V, R) float32
    bias: np.ndarray  # (R,) float32
    weight: float

    def __post_init__(self) -> None:
        weights = np.ascontiguousarray(self.weights, dtype=np.float32)
        bias = np.ascontiguousarray(self.bias, dtype=np.float32)
        if weights.ndim != 2 or weights.shape[0] != len(self.vocabulary):
            raise ValueError(
                f"lexical head: expected weights of shape ({len(self.vocabulary)}, R), "
                f"got {weights.shape}"
            )
        if bias.shape != (weights.shape[1],):
            raise ValueError(f"lexical head: expected bias ({weights.shape[1]},), got {bias.shape}")
        if not (self.weight > 0 and np.isfinite(self.weight)):
            raise ValueError("lexical head: weight must be > 0")
        for array in (weights, bias):
            array.setflags(write=False)
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "bias", bias)

    @property
    def n_routes(self) -> int:
        return int(self.weights.shape[1])

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        """``(len(texts), R)`` float32 logits of the lexical regression."""
        out: np.ndarray = self.vocabulary.transform(texts) @ self.weights + self.bias
        return out
