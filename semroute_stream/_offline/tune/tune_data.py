"""The data side of ``semroute-stream tune``: the held-out split, tokens in fixed-length
buckets, and the contrastive batches.

* :func:`hold_out`: a seeded, stratified split; each label keeps at least one training row.
* :class:`Tokens`: the base model's ``tokenizer.json``, truncating at :data:`MAX_TOKENS`, padded
  to the smallest of :data:`BUCKETS` that fits, so that JIT compiles a bounded set of shapes.
* :func:`contrastive_batches`: P routes x K texts per batch (supervised contrastive: the other
  texts of the same route are the positives, every other text a negative), a fixed row count.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..._errors import ModelError

__all__ = [
    "BUCKETS",
    "MAX_TOKENS",
    "Batch",
    "Tokens",
    "bucket",
    "contrastive_batches",
    "hold_out",
]

#: Padded lengths: every batch is padded to the smallest that fits its longest text.
BUCKETS = (16, 32, 64, 128)
#: Texts are truncated here in training (route utterances and queries are short).
MAX_TOKENS = BUCKETS[-1]


def bucket(length: int) -> int:
    """The smallest bucket that holds ``length`` tokens."""
    return next((b for b in BUCKETS if b >= length), BUCKETS[-1])


def hold_out(labels: Sequence[int], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train, held)`` row indices: ``round(fraction * n)`` rows of each label held out,
    never all of them (a label with one row keeps it). Both sorted."""
    rng = np.random.default_rng(seed)
    by_label: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(int(label), []).append(i)
    train: list[int] = []
    held: list[int] = []
    for label in sorted(by_label):
        rows = np.array(by_label[label])
        rng.shuffle(rows)
        k = min(round(fraction * len(rows)), len(rows) - 1)
        held.extend(rows[:k].tolist())
        train.extend(rows[k:].tolist())
    return np.array(sorted(train), dtype=np.intp), np.array(sorted(held), dtype=np.intp)


@dataclass(frozen=True)
class Batch:
    """One padded batch: ``ids``/``mask`` int32 ``[rows, bucket]``, ``labels`` ``[rows]``."""

    ids: np.ndarray
    mask: np.ndarray
    labels: np.ndarray


class Tokens:
    """Token ids of texts, with the base model's tokenizer."""

    def __init__(self, tokenizer_path: Path) -> None:
        from tokenizers import Tokenizer

        try:
            tokenizer: Any = Tokenizer.from_file(str(tokenizer_path))
        except Exception as exc:  # tokenizers raises its own exception type
            raise ModelError(f"cannot load tokenizer {tokenizer_path}: {exc}") from exc
        padding = tokenizer.padding
        pad = padding.get("pad_id") if padding else None
        self.pad_id = int(pad if pad is not None else (tokenizer.token_to_id("[PAD]") or 0))
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=MAX_TOKENS)
        self._tokenizer = tokenizer

    def ids(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(e.ids) for e in self._tokenizer.encode_batch(list(texts))]

    def pad(self, rows: Sequence[Sequence[int]], n_rows: int) -> tuple[np.ndarray, np.ndarray]:
        """``rows`` padded to their bucket and to ``n_rows`` rows (empty rows are all-masked)."""
        length = bucket(max((len(r) for r in rows), default=1))
        ids = np.full((n_rows, length), self.pad_id, dtype=np.int32)
        mask = np.zeros((n_rows, length), dtype=np.int32)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return ids, mask


def contrastive_batches(
    token_ids: Sequence[Sequence[int]],
    labels: np.ndarray,
    tokens: Tokens,
    *,
    routes_per_batch: int,
    per_route: int,
    steps: int,
    seed: int,
) -> Iterator[Batch]:
    """``steps`` batches of ``routes_per_batch`` labels x ``per_route`` rows each (seeded).

    Labels with fewer than two rows give no positives and are only drawn as negatives when no
    other label is left; rows are drawn without replacement within a label until it runs out.
    Texts of one batch are sorted by length first, so the bucket is as short as it can be."""
    rng = np.random.default_rng(seed)
    by_label = {int(k): np.flatnonzero(labels == k) for k in np.unique(labels)}
    usable = [k for k, rows in by_label.items() if len(rows) >= 2] or list(by_label)
    p = min(routes_per_batch, len(usable))
    queues: dict[int, list[int]] = {k: [] for k in by_label}
    for _ in range(steps):
        chosen = rng.choice(np.array(usable), size=p, replace=False)
        rows: list[int] = []
        for k in chosen.tolist():
            for _ in range(per_route):
                if not queues[k]:
                    queues[k] = rng.permutation(by_label[k]).tolist()
                rows.append(queues[k].pop())
        ids, mask = tokens.pad([token_ids[r] for r in rows], len(rows))
        yield Batch(ids, mask, labels[np.array(rows)].astype(np.int32))
