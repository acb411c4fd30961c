"""Health: readiness, consumer lag, the point-in-time gauges and the HTTP handlers.

Read-only over a running pipeline (:class:`PipelineView`); docs/operations.md says what each
readiness answer means. Ready only while the consumer demonstrably makes progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Protocol

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from .observe import (
    CIRCUIT_STATES,
    Handler,
    HttpServer,
    Metrics,
    Observer,
    Response,
    metrics_response,
)
from .settings import Settings
from .worker import Worker

__all__ = ["Activity", "Health", "PipelineView"]


@dataclass
class Activity:
    """Wall-clock stamps readiness is judged by (``time.time()``; None: not yet)."""

    assigned_at: float | None = None  # when the group first gave us partitions
    last_records: float = 0.0  # the last fetch that returned records
    last_finish: float = 0.0  # the last message that finished
    paused: bool = False  # backpressure has paused every partition
    #: partitions whose outcomes cannot be written for now, and why (they are paused)
    stalled: dict[TopicPartition, str] = field(default_factory=dict)
    #: retry-topic partitions held (paused) while their endpoint is down
    held: set[TopicPartition] = field(default_factory=set)
    #: per endpoint: (monotonic time of the next trial round from its retry topic, interval)
    retry_backoff: dict[str, tuple[float, float]] = field(default_factory=dict)


class PipelineView(Protocol):
    """What health reads of a pipeline."""

    settings: Settings
    activity: Activity

    @property
    def stopping(self) -> bool: ...
    @property
    def paused(self) -> bool: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def consumer(self) -> AIOKafkaConsumer: ...
    @property
    def assigned(self) -> frozenset[TopicPartition]: ...
    @property
    def worker(self) -> Worker: ...
    @property
    def metrics(self) -> Metrics: ...
    @property
    def observer(self) -> Observer: ...


class Health:
    """Readiness, lags and gauges of one pipeline."""

    def __init__(self, pipeline: PipelineView) -> None:
        self._p = pipeline
        self.http: HttpServer | None = None  # set by open_service when it serves HTTP

    def handlers(self) -> dict[str, Handler]:
        """The HTTP routes: ``/metrics``, ``/livez`` and ``/readyz``."""
        return {"/metrics": self._metrics, "/livez": self._livez, "/readyz": self._readyz}

    async def lags(self) -> dict[TopicPartition, int]:
        """Per assigned partition: last stable offset (or high watermark) minus position.

        Partitions with no fetch response yet (end unknown) are left out.
        """
        consumer = self._p.consumer

        async def one(tp: TopicPartition) -> tuple[TopicPartition, int] | None:
            try:
                end = consumer.last_stable_offset(tp)
                if end is None or end < 0:
                    end = consumer.highwater(tp)
                if end is None:
                    return None
                position = await asyncio.wait_for(consumer.position(tp), 0.5)
            except (KafkaError, AssertionError, TimeoutError):  # unassigned meanwhile, resetting
                return None
            return tp, max(0, end - position)

        found = await asyncio.gather(*(one(tp) for tp in sorted(self._p.assigned)))
        return dict(item for item in found if item is not None)

    async def readiness(self) -> tuple[bool, str]:
        """Ready only while the consumer demonstrably makes progress; see docs/operations.md."""
        p, act = self._p, self._p.activity
        if p.stopping:
            return False, "draining"
        if p.observer.platform_failure is not None:
            return False, f"platform failure: {p.observer.platform_failure}"
        if p.observer.failed_tasks:
            name, why = sorted(p.observer.failed_tasks.items())[0]
            return False, f"background task {name} stopped: {why[:300]}"
        if act.stalled:
            tp, why = sorted(act.stalled.items())[0]
            return False, f"partition {tp.topic}/{tp.partition} stalled: {why}"
        broken = p.worker.llm.misconfigured() if p.worker.llm is not None else {}
        if broken:
            name, why = sorted(broken.items())[0]
            return False, f"LLM endpoint {name} misconfigured (its messages wait): {why}"
        if act.assigned_at is None:
            return False, "waiting for the group to assign partitions"
        now = time.time()
        stall = p.settings.observability.stall_timeout_s
        if p.paused:  # backpressure: progress means messages finishing
            idle = now - max(act.last_finish, act.assigned_at)
            if p.in_flight and idle > stall:
                return False, f"paused by backpressure and no message finished for {idle:.0f}s"
            return True, "ready (paused by backpressure)"
        if not p.assigned:  # fine while other members own every partition
            if not p.consumer.partitions_for_topic(p.settings.input.topic):
                return False, f"input topic {p.settings.input.topic!r} not found"
            return True, "ready (no partitions assigned to this member)"
        polls = []
        for tp in p.assigned:
            with contextlib.suppress(AssertionError):
                polls.append(p.consumer.last_poll_timestamp(tp) or 0)
        last_fetch = max([t / 1000 for t in polls] + [act.assigned_at])
        if now - last_fetch > stall:
            return False, f"no fetch response from the broker for {now - last_fetch:.0f}s"
        behind = sum((await self.lags()).values())
        idle = now - max(act.last_records, act.assigned_at)
        if behind and idle > stall:
            return False, f"{behind} messages behind but nothing fetched for {idle:.0f}s"
        return True, "ready"

    async def refresh_gauges(self) -> None:
        """Set the point-in-time gauges (called on each scrape)."""
        p, m = self._p, self._p.metrics
        m.in_flight.set(p.in_flight)
        m.paused.set(1 if p.paused else 0)
        llm = p.worker.llm
        if llm is not None:
            broken = llm.misconfigured()
            for endpoint in llm.endpoints:
                m.endpoint_misconfigured.labels(endpoint).set(1 if endpoint in broken else 0)
                m.endpoint_in_flight.labels(endpoint).set(p.worker.endpoint_load[endpoint])
                m.circuit_state.labels(endpoint).set(CIRCUIT_STATES[llm.breaker_state(endpoint)])
        lags = await self.lags()
        m.lag.clear()  # partitions no longer assigned disappear
        for tp, lag in lags.items():
            m.lag.labels(tp.topic, str(tp.partition)).set(lag)

    async def _metrics(self) -> Response:
        await self.refresh_gauges()
        return metrics_response(self._p.metrics)

    async def _livez(self) -> Response:
        return 200, "text/plain; charset=utf-8", b"ok\n"

    async def _readyz(self) -> Response:
        ready, why = await self.readiness()
        return (200 if ready else 503), "text/plain; charset=utf-8", f"{why}\n".encode()
