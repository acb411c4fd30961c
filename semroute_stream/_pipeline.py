"""The service: consume → micro-batch → encode → decide → LLM worker → outcome → commit.

This module composes the pieces; each piece lives in its own module (``_encoder``, ``_decision``
via ``_router``, ``_llm``, ``_records``, ``_kafka``). Delivery is at-least-once: an offset is
committed only when every message below it has its outcome (response or dead letter)
acknowledged by the broker (``acks=all``, idempotent producer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError, KafkaTimeoutError
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata

from ._encoder import Encoder
from ._errors import CircuitOpenError, ConfigError, InputError, LLMError, LLMRetryableError
from ._kafka import CommitTracker, make_consumer, make_producer
from ._llm import LLMPool, LLMResult, resolve_api_keys
from ._records import Query, Source, dead_letter_record, outcome_record, parse_input
from ._router import Router
from ._routes import RoutesConfig, load_routes
from ._settings import Settings

log = logging.getLogger("semroute_stream")

_POLL_MS = 200  # how long one fetch waits for the first message of a batch
_KEEPALIVE_S = 1.0  # while paused, how often to call getmany so the group keeps us


@dataclass(frozen=True)
class Target:
    """Where one route's queries go in LLM mode."""

    endpoint: str
    model: str | None
    system_prompt: str | None


@dataclass
class RunStats:
    """What one run did. Returned by :func:`run_service` (and printed by the CLI)."""

    consumed: int = 0
    outcomes: int = 0
    dead_letters: int = 0
    routes: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    batches: int = 0
    pauses: int = 0
    commits: int = 0
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
            "stopped_by": self.stopped_by,
        }


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


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._pipeline.on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._pipeline.on_assigned(set(assigned))


class Pipeline:
    """One running router: owns the consumer, the producer and the in-flight work.

    Built by :func:`run_service`; tests may build it directly with their own clients.
    """

    def __init__(
        self,
        settings: Settings,
        router: Router,
        encode: Callable[[list[str]], Any],
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
        llm: LLMPool | None,
        targets: dict[str, Target],
    ) -> None:
        self.settings = settings
        self.router = router
        self._encode = encode
        self._consumer = consumer
        self._producer = producer
        self._llm = llm
        self._targets = targets
        self.stats = RunStats()
        self._tracker = CommitTracker()
        self._assigned: set[TopicPartition] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._endpoint_load: Counter[str] = Counter()
        self._stopping = asyncio.Event()
        self._commit_wanted = asyncio.Event()
        self._progress = asyncio.Condition()  # notified whenever a message finishes
        self._batch_lock = asyncio.Lock()  # held from fetch result to dispatch
        self._commit_lock = asyncio.Lock()
        self._paused = False
        self._fatal: BaseException | None = None

    # ---- control -------------------------------------------------------------------------

    def request_stop(self, reason: str = "stop requested") -> None:
        """Stop consuming; in-flight work drains (bounded by ``flow.drain_timeout_s``)."""
        if not self._stopping.is_set():
            self.stats.stopped_by = reason
            log.info("stopping: %s", reason)
            self._stopping.set()

    @property
    def in_flight(self) -> int:
        return self._tracker.in_flight()

    @property
    def paused(self) -> bool:
        return self._paused

    async def run(
        self, *, max_messages: int | None = None, idle_timeout_s: float | None = None
    ) -> RunStats:
        """Consume until stopped, ``max_messages`` taken, or ``idle_timeout_s`` without input."""
        self._consumer.subscribe([self.settings.input.topic], listener=_Listener(self))
        committer = asyncio.create_task(self._commit_loop(), name="semroute-commit")
        try:
            await self._consume(max_messages, idle_timeout_s)
        finally:
            self._stopping.set()
            await self._drain(self.settings.flow.drain_timeout_s)
            committer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await committer
            with contextlib.suppress(KafkaError):
                await self._commit()
        if self._fatal is not None:
            raise self._fatal
        return self.stats

    # ---- consuming -----------------------------------------------------------------------

    async def _consume(self, max_messages: int | None, idle_timeout_s: float | None) -> None:
        loop = asyncio.get_running_loop()
        last_input = loop.time()
        while not self._stopping.is_set():
            await self._wait_for_capacity()
            if self._stopping.is_set():
                break
            batch = await self._next_batch()
            if max_messages is not None:
                batch = batch[: max_messages - self.stats.consumed]
            if batch:
                last_input = loop.time()
                async with self._batch_lock:
                    await self._process(batch)
            if max_messages is not None and self.stats.consumed >= max_messages:
                self.request_stop(f"max_messages={max_messages} reached")
            elif idle_timeout_s is not None and loop.time() - last_input >= idle_timeout_s:
                self.request_stop(f"no input for {idle_timeout_s:g}s")

    async def _next_batch(self) -> list[ConsumerRecord[bytes, bytes]]:
        """Up to ``batching.max_size`` records, waiting at most ``linger_ms`` after the first.

        Never more than ``flow.max_in_flight`` minus what is in flight, so that bound is strict.
        """
        room = self.settings.flow.max_in_flight - self.in_flight
        size = max(1, min(self.settings.batching.max_size, room))
        linger = self.settings.batching.linger_ms / 1000
        got = await self._consumer.getmany(timeout_ms=_POLL_MS, max_records=size)
        records = [r for recs in got.values() for r in recs]
        if not records:
            return records
        loop = asyncio.get_running_loop()
        deadline = loop.time() + linger
        while len(records) < size and not self._stopping.is_set():
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            more = await self._consumer.getmany(
                timeout_ms=max(1, int(remaining * 1000)), max_records=size - len(records)
            )
            if not more:
                break
            records.extend(r for recs in more.values() for r in recs)
        return records

    async def _wait_for_capacity(self) -> None:
        """Backpressure: pause every partition while too much is in flight; stay in the group."""
        if not self._over_capacity():
            return
        self._paused = True
        self.stats.pauses += 1
        self._consumer.pause(*self._assigned)
        log.info("backpressure: %d messages in flight, partitions paused", self.in_flight)
        try:
            while self._over_capacity() and not self._stopping.is_set():
                async with self._progress:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(
                            self._progress.wait_for(
                                lambda: not self._over_capacity() or self._stopping.is_set()
                            ),
                            _KEEPALIVE_S,
                        )
                # A fetch on paused partitions returns nothing but tells the group we are alive.
                await self._consumer.getmany(timeout_ms=0)
        finally:
            self._paused = False
            self._consumer.resume(*self._assigned)
            log.info("backpressure released: %d in flight", self.in_flight)

    def _over_capacity(self) -> bool:
        flow = self.settings.flow
        if self.in_flight >= flow.max_in_flight:
            return True
        return any(n >= flow.max_in_flight_per_endpoint for n in self._endpoint_load.values())

    # ---- processing ----------------------------------------------------------------------

    async def _process(self, batch: list[ConsumerRecord[bytes, bytes]]) -> None:
        batch = [r for r in batch if TopicPartition(r.topic, r.partition) in self._assigned]
        if not batch:
            return
        received = time.time()
        self.stats.batches += 1
        inp = self.settings.input
        good: list[tuple[Source, Query, ConsumerRecord[bytes, bytes]]] = []
        for rec in batch:
            src = Source(
                topic=rec.topic,
                partition=rec.partition,
                offset=rec.offset,
                timestamp_ms=rec.timestamp,
                key=rec.key,
                headers=tuple((k, v) for k, v in rec.headers),
            )
            self._tracker.start(TopicPartition(rec.topic, rec.partition), rec.offset)
            self.stats.consumed += 1
            try:
                query = parse_input(
                    rec.value,
                    format=inp.format,
                    text_field=inp.text_field,
                    id_field=inp.id_field,
                    max_bytes=inp.max_message_bytes,
                    max_chars=inp.max_text_chars,
                )
            except InputError as err:
                log.warning("dead letter %s (%s): %s", src.idempotency_key, err.kind, err.reason)
                value = dead_letter_record(
                    src, rec.value, kind=err.kind, reason=err.reason, stage="parse"
                )
                self._spawn(self._publish_outcome(src, self.settings.output.dlq_topic, value))
                continue
            good.append((src, query, rec))
        if not good:
            return
        t0 = time.perf_counter()
        embeddings = await asyncio.to_thread(self._encode, [q.text for _, q, _ in good])
        t1 = time.perf_counter()
        decisions = self.router.decide(embeddings)
        t2 = time.perf_counter()
        shared = {"encode": (t1 - t0) * 1000, "decide": (t2 - t1) * 1000}
        for i, (src, query, rec) in enumerate(good):
            explanation = decisions.explain(i, self.router.table)
            explanation["routes_version"] = self.router.version
            explanation["model"] = self.router.encoder.model_name
            queue_ms = max(0.0, received * 1000 - rec.timestamp) if rec.timestamp else 0.0
            timings = {"queue": queue_ms, **shared}
            self._spawn(self._handle(src, query, rec.value, explanation, timings, received))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("fatal error in a worker task: %r", exc)
            if self._fatal is None:
                self._fatal = exc
            self.request_stop(f"fatal error: {exc!r}")

    async def _handle(
        self,
        src: Source,
        query: Query,
        raw: bytes | None,
        decision: dict[str, Any],
        timings: dict[str, float],
        received: float,
    ) -> None:
        route = str(decision["route"])
        target = self._targets.get(route)
        endpoint = target.endpoint if (target and self._llm) else None
        output = self.settings.output
        if endpoint is not None:
            self._endpoint_load[endpoint] += 1
        try:
            response: dict[str, Any] | None = None
            llm_model = None
            if endpoint is not None and target is not None:
                t0 = time.perf_counter()
                try:
                    result = await self._call_llm(target, query.text, src.idempotency_key)
                except LLMError as err:
                    kind = _llm_error_kind(err)
                    log.warning("dead letter %s (%s): %s", src.idempotency_key, kind, err)
                    value = dead_letter_record(
                        src,
                        raw,
                        kind=kind,
                        reason=str(err),
                        stage="llm",
                        query=query,
                        decision=decision,
                        endpoint=endpoint,
                    )
                    await self._publish_outcome(src, output.dlq_topic, value, route=route)
                    return
                timings["llm"] = (time.perf_counter() - t0) * 1000
                llm_model = result.model
                response = {
                    "content": result.content,
                    "finish_reason": result.finish_reason,
                    "usage": result.usage,
                    "attempts": result.attempts,
                }
            timings["total"] = (time.time() - received) * 1000
            value = outcome_record(
                src,
                query,
                decision=decision,
                endpoint=endpoint,
                llm_model=llm_model,
                response=response,
                timings_ms=timings,
            )
            await self._publish_outcome(src, output.topic_for(route), value, route=route)
        finally:
            if endpoint is not None:
                self._endpoint_load[endpoint] -= 1

    async def _call_llm(self, target: Target, text: str, key: str) -> LLMResult:
        """One LLM call; while the endpoint's breaker is open, wait for it rather than fail.

        The wait is bounded by ``flow.circuit_open_max_wait_s``; then the message goes to the DLQ.
        """
        assert self._llm is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.flow.circuit_open_max_wait_s
        while True:
            try:
                return await self._llm.complete(
                    target.endpoint,
                    text,
                    system_prompt=target.system_prompt,
                    model=target.model,
                    idempotency_key=key,
                )
            except CircuitOpenError as err:
                wait = min(max(err.retry_after, 0.05), deadline - loop.time())
                if wait <= 0:
                    raise  # on shutdown the drain timeout cancels us first: redelivered
                await asyncio.sleep(wait)

    # ---- publishing and committing -------------------------------------------------------

    async def _publish_outcome(
        self, src: Source, topic: str, value: bytes, *, route: str | None = None
    ) -> None:
        """Write one outcome record and wait for the broker's ack, then mark the offset done."""
        try:
            headers = list(src.headers)
            headers.append(("semroute-status", b"error" if topic == self._dlq else b"ok"))
            if route is not None:
                headers.append(("semroute-route", route.encode()))
            await self._send(topic, value, src.key, headers)
            if topic == self._dlq:
                self.stats.dead_letters += 1
            else:
                self.stats.outcomes += 1
                if route is not None:
                    self.stats.routes[route] += 1
        finally:
            tp = TopicPartition(src.topic, src.partition)
            self._tracker.finish(tp, src.offset)
            self._commit_wanted.set()
            async with self._progress:
                self._progress.notify_all()

    @property
    def _dlq(self) -> str:
        return self.settings.output.dlq_topic

    async def _send(
        self, topic: str, value: bytes, key: bytes | None, headers: list[tuple[str, bytes]]
    ) -> None:
        """Send until acknowledged; retriable broker errors are retried without end."""
        delay = 0.1
        while True:
            try:
                fut = await self._producer.send(topic, value, key=key, headers=headers)
                await fut
                return
            except (KafkaTimeoutError, KafkaError) as err:
                if not (isinstance(err, KafkaTimeoutError) or getattr(err, "retriable", False)):
                    raise
                log.warning("publish to %s failed (%r); retrying in %.1fs", topic, err, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _commit_loop(self) -> None:
        interval = self.settings.flow.commit_interval_ms / 1000
        while True:
            await self._commit_wanted.wait()
            self._commit_wanted.clear()
            try:
                await self._commit()
            except KafkaError as err:  # e.g. a rebalance in progress: try again later
                log.info("commit deferred: %r", err)
                self._commit_wanted.set()
            await asyncio.sleep(interval)

    async def _commit(self, only: set[TopicPartition] | None = None) -> None:
        async with self._commit_lock:
            scope = self._assigned if only is None else only
            offsets = {tp: o for tp, o in self._tracker.committable().items() if tp in scope}
            if not offsets:
                return
            await self._consumer.commit({tp: OffsetAndMetadata(o, "") for tp, o in offsets.items()})
            self._tracker.mark_committed(offsets)
            self.stats.commits += 1

    async def _drain(self, timeout: float) -> None:
        """Wait for in-flight work to finish (bounded); what does not finish is redelivered."""
        if not self._tasks:
            return
        log.info("draining %d in-flight messages (up to %.1fs)", self.in_flight, timeout)
        async with self._progress:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._progress.wait_for(lambda: not self._tasks or self._fatal is not None),
                    timeout,
                )
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ---- rebalancing ---------------------------------------------------------------------

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Stop taking work for ``revoked``, let its in-flight work finish (bounded), commit."""
        self._assigned -= revoked
        if not revoked:
            return
        async with self._batch_lock:  # no batch is half-dispatched past this point
            async with self._progress:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._progress.wait_for(
                            lambda: all(self._tracker.in_flight(tp) == 0 for tp in revoked)
                        ),
                        self.settings.flow.rebalance_drain_timeout_s,
                    )
            try:
                await self._commit(only=revoked)
            except KafkaError as err:
                log.warning("commit on revoke failed (%r): the new owner redoes the rest", err)
            self._tracker.forget(revoked)
        log.info("partitions revoked: %s", sorted(str(tp) for tp in revoked))

    def on_assigned(self, assigned: set[TopicPartition]) -> None:
        self._assigned |= assigned
        if self._paused and assigned:
            self._consumer.pause(*assigned)
        log.info("partitions assigned: %s", sorted(str(tp) for tp in assigned))


def _llm_error_kind(err: LLMError) -> str:
    if isinstance(err, CircuitOpenError):
        return "llm_circuit_open"
    if isinstance(err, LLMRetryableError):
        return "llm_retries_exhausted"
    return "llm_rejected"


async def run_service(
    settings: Settings,
    *,
    max_messages: int | None = None,
    idle_timeout_s: float | None = None,
    handle_signals: bool = True,
    llm_transport: Any = None,
) -> RunStats:
    """Run the router until it is stopped (signal, ``max_messages`` or ``idle_timeout_s``).

    The first SIGTERM/SIGINT stops consuming and drains in-flight work; a second one cancels
    everything at once (uncommitted work is redelivered on the next start).
    """
    routes = load_routes(settings.routes)
    targets = route_targets(routes, settings) if settings.mode == "llm" else {}
    api_keys = resolve_api_keys(settings.endpoints) if settings.mode == "llm" else {}
    encoder = await asyncio.to_thread(Encoder, settings.encoder)
    router = await asyncio.to_thread(Router, routes, encoder)
    consumer = make_consumer(settings)
    producer = make_producer(settings)
    llm = (
        LLMPool(settings.endpoints, transport=llm_transport, api_keys=api_keys)
        if settings.mode == "llm"
        else None
    )
    pipeline = Pipeline(settings, router, encoder.encode, consumer, producer, llm, targets)
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    signals = (signal.SIGTERM, signal.SIGINT)

    def on_signal(sig: signal.Signals) -> None:
        if pipeline._stopping.is_set():
            log.warning("second %s: exiting now without draining", sig.name)
            if main is not None:
                main.cancel()
        else:
            pipeline.request_stop(f"signal {sig.name}")

    if handle_signals:
        for sig in signals:
            loop.add_signal_handler(sig, on_signal, sig)
    log.info(
        "starting: topic=%s group=%s mode=%s routes=%s (version %s)",
        settings.input.topic,
        settings.input.group_id,
        settings.mode,
        settings.routes,
        router.version,
    )
    try:
        await producer.start()
        try:
            await consumer.start()
            try:
                return await pipeline.run(max_messages=max_messages, idle_timeout_s=idle_timeout_s)
            finally:
                await consumer.stop()
        finally:
            await producer.stop()
            if llm is not None:
                await llm.aclose()
    finally:
        if handle_signals:
            for sig in signals:
                loop.remove_signal_handler(sig)
