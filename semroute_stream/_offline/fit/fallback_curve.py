"""The fallback as a one-dimensional decision, and its precision/recall curve. Pure numpy.

A route table has many cuts (one threshold per route; a head also has per-route
``min_confidence`` and an optional ``min_margin``). To draw the fallback's precision and
recall "against the threshold", every cut is moved by one common offset ``d``: ``d = 0`` is
the table as it is, ``d > 0`` makes every cut stricter (more fallbacks). Each query then has a
*slack*, the largest ``d`` at which it is still routed, and it falls back exactly when its
slack is below ``d``: one sort gives the whole curve.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..._routing.decision import RouteTable, ScoreMatrix
from ..._routing.kernels import margins

__all__ = ["CURVE_POINTS", "fallback_curve", "fallback_slack"]

CURVE_POINTS = 401  # offsets of the curve, evenly spaced (plus 0: the cuts as they are)


def fallback_slack(table: RouteTable, m: ScoreMatrix) -> np.ndarray:
    """Each query's slack ``(N,)`` float64: it falls back when its slack is below the offset
    added to every cut (below 0: with the cuts as they are).

    Similarity methods: a route passes when ``score >= threshold``, so the slack is the best
    ``score - threshold``. Head: a route passes when its probability, its nearest-utterance
    cosine and (with ``min_margin``) its lead over the runner-up all reach their cuts, so the
    slack is the best ``min(p - min_confidence, cosine - floor, lead - min_margin)``, capped
    by ``energy - min_energy`` when the head has an energy floor: probabilities, cosines and
    energies moved along one axis, a choice rather than a law."""
    if table.method == "head":
        head = table.head
        assert head is not None
        slack = np.minimum(
            m.scores - head.min_confidence[None, :], m.nearest - table.thresholds[None, :]
        )
        if head.min_margin is not None:
            slack = np.minimum(slack, margins(m.scores) - np.float32(head.min_margin))
        if head.min_energy is not None and m.energy is not None:
            slack = np.minimum(slack, (m.energy - np.float32(head.min_energy))[:, None])
    else:
        slack = m.scores - table.thresholds[None, :]
    if slack.shape[0] == 0:
        return np.zeros(0, dtype=np.float64)
    return np.asarray(slack.max(axis=1), dtype=np.float64)


def _shares(numerators: np.ndarray, denominators: np.ndarray) -> list[float | None]:
    """``numerator / denominator`` rounded to 6 places, None where the denominator is 0 (the
    rounding of ``evaluate.ratio``, so the operating point equals its figures)."""
    return [
        round(float(n) / float(d), 6) if d else None
        for n, d in zip(numerators, denominators, strict=True)
    ]


def fallback_curve(
    slack: np.ndarray, gold: np.ndarray, points: int = CURVE_POINTS
) -> dict[str, Any]:
    """The fallback's precision and recall (rows with no route, ``gold < 0``, are the
    positives) and the fallback rate with every cut moved by each of ``offsets`` (``points``
    evenly spaced across the slacks, and 0). ``operating_point`` is offset 0, the cuts as they
    are: what ``fallback_precision`` and ``fallback_recall`` of ``evaluate`` measure. None
    where undefined (no fallback taken: no precision; no row without a route: no recall)."""
    slack = np.asarray(slack, dtype=np.float64)
    finite = slack[np.isfinite(slack)]
    lo, hi = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 0.0)
    offsets = np.union1d(np.linspace(min(lo, 0.0), max(hi, 0.0), points), [0.0])
    order = np.argsort(slack, kind="stable")
    positives = np.concatenate([[0], np.cumsum(np.asarray(gold)[order] < 0)])
    fallbacks = np.searchsorted(slack[order], offsets, side="left")  # rows with slack < offset
    hits = positives[fallbacks]
    precision = _shares(hits, fallbacks)
    recall = _shares(hits, np.full(len(hits), positives[-1]))
    rate = _shares(fallbacks, np.full(len(hits), len(slack)))
    at = int(np.searchsorted(offsets, 0.0))
    return {
        "offsets": [round(float(o), 6) for o in offsets],
        "precision": precision,
        "recall": recall,
        "fallback_rate": rate,
        "operating_point": {
            "offset": 0.0,
            "precision": precision[at],
            "recall": recall[at],
            "fallback_rate": rate[at],
        },
    }
