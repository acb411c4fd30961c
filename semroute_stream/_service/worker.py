"""The worker: turns one routed query into its :class:`Outcome` (a response or a dead letter).

In ``llm`` mode it calls the route's endpoint (waiting while the endpoint's breaker is open);
in ``route_only`` mode the outcome is the decision alone. Messages that did not parse get their
dead letter from :meth:`Worker.rejected`. Either way the pipeline hands the outcome to the
outbox through one call, so responses and dead letters leave by the same path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .._errors import (
    CircuitOpenError,
    ConfigError,
    InputError,
    LLMError,
    LLMMisconfiguredError,
    LLMPermanentError,
    LLMRetryableError,
)
from .._input import Query
from .._routing.schema import RoutesConfig
from .llm import LLMPool, LLMResult
from .observe import Observer
from .records import (
    RECORD_OVERHEAD_BYTES,
    Outcome,
    OutRecord,
    Source,
    coords,
    dead_letter_record,
    envelope_bytes,
    outcome_record,
    parked_record,
)
from .settings import Settings

__all__ = ["Routed", "Target", "Worker", "route_targets"]

log = logging.getLogger("semroute_stream")

# Dead letters of these kinds do not copy the input's key and headers back into Kafka: they
# were the problem, or (unpublishable) the broker refused the record that carried them.
_NO_COPY_KINDS = frozenset(
    {
        "oversized_key",
        "too_many_headers",
        "oversized_headers",
        "undecodable_header_key",
        "unpublishable",
    }
)

_LOGGED_TEXT_CHARS = 1000  # with logging.log_message_text, at most this much of a message


@dataclass(frozen=True)
class Target:
    """Where one route's queries go in LLM mode."""

    endpoint: str
    model: str | None
    system_prompt: str | None


@dataclass(frozen=True)
class Routed:
    """One parsed message with its decision, ready for its worker."""

    src: Source
    query: Query
    raw: bytes | None  # the original value, for a dead letter
    decision: dict[str, Any]  # the explanation written into the outcome record
    route: str
    is_fallback: bool
    target: Target | None  # None in route_only mode
    timings: dict[str, float]  # ms: queue, encode, decide (llm and total are added)
    received: float  # wall clock when its batch was fetched
    consumed: Source | None = None  # a parked message: the retry-topic record it came from
    parked_at_ms: int | None = None  # a parked message: when it was first parked
    times_parked: int = 0
    extras: tuple[OutRecord, ...] = ()  # records that ride with its outcome (see audit.py)


class _Park(Exception):
    """The endpoint has been unavailable for ``flow.park_after_s``: park the message."""


def route_targets(routes: RoutesConfig, settings: Settings) -> dict[str, Target]:
    """Map every route (and the fallback) to its endpoint; fail fast on unknown endpoints."""
    targets: dict[str, Target] = {}
    problems: list[str] = []
    entries: list[tuple[str, Any]] = [(r.name, r) for r in routes.routes]
    entries.append((routes.fallback.name, routes.fallback))
    for name, entry in entries:
        if entry.endpoint is None:
            problems.append(f"route {name!r}: endpoint: required in llm mode")
        elif entry.endpoint not in settings.endpoints:
            known = ", ".join(sorted(settings.endpoints)) or "none defined"
            problems.append(
                f"route {name!r}: endpoint: {entry.endpoint!r} is not defined in the "
                f"service config's endpoints ({known})"
            )
        else:
            targets[name] = Target(entry.endpoint, entry.model, entry.system_prompt)
    if problems:
        raise ConfigError("\n".join(problems), file=str(settings.routes))
    return targets


class Worker:
    """Answers routed queries. ``llm`` is None in ``route_only`` mode."""

    def __init__(
        self,
        settings: Settings,
        llm: LLMPool | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.settings = settings
        self.llm = llm
        self._observer = observer or Observer()
        self.endpoint_load: Counter[str] = Counter()  # messages per endpoint, in flight
        #: The largest JSON value an output record may have (set from the topics at start-up).
        self.record_limit = settings.output.max_record_bytes - RECORD_OVERHEAD_BYTES

    def endpoint_of(self, routed: Routed) -> str | None:
        return routed.target.endpoint if (routed.target and self.llm) else None

    @contextlib.contextmanager
    def occupying(self, routed: Routed) -> Iterator[None]:
        """Count the message against its endpoint's in-flight bound while it is handled."""
        endpoint = self.endpoint_of(routed)
        if endpoint is not None:
            self.endpoint_load[endpoint] += 1
        try:
            yield
        finally:
            if endpoint is not None:
                self.endpoint_load[endpoint] -= 1

    def _limit(self, src: Source, copy_envelope: bool = True) -> int:
        return self.record_limit - (envelope_bytes(src) if copy_envelope else 0)

    def _timestamp(self, src: Source) -> int | None:
        stamp = src.timestamp_ms
        if self.settings.output.timestamps == "input" and stamp is not None and stamp > 0:
            return stamp
        return None

    def _dead_letter(
        self,
        src: Source,
        raw: bytes | None,
        received: float,
        kind: str,
        consumed: Source | None = None,
        route: str | None = None,
        **fields: Any,
    ) -> Outcome:
        copy = kind not in _NO_COPY_KINDS
        value = dead_letter_record(
            src,
            raw,
            kind=kind,
            limit=self._limit(src, copy),
            # a key that is not UTF-8 is kept in the JSON (base64), not as a Kafka header
            copy_envelope=copy or kind == "undecodable_header_key",
            **fields,
        )
        decision = fields.get("decision")
        if route is None and decision:
            route = decision["route"]
        return Outcome(
            src,
            self.settings.output.dlq_topic,
            value,
            received,
            route,
            kind=kind,
            copy_envelope=copy,
            timestamp_ms=self._timestamp(src),
            consumed=consumed,
        )

    def rejected(self, src: Source, raw: bytes | None, err: InputError, received: float) -> Outcome:
        """The dead letter of a message that did not parse (stage ``parse``)."""
        extra = {**coords(src), "kind": err.kind, **self._text(raw)}
        log.warning(
            "dead letter %s (%s): %s", src.idempotency_key, err.kind, err.reason, extra=extra
        )
        return self._dead_letter(src, raw, received, err.kind, reason=err.reason, stage="parse")

    def failed(self, routed: Routed, err: Exception) -> Outcome:
        """The dead letter of a message whose handling failed unexpectedly (stage ``handle``):
        a bug or a hostile record costs one dead letter, never the service."""
        src = routed.src
        log.error(
            "dead letter %s (internal_error): %r",
            src.idempotency_key,
            err,
            extra=coords(src),
            exc_info=err,
        )
        return self._dead_letter(
            src,
            routed.raw,
            routed.received,
            "internal_error",
            routed.consumed,
            reason=repr(err),
            stage="handle",
            query=routed.query,
            decision=routed.decision,
        )

    def unpublishable(self, outcome: Outcome, err: Exception) -> Outcome:
        """A minimal dead letter for an outcome the broker refused as a record (stage
        ``publish``): no copy of the input, only its coordinates."""
        src = outcome.src
        log.error(
            "dead letter %s (unpublishable): %s refused the record: %r",
            src.idempotency_key,
            outcome.topic,
            err,
            extra=coords(src),
        )
        return self._dead_letter(
            src,
            None,
            outcome.received,
            "unpublishable",
            outcome.consumed,
            route=outcome.route,
            reason=f"{outcome.topic}: {err!r}",
            stage="publish",
        )

    async def answer(self, routed: Routed) -> Outcome:
        """The outcome of one routed query: the LLM's answer, the decision alone, or the dead
        letter of an LLM call that failed."""
        endpoint = self.endpoint_of(routed)
        response: dict[str, Any] | None = None
        llm_model = None
        timings = dict(routed.timings)  # Routed stays as it was made
        if endpoint is not None:
            if self._must_park(endpoint, waited=0.0):
                return self.park(routed, endpoint)
            t0 = time.perf_counter()
            try:
                with self._observer.tracer.span(
                    f"llm {endpoint}", {"semroute.endpoint": endpoint}, kind="client"
                ):
                    result = await self._call(routed)
            except _Park:
                return self.park(routed, endpoint)
            except LLMError as err:
                return self._llm_failed(routed, endpoint, err)
            finally:
                seconds = time.perf_counter() - t0
                self._observer.metrics.llm_seconds.labels(endpoint).observe(seconds)
            timings["llm"] = (time.perf_counter() - t0) * 1000
            llm_model = result.model
            response = {
                "content": result.content,
                "finish_reason": result.finish_reason,
                "usage": result.usage,
                "attempts": result.attempts,
            }
        timings["total"] = (time.time() - routed.received) * 1000
        src = routed.src
        value = outcome_record(
            src,
            routed.query,
            decision=routed.decision,
            endpoint=endpoint,
            llm_model=llm_model,
            response=response,
            timings_ms=timings,
            raw=routed.raw,
            limit=self._limit(src),
        )
        topic = self.settings.output.topic_for(routed.route)
        return Outcome(
            src,
            topic,
            value,
            routed.received,
            routed.route,
            fallback=routed.is_fallback,
            timestamp_ms=self._timestamp(src),
            consumed=routed.consumed,
        )

    def _must_park(self, endpoint: str, *, waited: float) -> bool:
        park_after = self.settings.flow.park_after_s
        if park_after is None or self.llm is None:
            return False
        if waited >= park_after:
            return True
        # Parked at once only while the breaker is open: half-open, a trial call must get
        # through, or the endpoint could never be seen to work again.
        down = self.llm.breaker_state(endpoint) == "open"
        return down and self.llm.unavailable_for(endpoint) >= park_after

    def park(self, routed: Routed, endpoint: str) -> Outcome:
        """Not an answer yet: the message goes, with its decision, to the endpoint's retry
        topic (durably, like an outcome, so its offset moves on); it comes back to the router
        from there and is answered once the endpoint works again."""
        src = routed.src
        now_ms = int(time.time() * 1000)
        value = parked_record(
            src,
            routed.raw,
            decision=routed.decision,
            route=routed.route,
            endpoint=endpoint,
            parked_at_ms=routed.parked_at_ms or now_ms,
            times=routed.times_parked + 1,
        )
        if routed.times_parked == 0:
            log.warning(
                "parked %s on %s: endpoint %s unavailable",
                src.idempotency_key,
                self.settings.retry_topic(endpoint),
                endpoint,
                extra=coords(src),
            )
        return Outcome(
            src,
            self.settings.retry_topic(endpoint),
            value,
            routed.received,
            routed.route,
            timestamp_ms=self._timestamp(src),
            parked=True,
            consumed=routed.consumed,
        )

    def _llm_failed(self, routed: Routed, endpoint: str, err: LLMError) -> Outcome:
        src = routed.src
        extra = {
            **coords(src),
            "kind": err.kind,
            "route": routed.route,
            "endpoint": endpoint,
            **self._text(routed.query.text),
        }
        log.warning(
            "dead letter %s (%s): %s",
            src.idempotency_key,
            err.kind,
            self._loggable(err),
            extra=extra,
        )
        return self._dead_letter(
            src,
            routed.raw,
            routed.received,
            err.kind,
            routed.consumed,
            reason=str(err),
            stage="llm",
            query=routed.query,
            decision=routed.decision,
            endpoint=endpoint,
        )

    async def _call(self, routed: Routed) -> LLMResult:
        """One LLM call; while the endpoint's breaker is open, wait for it rather than fail.

        A call whose retries ran out goes to the DLQ while the endpoint is otherwise healthy
        (breaker closed); once the breaker has opened (an outage), it waits for the endpoint
        like every other call. A misconfigured endpoint (401/403/404, not a chat completion)
        pauses the same way: its calls wait for someone to fix it instead of dead-lettering
        the stream. After ``flow.park_after_s`` of waiting the message is parked instead
        (``_Park``); without parking the wait is bounded by ``flow.circuit_open_max_wait_s``.
        """
        assert self.llm is not None and routed.target is not None
        target = routed.target
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self.settings.flow.circuit_open_max_wait_s
        while True:
            if self._must_park(target.endpoint, waited=loop.time() - started):
                raise _Park
            try:
                return await self.llm.complete(
                    target.endpoint,
                    routed.query.text,
                    system_prompt=target.system_prompt,
                    model=target.model,
                    idempotency_key=routed.src.idempotency_key,
                )
            except CircuitOpenError as err:
                wait = min(max(err.retry_after, 0.05), deadline - loop.time())
                if self.settings.flow.park_after_s is not None:  # wake up to park in time
                    wait = min(
                        wait, max(0.05, started + self.settings.flow.park_after_s - loop.time())
                    )
                if wait <= 0:
                    # on shutdown the drain timeout cancels us first: redelivered
                    why = self.llm.misconfigured().get(target.endpoint)
                    if why is not None:
                        raise LLMMisconfiguredError(why, endpoint=target.endpoint) from err
                    raise
                await asyncio.sleep(wait)
            except LLMMisconfiguredError:
                if loop.time() >= deadline:  # the endpoint is paused: wait for it to be fixed
                    raise
            except LLMRetryableError:
                outage = self.llm.breaker_state(target.endpoint) != "closed"
                if not outage or loop.time() >= deadline:
                    raise

    def _text(self, value: bytes | str | None) -> dict[str, str]:
        """``{"text": ...}`` for a log line's extras, only when the config allows message text."""
        if value is None or not self.settings.logging.log_message_text:
            return {}
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        return {"text": text[:_LOGGED_TEXT_CHARS]}

    def _loggable(self, err: LLMError) -> str:
        """The error for a log line: a permanent error's response body may echo the message."""
        if isinstance(err, LLMPermanentError) and not self.settings.logging.log_message_text:
            status = f"HTTP {err.status}" if err.status else "no status"
            return f"{err.endpoint}: rejected ({status}; the response is in the dead letter)"
        return str(err)
