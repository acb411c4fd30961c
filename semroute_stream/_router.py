"""A router: routes plus an encoder. Encodes the utterances once, then routes batches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from semroute_stream._decision import Decisions, RouteTable, decide, utterances_of
from semroute_stream._routes import RoutesConfig, routes_version

__all__ = ["Router", "TextEncoder"]


class TextEncoder(Protocol):
    """What the router needs of an encoder (``semroute_stream._encoder.Encoder`` is one)."""

    @property
    def model_name(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """``(len(texts), dim)`` float32, L2-normalised, in input order."""
        ...


class Router:
    """Routes texts or embeddings with one routes config and one encoder."""

    def __init__(self, routes: RoutesConfig, encoder: TextEncoder) -> None:
        self.routes = routes
        self.encoder = encoder
        self.table = RouteTable.build(routes, encoder.encode(utterances_of(routes)))
        self.version = routes_version(routes)

    def decide(self, embeddings: np.ndarray) -> Decisions:
        return decide(self.table, embeddings)

    def route(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        """Encode, decide and explain: one JSON-ready dict per text, in input order."""
        if not texts:
            return []
        decisions = self.decide(self.encoder.encode(texts))
        extra = {"model": self.encoder.model_name, "routes_version": self.version}
        return [{**decisions.explain(i, self.table), **extra} for i in range(len(decisions))]
