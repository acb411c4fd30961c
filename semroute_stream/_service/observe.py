"""Prometheus metrics and the small HTTP server for ``/metrics``, ``/livez`` and ``/readyz``.

Each :class:`Metrics` has a registry of its own (not prometheus-client's global one), so several
pipelines in one process, and the tests, never clash. Label values are bounded: route names and
endpoints come from the config, error kinds are a fixed set, partitions are the assignment.

The HTTP server is ``asyncio.start_server`` with just enough HTTP/1.1 for probes and scrapers:
``GET`` only, one request per connection, ``Connection: close``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter as Tally
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from .._errors import ERROR_KINDS, ConfigError
from .._routing.decision import FALLBACK_REASONS
from .tracing import Tracer

if TYPE_CHECKING:
    from .records import Outcome

__all__ = [
    "CIRCUIT_STATES",
    "BatchHistogram",
    "Handler",
    "HttpServer",
    "Metrics",
    "Observer",
    "Response",
    "RunStats",
    "metrics_response",
]

log = logging.getLogger("semroute_stream")

CIRCUIT_STATES = {"closed": 0, "half_open": 1, "open": 2}

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_FAST = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
_SIZES = tuple(float(2**i) for i in range(13))  # 1 .. 4096 (batching.max_size's limit)
#: cosines and probabilities: finer where thresholds usually sit
_UNIT = (0.1, 0.2, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)
_MARGIN = (0.005, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0)


class BatchHistogram:
    """A histogram with one label, fed a whole batch of values at a time (numpy: one
    ``searchsorted`` and ``bincount`` per label value and batch, not one ``observe`` per
    value), exported as an ordinary Prometheus histogram (``_bucket``, ``_count``, ``_sum``).
    Updated on the event loop only; a scrape reads a consistent copy under the lock."""

    def __init__(
        self,
        name: str,
        documentation: str,
        label: str,
        buckets: tuple[float, ...],
        registry: CollectorRegistry,
    ) -> None:
        self._name = name
        self._doc = documentation
        self._label = label
        self._bounds = np.asarray(buckets, dtype=np.float64)
        self._le = [repr(float(b)) for b in buckets] + ["+Inf"]  # as prometheus-client writes
        self._counts: dict[str, np.ndarray] = {}  # per bucket, not cumulative; the last: +Inf
        self._sums: dict[str, float] = {}
        self._lock = threading.Lock()
        registry.register(self)

    def observe_many(self, label_value: str, values: np.ndarray) -> None:
        """Observe every value (NaN values are skipped)."""
        values = values[~np.isnan(values)]
        if not values.size:
            return
        counts = np.bincount(
            np.searchsorted(self._bounds, values, side="left"), minlength=len(self._le)
        )
        with self._lock:
            if label_value in self._counts:
                self._counts[label_value] += counts
                self._sums[label_value] += float(values.sum())
            else:
                self._counts[label_value] = counts
                self._sums[label_value] = float(values.sum())

    def describe(self) -> list[HistogramMetricFamily]:
        return [HistogramMetricFamily(self._name, self._doc, labels=[self._label])]

    def collect(self) -> list[HistogramMetricFamily]:
        family = HistogramMetricFamily(self._name, self._doc, labels=[self._label])
        with self._lock:
            state = [(k, np.cumsum(v).tolist(), self._sums[k]) for k, v in self._counts.items()]
        for value, cumulative, total in state:
            buckets = list(zip(self._le, cumulative, strict=True))
            family.add_metric([value], buckets, sum_value=total)
        return [family]


class Metrics:
    """Every metric the service exports; the pipeline updates them, a scrape reads them."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.consumed = Counter(
            "semroute_messages_consumed", "Messages taken from the input topic.", registry=r
        )
        self.routed = Counter(
            "semroute_messages_routed",
            "Outcome records published (acknowledged), by route (the fallback included).",
            ["route"],
            registry=r,
        )
        self.fallback = Counter(
            "semroute_messages_fallback",
            "Outcome records published for queries that matched no route.",
            registry=r,
        )
        self.dead_letters = Counter(
            "semroute_dead_letters",
            "Dead-letter records published, by error kind.",
            ["kind"],
            registry=r,
        )
        for kind in ERROR_KINDS:
            self.dead_letters.labels(kind)
        self.batch_size = Histogram(
            "semroute_batch_size", "Messages per micro-batch.", buckets=_SIZES, registry=r
        )
        self.encode_seconds = Histogram(
            "semroute_encode_seconds", "Embedding one batch.", buckets=_LATENCY, registry=r
        )
        self.decide_seconds = Histogram(
            "semroute_decide_seconds", "Routing one batch (numpy).", buckets=_FAST, registry=r
        )
        self.audit_seconds = Histogram(
            "semroute_audit_seconds",
            "Quality metrics, review selection and shadow decision for one batch.",
            buckets=_FAST,
            registry=r,
        )
        self.llm_seconds = Histogram(
            "semroute_llm_seconds",
            "One LLM call, retries included, by endpoint (failed calls too).",
            ["endpoint"],
            buckets=_LATENCY,
            registry=r,
        )
        self.end_to_end_seconds = Histogram(
            "semroute_end_to_end_seconds",
            "From the batch's fetch to the outcome's acknowledgement.",
            buckets=_LATENCY,
            registry=r,
        )
        self.in_flight = Gauge(
            "semroute_in_flight_messages", "Messages taken but not yet finished.", registry=r
        )
        self.endpoint_in_flight = Gauge(
            "semroute_endpoint_in_flight_messages",
            "Messages waiting for or inside a call to each LLM endpoint.",
            ["endpoint"],
            registry=r,
        )
        self.circuit_state = Gauge(
            "semroute_llm_circuit_state",
            "Circuit breaker of each LLM endpoint: 0 closed, 1 half-open, 2 open.",
            ["endpoint"],
            registry=r,
        )
        self.paused = Gauge(
            "semroute_consumer_paused", "1 while backpressure pauses the consumer.", registry=r
        )
        self.lag = Gauge(
            "semroute_consumer_lag",
            "Messages behind the partition's end (last stable offset - position).",
            ["topic", "partition"],
            registry=r,
        )
        self.parked = Counter(
            "semroute_messages_parked",
            "Messages parked on their endpoint's retry topic (the endpoint was unavailable).",
            ["route"],
            registry=r,
        )
        self.platform_failure = Gauge(
            "semroute_platform_failure",
            "1 while the broker refuses our writes (authorisation, timestamps...): see /readyz.",
            registry=r,
        )
        self.task_failed = Gauge(
            "semroute_task_failed",
            "1 once a background task (learning: the corrections intake, the overlay tail) "
            "stopped with an error; it is not restarted: /readyz names it.",
            ["task"],
            registry=r,
        )
        self.endpoint_misconfigured = Gauge(
            "semroute_llm_endpoint_misconfigured",
            "1 while an LLM endpoint answers 401/403/404 or not a chat completion.",
            ["endpoint"],
            registry=r,
        )
        self.routes = Info("semroute_routes", "The routes version in use.", registry=r)
        self.reloads = Counter(
            "semroute_routes_reloads",
            "Routes reloads, by result (applied or rejected).",
            ["result"],
            registry=r,
        )
        for result in ("applied", "rejected"):
            self.reloads.labels(result)
        self.corrections = Counter(
            "semroute_corrections",
            "Corrections read (learning), by result (accepted or dead_lettered).",
            ["result"],
            registry=r,
        )
        self.retrains = Counter(
            "semroute_overlay_retrains",
            "Head retrains on the overlay, by result (applied, held_back or failed).",
            ["result"],
            registry=r,
        )
        self.overlay = Info(
            "semroute_overlay", "The overlay version read, and the one in use.", registry=r
        )
        self.decision_score = BatchHistogram(
            "semroute_decision_score",
            "Each decision's nearest-utterance cosine (of the best route), by route decided.",
            "route",
            _UNIT,
            r,
        )
        self.decision_confidence = BatchHistogram(
            "semroute_decision_confidence",
            "Each decision's score compared with its threshold (head: the calibrated "
            "probability), by route decided.",
            "route",
            _UNIT,
            r,
        )
        self.decision_margin = BatchHistogram(
            "semroute_decision_margin",
            "Each decision's lead over the runner-up route, by route decided.",
            "route",
            _MARGIN,
            r,
        )
        self.fallback_reasons = Counter(
            "semroute_fallback_reasons",
            "Decisions that fell back, by reason.",
            ["reason"],
            registry=r,
        )
        for reason in FALLBACK_REASONS[1:]:
            self.fallback_reasons.labels(reason)
        self.drift_ready = Gauge(
            "semroute_drift_ready",
            "1 once the drift baseline window is full (the drift gauges are set from then on).",
            registry=r,
        )
        self.drift_tvd = Gauge(
            "semroute_drift_route_share_tvd",
            "Total-variation distance between the route shares of the recent window and the "
            "baseline window (0..1).",
            registry=r,
        )
        self.drift_jsd = Gauge(
            "semroute_drift_route_share_jsd",
            "Jensen-Shannon distance (base 2, 0..1) between the recent and baseline route shares.",
            registry=r,
        )
        self.drift_fallback_rate = Gauge(
            "semroute_drift_fallback_rate",
            "Share of fallbacks in the recent and the baseline window.",
            ["window"],
            registry=r,
        )
        self.drift_fallback_delta = Gauge(
            "semroute_drift_fallback_rate_delta",
            "Fallback rate of the recent window minus the baseline's.",
            registry=r,
        )
        self.review_candidates = Counter(
            "semroute_review_candidates",
            "Decisions that met a review reason, by reason (one decision may meet several).",
            ["reason"],
            registry=r,
        )
        self.review_skipped = Counter(
            "semroute_review_skipped",
            "Review candidates not written: sampled_out (review.sample_rate) or rate_capped "
            "(review.max_per_minute).",
            ["why"],
            registry=r,
        )
        self.shadow_routes = Info(
            "semroute_shadow_routes", "The candidate (shadow) routes version.", registry=r
        )
        self.shadow_reloads = Counter(
            "semroute_shadow_routes_reloads",
            "Shadow routes reloads, by result (applied or rejected).",
            ["result"],
            registry=r,
        )
        self.shadow_decided = Counter(
            "semroute_shadow_decided",
            "Messages decided by the shadow (candidate) routes too.",
            registry=r,
        )
        self.shadow_agreed = Counter(
            "semroute_shadow_agreed",
            "Messages the shadow routes decided as the live ones (the same route, or both "
            "a fallback); agreed / decided is the agreement ratio.",
            registry=r,
        )
        self.review_selected = Counter(
            "semroute_review_selected",
            "Decisions selected for the review topic (written with their outcome).",
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass
class RunStats:
    """What one run did. Returned by :func:`run_service` (and printed by the CLI)."""

    consumed: int = 0
    outcomes: int = 0
    dead_letters: int = 0
    routes: Tally[str] = field(default_factory=Tally)
    errors: Tally[str] = field(default_factory=Tally)
    batches: int = 0
    pauses: int = 0
    commits: int = 0
    parked: int = 0
    stopped_by: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "consumed": self.consumed,
            "outcomes": self.outcomes,
            "dead_letters": self.dead_letters,
            "routes": dict(self.routes),
            "errors": dict(self.errors),
            "batches": self.batches,
            "pauses": self.pauses,
            "commits": self.commits,
            "parked": self.parked,
            "stopped_by": self.stopped_by,
        }


class Observer:
    """A run's statistics, metrics and tracer: what the pipeline, its worker and its outbox
    report to. One per pipeline; :meth:`published` is called when an outcome is durable (at
    the broker's ack in at-least-once delivery, at the transaction's commit in exactly-once).
    """

    def __init__(self, metrics: Metrics | None = None, tracer: Tracer | None = None) -> None:
        self.metrics = metrics or Metrics()
        self.tracer = tracer or Tracer()
        self.stats = RunStats()
        #: Why the broker refuses our writes (authorisation, timestamps, ...), while it does.
        self.platform_failure: str | None = None
        #: Background tasks that stopped with an error: task name -> the error.
        self.failed_tasks: dict[str, str] = {}

    def platform_failing(self, reason: str | None) -> None:
        """A write the broker refuses for reasons of the platform (None: it works again)."""
        if reason is not None and self.platform_failure is None:
            log.error("platform failure, outputs are stalled until it is fixed: %s", reason)
        elif reason is None and self.platform_failure is not None:
            log.warning("platform failure over: %s", self.platform_failure)
        self.platform_failure = reason
        self.metrics.platform_failure.set(0 if reason is None else 1)

    def task_failed(self, name: str, err: BaseException) -> None:
        """A background task stopped with ``err``: logged, counted, and /readyz says so."""
        log.error("background task %s stopped: %r", name, err, exc_info=err)
        self.failed_tasks[name] = repr(err)
        self.metrics.task_failed.labels(name).set(1)

    def published(self, outcome: Outcome) -> None:
        if outcome.parked:  # not an outcome yet: it comes back from the retry topic
            self.stats.parked += 1
            self.metrics.parked.labels(outcome.route or "").inc()
            return
        self.metrics.end_to_end_seconds.observe(time.time() - outcome.received)
        if outcome.kind is not None:
            self.stats.dead_letters += 1
            self.stats.errors[outcome.kind] += 1
            self.metrics.dead_letters.labels(outcome.kind).inc()
            return
        self.stats.outcomes += 1
        if outcome.route is not None:
            self.stats.routes[outcome.route] += 1
            self.metrics.routed.labels(outcome.route).inc()
        if outcome.fallback:
            self.metrics.fallback.inc()


Response = tuple[int, str, bytes]  # status, content type, body
Handler = Callable[[], Awaitable[Response]]

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class HttpServer:
    """Serves ``GET path`` with ``handlers[path]``; ``port`` is the bound one (0 picks one)."""

    def __init__(self, host: str, port: int, handlers: dict[str, Handler]) -> None:
        self.host = host
        self.port = port
        self._handlers = handlers
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._serve, self.host, self.port)
        except OSError as err:
            raise ConfigError(
                f"observability: cannot listen on {self.host}:{self.port}: {err.strerror or err}"
            ) from None
        self.port = self._server.sockets[0].getsockname()[1]
        log.info(
            "metrics and health on http://%s:%d (/metrics /livez /readyz)", self.host, self.port
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            method, target, *_ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            handler = self._handlers.get(target.split("?", 1)[0])
            if handler is None:
                status, ctype, body = 404, "text/plain", b"not found\n"
            elif method not in ("GET", "HEAD"):
                status, ctype, body = 405, "text/plain", b"GET only\n"
            else:
                status, ctype, body = await handler()
            writer.write(
                f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode("latin-1")
            )
            if method != "HEAD":
                writer.write(body)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
            pass  # a probe that hung up or sent garbage: nothing to answer
        except ConnectionError:
            pass
        except Exception:  # a handler bug must not take the server down
            log.exception("HTTP handler failed")
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


def metrics_response(metrics: Metrics) -> Response:
    return 200, CONTENT_TYPE_LATEST, metrics.render()
