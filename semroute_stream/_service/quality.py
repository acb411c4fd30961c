"""Decision quality: per-route histograms of every decision, fallback reasons, and drift.

:class:`DecisionQuality` observes each decided batch: the best route's nearest-utterance
cosine (``score``), the method's score compared with the threshold (``confidence``: a head's
calibrated probability), the lead over the runner-up (``margin``), by the route decided (the
fallback's name for a fallback); and the fallback reason counts.

:class:`Drift` compares the route shares and the fallback rate of the last
``drift.recent_messages`` decisions with those of the ``drift.baseline_messages`` decisions
before them. Incremental: each batch adds one count vector; whole batches leave the recent
window for the baseline, and the baseline's oldest batches are dropped, as the windows fill
(windows are whole batches, so they hold up to one batch more than their size). No work
proportional to the history: a batch costs O(routes), plus the batches it moves.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass

import numpy as np

from .._routing.decision import FALLBACK_REASONS, Decisions
from .observe import Metrics
from .settings import DriftConfig

__all__ = ["DecisionQuality", "Drift", "DriftReading", "js_distance", "total_variation"]


def total_variation(p: Counter[str], q: Counter[str]) -> float:
    """Total-variation distance between two count vectors as distributions (0..1)."""
    n_p, n_q = sum(p.values()), sum(q.values())
    if not n_p or not n_q:
        return 0.0
    return 0.5 * sum(abs(p[k] / n_p - q[k] / n_q) for k in p.keys() | q.keys())


def js_distance(p: Counter[str], q: Counter[str]) -> float:
    """Jensen-Shannon distance (base 2, 0..1): the square root of the JS divergence."""
    n_p, n_q = sum(p.values()), sum(q.values())
    if not n_p or not n_q:
        return 0.0
    divergence = 0.0
    for k in p.keys() | q.keys():
        a, b = p[k] / n_p, q[k] / n_q
        m = (a + b) / 2
        if a > 0:
            divergence += 0.5 * a * math.log2(a / m)
        if b > 0:
            divergence += 0.5 * b * math.log2(b / m)
    return math.sqrt(max(divergence, 0.0))


@dataclass(frozen=True)
class DriftReading:
    """The drift signal after a batch (``ready``: the baseline window is full)."""

    ready: bool
    tvd: float
    jsd: float
    fallback_recent: float
    fallback_baseline: float

    @property
    def fallback_delta(self) -> float:
        return self.fallback_recent - self.fallback_baseline


class _Window:
    """Batches of route counts, with their running sum."""

    def __init__(self) -> None:
        self.batches: deque[tuple[Counter[str], int]] = deque()
        self.counts: Counter[str] = Counter()
        self.fallbacks = 0
        self.n = 0

    def push(self, counts: Counter[str], fallbacks: int) -> None:
        self.batches.append((counts, fallbacks))
        self.counts.update(counts)
        self.fallbacks += fallbacks
        self.n += sum(counts.values())

    def pop(self) -> tuple[Counter[str], int]:
        counts, fallbacks = self.batches.popleft()
        self.counts.subtract(counts)
        self.fallbacks -= fallbacks
        self.n -= sum(counts.values())
        return counts, fallbacks

    def oldest_size(self) -> int:
        return sum(self.batches[0][0].values()) if self.batches else 0

    def rate(self) -> float:
        return self.fallbacks / self.n if self.n else 0.0


class Drift:
    """Route shares and fallback rate: a recent window against the baseline before it."""

    def __init__(self, cfg: DriftConfig) -> None:
        self.cfg = cfg
        self.recent = _Window()
        self.baseline = _Window()

    def add(self, counts: Counter[str], fallbacks: int) -> DriftReading:
        """One batch's decisions (decisions per route name, the fallback's included, and how
        many were fallbacks); the reading after it."""
        self.recent.push(counts, fallbacks)
        while self.recent.n - self.recent.oldest_size() >= self.cfg.recent_messages:
            self.baseline.push(*self.recent.pop())
        while self.baseline.n - self.baseline.oldest_size() >= self.cfg.baseline_messages:
            self.baseline.pop()
        recent, baseline = +self.recent.counts, +self.baseline.counts  # + drops zero counts
        return DriftReading(
            ready=self.baseline.n >= self.cfg.baseline_messages,
            tvd=total_variation(recent, baseline),
            jsd=js_distance(recent, baseline),
            fallback_recent=self.recent.rate(),
            fallback_baseline=self.baseline.rate(),
        )


class DecisionQuality:
    """Observes each decided batch into the quality metrics (and drift when it is on)."""

    def __init__(self, metrics: Metrics, drift: DriftConfig) -> None:
        self._metrics = metrics
        self.drift = Drift(drift) if drift.enabled else None

    def observe(self, decisions: Decisions, routes: list[str]) -> None:
        """``routes``: each decision's route name (the fallback's for a fallback)."""
        m = self._metrics
        if not routes:
            return
        order = np.argsort(decisions.route, kind="stable")  # grouped by route decided
        route_sorted = decisions.route[order]
        starts = np.flatnonzero(np.r_[True, route_sorted[1:] != route_sorted[:-1]])
        ends = np.r_[starts[1:], len(order)]
        score = decisions.nearest_score[order]
        confidence = decisions.score[order]
        margin = decisions.margin[order]
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
            route = routes[int(order[a])]
            m.decision_score.observe_many(route, score[a:b])
            m.decision_confidence.observe_many(route, confidence[a:b])
            m.decision_margin.observe_many(route, margin[a:b])
        codes = np.bincount(decisions.reason.astype(np.intp), minlength=len(FALLBACK_REASONS))
        for code in np.flatnonzero(codes[1:]) + 1:
            m.fallback_reasons.labels(FALLBACK_REASONS[code]).inc(int(codes[code]))
        if self.drift is not None:
            fallbacks = int((decisions.route < 0).sum())
            reading = self.drift.add(Counter(routes), fallbacks)
            m.drift_ready.set(1 if reading.ready else 0)
            if reading.ready:
                m.drift_tvd.set(reading.tvd)
                m.drift_jsd.set(reading.jsd)
                m.drift_fallback_rate.labels("recent").set(reading.fallback_recent)
                m.drift_fallback_rate.labels("baseline").set(reading.fallback_baseline)
                m.drift_fallback_delta.set(reading.fallback_delta)
