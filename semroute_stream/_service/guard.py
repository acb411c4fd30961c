"""The retrain guard: does a router built on the overlay route the known utterances worse?

Both routers carry their 5-fold cross-validation (``method: auto``, or ``head`` with derived
settings): each held-out utterance was scored by a model trained without its fold, with the
method the router chose. The guard compares the two on the utterances they share with the same
route (what both were asked to learn): the accuracy of the new one may not fall more than
``tolerance`` below the live one's. Routers without a cross-validation (``max``,
``top5_mean``, a head with fixed settings) are not guarded. Pure numpy, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._routing.router import Router
from .._routing.selection import candidate_scores
from .overlay import normalise

__all__ = ["MIN_SHARED", "Verdict", "held_out_hits", "judge"]

MIN_SHARED = 20
"""Fewer shared held-out utterances than this: no verdict (the update goes live)."""


def held_out_hits(router: Router) -> dict[tuple[str, str], bool] | None:
    """(normalised text, route) → whether the router's cross-validation routed it right."""
    res = router.resolution
    if res.head is None or res.head.cv is None or res.choice is None:
        return None
    cv = res.head.cv
    scores = candidate_scores(
        res.choice.method, res.choice.blend, cv.head_log_proba, cv.max_score, cv.top5_score
    )
    predicted = np.asarray(scores).argmax(axis=1)
    texts, names = router.table.utterances, router.table.names
    return {
        (normalise(texts[int(i)]), names[int(g)]): bool(p == g)
        for i, g, p in zip(cv.held_out, cv.gold, predicted, strict=True)
    }


@dataclass(frozen=True)
class Verdict:
    """The guard's finding: accuracies on ``shared`` utterances, and whether to hold back."""

    live: float | None
    new: float | None
    shared: int
    hold_back: bool
    reason: str


def judge(live: Router, new: Router, tolerance: float) -> Verdict:
    """Whether ``new`` is held back: its held-out accuracy on the utterances both routers share
    is more than ``tolerance`` below ``live``'s."""
    old_hits, new_hits = held_out_hits(live), held_out_hits(new)
    if old_hits is None or new_hits is None:
        return Verdict(None, None, 0, False, "not guarded (no cross-validation)")
    shared = sorted(set(old_hits) & set(new_hits))
    if len(shared) < MIN_SHARED:
        return Verdict(None, None, len(shared), False, f"not guarded ({len(shared)} shared)")
    old = sum(old_hits[k] for k in shared) / len(shared)
    acc = sum(new_hits[k] for k in shared) / len(shared)
    hold = acc < old - tolerance
    reason = (
        f"cross-validated accuracy on {len(shared)} shared utterances {old:.4f} -> {acc:.4f}"
        + (f" (more than {tolerance:g} lower)" if hold else "")
    )
    return Verdict(round(old, 6), round(acc, 6), len(shared), hold, reason)
