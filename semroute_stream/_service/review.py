"""Decisions worth a human look: which of a batch's decisions go to the review topic.

:func:`review_reasons` is a pure function of a batch's :class:`~.._routing.decision.Decisions`
(numpy over the whole batch); :func:`sampled` keeps a deterministic share of them (a hash of
the input's coordinates and a seed: a replay keeps the same ones); :class:`TokenBucket` caps
how many are written per minute. :class:`Reviewer` puts the three together for the pipeline's
:class:`~.audit.Audit`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence

import numpy as np

from .._routing.decision import Decisions
from .observe import Metrics
from .settings import REVIEW_REASONS, ReviewConfig

__all__ = ["Reviewer", "TokenBucket", "review_reasons", "sampled"]


def review_reasons(
    decisions: Decisions, method: str, cfg: ReviewConfig
) -> dict[int, tuple[str, ...]]:
    """The decisions of a batch that meet one of ``cfg.reasons``, each with every reason it
    meets (in :data:`~.settings.REVIEW_REASONS` order). ``method``: the table's method
    (``low_confidence`` is only about a head's calibrated probability)."""
    routed = decisions.route >= 0
    flags: dict[str, np.ndarray] = {}
    wanted = set(cfg.reasons)
    if "fallback" in wanted:
        flags["fallback"] = ~routed
    if "low_margin" in wanted:  # NaN (no runner-up) compares False: no margin to be low
        flags["low_margin"] = routed & (decisions.margin < np.float32(cfg.margin_below))
    if "low_confidence" in wanted and method == "head":
        flags["low_confidence"] = routed & (decisions.score < np.float32(cfg.confidence_below))
    if "disagreement" in wanted and decisions.nearest_route is not None:
        flags["disagreement"] = routed & (decisions.nearest_route != decisions.route)
    if not flags:
        return {}
    names = [r for r in REVIEW_REASONS if r in flags]
    stacked = np.stack([flags[r] for r in names])  # (reasons, B)
    return {
        int(i): tuple(n for n, hit in zip(names, stacked[:, i], strict=True) if hit)
        for i in np.flatnonzero(stacked.any(axis=0))
    }


def sampled(key: str, seed: int, rate: float) -> bool:
    """Whether the record at ``key`` (topic/partition/offset) falls in the ``rate`` sample:
    a stable hash of the key and ``seed`` mapped to [0, 1), compared with ``rate``."""
    if rate >= 1.0:
        return True
    if rate <= 0.0:
        return False
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < rate


class TokenBucket:
    """``capacity`` tokens, refilled at ``per_second`` on an injected monotonic clock;
    :meth:`take` spends one when there is one. No task, no timer: the refill is computed
    from the time elapsed when a token is asked for."""

    def __init__(
        self, capacity: float, per_second: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.capacity = capacity
        self.per_second = per_second
        self._clock = clock
        self._tokens = capacity
        self._at = clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._at) * self.per_second)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class Reviewer:
    """Selects a batch's decisions for the review topic: reasons, sample, then the cap."""

    def __init__(
        self, cfg: ReviewConfig, metrics: Metrics, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.cfg = cfg
        self._metrics = metrics
        self._bucket = TokenBucket(cfg.max_per_minute, cfg.max_per_minute / 60.0, clock)

    def select(
        self, decisions: Decisions, method: str, keys: Sequence[str]
    ) -> dict[int, tuple[str, ...]]:
        """Decision index → its reasons, for the decisions to write (``keys``: each
        decision's input coordinates, the sampling hash's key)."""
        chosen: dict[int, tuple[str, ...]] = {}
        metrics = self._metrics
        for i, reasons in review_reasons(decisions, method, self.cfg).items():
            for reason in reasons:
                metrics.review_candidates.labels(reason).inc()
            if not sampled(keys[i], self.cfg.seed, self.cfg.sample_rate):
                metrics.review_skipped.labels("sampled_out").inc()
            elif not self._bucket.take():
                metrics.review_skipped.labels("rate_capped").inc()
            else:
                chosen[i] = reasons
        return chosen
