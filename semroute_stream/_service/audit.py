"""What the pipeline does with a decided batch besides answering it: the review topic, the
shadow routes and the decision-quality metrics.

:class:`Audit` is called once per batch with the batch's :class:`~.._routing.decision.Decisions`
and its :class:`~.worker.Routed` messages; it returns them with the records that ride with
their outcomes (:attr:`~.records.Outcome.extras`): a review record, a shadow disagreement.
Those go through the outbox with the outcome, so they are as durable as it is (exactly-once:
in the same transaction; the input offset is committed only after they are written).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np

from .._routing.decision import Decisions
from .._routing.router import Router
from .observe import Metrics
from .quality import DecisionQuality
from .records import OutRecord, review_record
from .review import Reviewer
from .settings import Settings
from .shadow import ShadowRoutes
from .worker import Routed

__all__ = ["Audit"]


class Audit:
    """Review selection, shadow decisions and quality metrics for each decided batch.

    ``records`` False: nothing rides with the outcomes (metrics only; ``replay`` into a file).
    """

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        *,
        records: bool = True,
        shadow: ShadowRoutes | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._metrics = metrics
        #: the candidate routes (``shadow.routes``); their disagreements are written only
        #: with ``records``, the agreement counters always
        self.shadow = shadow
        self._shadow_topic = settings.shadow_topic() if records else None
        review_topic = settings.review_topic() if records else None
        self._review_topic = review_topic
        self._reviewer = Reviewer(settings.review, metrics, clock) if review_topic else None
        self.quality = DecisionQuality(metrics, settings.drift)

    def batch(
        self,
        router: Router,
        decisions: Decisions,
        embeddings: np.ndarray,
        texts: list[str],
        routed: list[Routed],
        limit: int | None,
    ) -> list[Routed]:
        """The batch's messages, each with the records that ride with its outcome."""
        started = time.perf_counter()
        self.quality.observe(decisions, [r.route for r in routed])
        extras: dict[int, list[OutRecord]] = {}
        if self._reviewer is not None and self._review_topic is not None:
            keys = [r.src.idempotency_key for r in routed]
            chosen = self._reviewer.select(decisions, router.table.method, keys)
            for i, reasons in chosen.items():
                r = routed[i]
                record = review_record(
                    self._review_topic,
                    r.src,
                    r.query,
                    decision=r.decision,
                    reasons=reasons,
                    limit=limit,
                )
                extras.setdefault(i, []).append(record)
            self._metrics.review_selected.inc(len(chosen))
        if self.shadow is not None:
            topic = self._shadow_topic or ""
            disagreements = self.shadow.compare(decisions, embeddings, texts, routed, topic, limit)
            if self._shadow_topic is not None:
                for i, record in disagreements.items():
                    extras.setdefault(i, []).append(record)
        self._metrics.audit_seconds.observe(time.perf_counter() - started)
        if not extras:
            return routed
        return [
            dataclasses.replace(r, extras=tuple(extras[i])) if i in extras else r
            for i, r in enumerate(routed)
        ]
