"""Test doubles: a tiny deterministic encoder with the real Encoder's interface, and an
in-memory outbox for pipeline tests that need no broker."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from semroute_stream._service.delivery import CommitTracker
from semroute_stream._service.records import Outcome

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


class MemoryOutbox:
    """An in-memory outbox (the :class:`~semroute_stream._service.delivery.Outbox` seam):
    outcomes are durable the moment they are published; ``commit()`` records the offsets."""

    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []
        self.committed: dict[TopicPartition, int] = {}
        self.tracker = CommitTracker()
        self.owned: set[TopicPartition] = set()
        self.on_lost: Callable[[set[TopicPartition]], None] = lambda tps: None
        self.on_stall: Callable[[TopicPartition, str | None], None] = lambda tp, why: None

    def assign(self, tps: set[TopicPartition]) -> None:
        self.owned |= tps

    async def prepare(self, tps: set[TopicPartition]) -> None:
        pass

    def backlog(self) -> int:
        return 0

    def unassign(self, tps: set[TopicPartition]) -> None:
        self.owned -= tps

    def track(self, tp: TopicPartition, offset: int) -> None:
        self.tracker.start(tp, offset)

    def in_flight(self, tp: TopicPartition | None = None) -> int:
        return self.tracker.in_flight(tp)

    async def publish(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        src = outcome.at
        self.tracker.finish(TopicPartition(src.topic, src.partition), src.offset)

    def commit(self) -> None:
        offsets = {tp: o for tp, o in self.tracker.committable().items() if tp in self.owned}
        self.committed.update(offsets)
        self.tracker.mark_committed(offsets)

    async def revoke(self, tps: set[TopicPartition]) -> None:
        self.unassign(tps)
        self.tracker.forget(tps)

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        self.commit()


def consumer_record(offset: int, value: bytes | None, **extra: Any) -> ConsumerRecord[bytes, bytes]:
    """A fetched record of partition ``in``/0, as ``getmany`` returns it (``extra`` overrides)."""
    fields: dict[str, Any] = {
        "topic": "in",
        "partition": 0,
        "offset": offset,
        "timestamp": 1_700_000_000_000,
        "timestamp_type": 0,
        "key": None,
        "value": value,
        "checksum": None,
        "serialized_key_size": len(extra.get("key") or b""),
        "serialized_value_size": len(value or b""),
        "headers": [],
    }
    return ConsumerRecord(**(fields | extra))
