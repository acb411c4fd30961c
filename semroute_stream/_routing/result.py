"""The typed decision the library API returns: one routed text.

A :class:`RouteDecision` is a view of the explanation ``Router.route`` builds (the same
JSON-shaped dict the service publishes as an outcome's ``decision``): nothing is computed a
second way, the typed fields are read from it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["RouteDecision"]


def _frozen_mapping(data: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(copy.deepcopy(dict(data)))


@dataclass(frozen=True)
class RouteDecision:
    """Where one text goes, and why.

    ``route`` is the chosen route's name, or the fallback's when no route cleared its
    threshold (``is_fallback``; ``fallback_reason`` says why). ``score`` and ``threshold``
    are those of the best-scoring route (for ``method: head``, its calibrated probability
    and its confidence floor); ``runner_up`` and ``margin`` are None when there is a single
    route. ``metadata`` is the chosen route's (empty for the fallback). ``explain()`` gives
    the whole explanation as a JSON-ready dict."""

    text: str
    route: str
    score: float
    threshold: float
    is_fallback: bool
    runner_up: str | None
    runner_up_score: float | None
    margin: float | None
    fallback_reason: str | None
    metadata: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    _explanation: Mapping[str, Any] = field(
        default_factory=dict, repr=False, compare=False, hash=False
    )

    @classmethod
    def from_explanation(
        cls, text: str, explanation: Mapping[str, Any], metadata: Mapping[str, Any]
    ) -> RouteDecision:
        """The decision a ``Router.route`` explanation describes (``metadata``: the route's)."""
        runner_up = explanation.get("runner_up")
        margin = explanation.get("margin")
        reason = explanation.get("fallback_reason")
        return cls(
            text=text,
            route=str(explanation["route"]),
            score=float(explanation["score"]),
            threshold=float(explanation["threshold"]),
            is_fallback=bool(explanation["is_fallback"]),
            runner_up=None if runner_up is None else str(runner_up["route"]),
            runner_up_score=None if runner_up is None else float(runner_up["score"]),
            margin=None if margin is None else float(margin),
            fallback_reason=None if reason is None else str(reason),
            metadata=_frozen_mapping(metadata),
            _explanation=_frozen_mapping(explanation),
        )

    def explain(self) -> dict[str, Any]:
        """The full explanation (a fresh copy): method, score and threshold, runner-up and
        margin, top routes, nearest utterance, fallback reason, model and routes version."""
        return copy.deepcopy(dict(self._explanation))
