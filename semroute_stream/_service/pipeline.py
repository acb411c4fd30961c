"""The service: consume → micro-batch → encode → decide → LLM worker → outcome → commit.

This module composes the pieces; each piece lives in its own module (``_encoder``, ``_decision``
via ``_router``, ``_llm``, ``_records``, ``_kafka``). Delivery is at-least-once: an offset is
committed only when every message below it has its outcome (response or dead letter)
acknowledged by the broker (``acks=all``, idempotent producer).

Operations (see docs/operations.md): Prometheus metrics (``_observe.Metrics``, one registry per
pipeline), ``/livez`` and ``/readyz`` (:meth:`Pipeline.readiness`), hot reload of the routes file
between batches (:meth:`Pipeline.reload_routes`), bounded replay of offset ranges
(:meth:`Pipeline.replay`, used by ``_replay``) and optional OpenTelemetry spans (``_tracing``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError, KafkaTimeoutError
from aiokafka.structs import ConsumerRecord, OffsetAndMetadata
from threadpoolctl import threadpool_limits

from .._encoder import Encoder
from .._errors import (
    CircuitOpenError,
    ConfigError,
    InputError,
    LLMError,
    LLMPermanentError,
    LLMRetryableError,
)
from .._input import Query, parse_input
from .._routing.router import Router
from .._routing.schema import RoutesConfig, load_routes, routes_version
from .kafka import CommitTracker, make_consumer, make_producer, make_transactional_producer
from .llm import LLMPool, LLMResult, resolve_api_keys
from .observe import CIRCUIT_STATES, HttpServer, Metrics, Response, metrics_response
from .records import Source, dead_letter_record, outcome_record
from .settings import Settings
from .tracing import Tracer, make_tracer
from .transactions import OutRecord, PartitionFenced, PartitionTransactions

log = logging.getLogger("semroute_stream")

_POLL_MS = 200  # how long one fetch waits for the first message of a batch
_KEEPALIVE_S = 1.0  # while paused, how often to call getmany so the group keeps us
_LOGGED_TEXT_CHARS = 1000  # with logging.log_message_text, at most this much of a message

# Where outcome records go: (topic, value, source, headers) -> returns once durably written.
Sink = Callable[[str, bytes, Source, list[tuple[str, bytes]]], Awaitable[None]]


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

    Built by :func:`open_service`; tests may build it directly with their own clients. ``sink``
    replaces the producer as the place outcome records go (replay to a file).
    """

    def __init__(
        self,
        settings: Settings,
        router: Router,
        encode: Callable[[list[str]], Any],
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer | None,
        llm: LLMPool | None,
        targets: dict[str, Target],
        *,
        metrics: Metrics | None = None,
        tracer: Tracer | None = None,
        sink: Sink | None = None,
        transactions: PartitionTransactions | None = None,
    ) -> None:
        self.settings = settings
        self.router = router
        self._encode = encode
        self._consumer = consumer
        self._producer = producer
        self._llm = llm
        self._targets = targets
        self.metrics = metrics or Metrics()
        self.metrics.routes.info({"version": router.version})
        self._tracer = tracer or Tracer()
        self._sink = sink
        # exactly_once: finished records wait here, per partition, for their transaction
        self._txns = transactions
        self._unpublished: dict[TopicPartition, list[tuple[int, OutRecord, Callable[[], None]]]]
        self._unpublished = {}
        self.http: HttpServer | None = None  # set by open_service when it serves HTTP
        self.stats = RunStats()
        self._tracker = CommitTracker()
        self._assigned: set[TopicPartition] = set()
        self._revocations = 0  # bumped by every revocation: batches fetched before are stale
        self._tasks: set[asyncio.Task[None]] = set()
        self._tasks_of: dict[TopicPartition, set[asyncio.Task[None]]] = {}  # by partition
        self._endpoint_load: Counter[str] = Counter()
        self._stopping = asyncio.Event()
        self._commit_wanted = asyncio.Event()
        self._reload_wanted = asyncio.Event()
        self._progress = asyncio.Condition()  # notified whenever a message finishes
        self._batch_lock = asyncio.Lock()  # held from fetch result to dispatch
        self._commit_lock = asyncio.Lock()
        self._paused = False
        self._fatal: BaseException | None = None
        # readiness: when the group first gave us partitions, last fetch with records, last finish
        self._assigned_at: float | None = None
        self._last_records = 0.0
        self._last_finish = 0.0
        self._routes_stamp: tuple[int, int, int] | None = None
        # replay: the end offset of each partition, those that reached it, and whether all did
        self._replay_start: dict[TopicPartition, int] = {}
        self._replay_end: dict[TopicPartition, int] | None = None
        self._on_progress: Callable[[int], None] | None = None
        self._finished: set[TopicPartition] = set()
        self._replay_complete = False

    # ---- control -------------------------------------------------------------------------

    def request_stop(self, reason: str = "stop requested") -> None:
        """Stop consuming; in-flight work drains (bounded by ``flow.drain_timeout_s``)."""
        if not self._stopping.is_set():
            self.stats.stopped_by = reason
            log.info("stopping: %s", reason)
            self._stopping.set()

    def request_reload(self) -> None:
        """Check the routes file now (what SIGHUP does)."""
        self._reload_wanted.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def in_flight(self) -> int:
        return self._tracker.in_flight()

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def consumer(self) -> AIOKafkaConsumer:
        return self._consumer

    async def run(
        self, *, max_messages: int | None = None, idle_timeout_s: float | None = None
    ) -> RunStats:
        """Consume until stopped, ``max_messages`` taken, or ``idle_timeout_s`` without input."""
        self._consumer.subscribe([self.settings.input.topic], listener=_Listener(self))
        watcher = asyncio.create_task(self._watch_routes(), name="semroute-routes-watch")
        try:
            return await self._run(max_messages, idle_timeout_s)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def replay(
        self,
        ranges: dict[TopicPartition, tuple[int, int]],
        on_progress: Callable[[int], None] | None = None,
    ) -> RunStats:
        """Process offsets ``[start, end)`` of each partition, wait for every outcome, stop.

        Manual assignment (no group membership, no rebalances); offsets are committed to the
        consumer's own group as usual. ``on_progress(n)`` gets the offsets covered so far.
        """
        self._replay_start = {tp: start for tp, (start, _) in ranges.items()}
        self._replay_end = {tp: end for tp, (_, end) in ranges.items()}
        self._on_progress = on_progress
        if not ranges:
            self._replay_complete = True
            self.request_stop("replay: nothing between the start and end offsets")
            return self.stats
        self._consumer.assign(list(ranges))
        for tp, (start, _) in ranges.items():
            self._consumer.seek(tp, start)
        self.on_assigned(set(ranges))
        return await self._run(None, None)

    async def _run(self, max_messages: int | None, idle_timeout_s: float | None) -> RunStats:
        committer = asyncio.create_task(self._commit_loop(), name="semroute-commit")
        try:
            await self._consume(max_messages, idle_timeout_s)
        finally:
            self._stopping.set()
            drain = None if self._replay_complete else self.settings.flow.drain_timeout_s
            await self._drain(drain)
            # Never cancel the committer inside a commit: a transaction cancelled while it
            # commits leaves its producer unusable for the final commit. Bounded: with the
            # broker gone a commit would wait without end (then nothing more is committed and
            # the uncommitted work is redelivered).
            idle = False
            with contextlib.suppress(TimeoutError):
                idle = await asyncio.wait_for(self._commit_lock.acquire(), _CLIENT_STOP_S)
            committer.cancel()
            if idle:
                self._commit_lock.release()
            with contextlib.suppress(asyncio.CancelledError):
                await committer
            if not idle:
                log.warning(
                    "a commit was still running at shutdown: uncommitted work is redelivered"
                )
            else:
                try:  # bounded, like the wait for the lock
                    await asyncio.wait_for(self._commit(), _CLIENT_STOP_S)
                except (KafkaError, TimeoutError) as err:
                    log.warning("final commit failed (%r): uncommitted work is redelivered", err)
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
            generation = self._revocations
            batch = await self._next_batch()
            if max_messages is not None:
                batch = batch[: max_messages - self.stats.consumed]
            if batch:
                last_input = loop.time()
                async with self._batch_lock:
                    # A rebalance while this batch was being fetched reset the positions of the
                    # partitions we kept to their committed offsets: the batch comes again.
                    if generation == self._revocations:
                        await self._process(batch)
            if self._replay_end is not None:
                await self._replay_check()
            elif max_messages is not None and self.stats.consumed >= max_messages:
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
        self._last_records = time.time()
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
            self._consumer.resume(*(self._assigned - self._finished))
            log.info("backpressure released: %d in flight", self.in_flight)

    def _over_capacity(self) -> bool:
        flow = self.settings.flow
        if self.in_flight >= flow.max_in_flight:
            return True
        return any(n >= flow.max_in_flight_per_endpoint for n in self._endpoint_load.values())

    async def _replay_check(self) -> None:
        """Pause the partitions that reached their end offset; stop when all have."""
        assert self._replay_end is not None
        covered = 0
        for tp, end in self._replay_end.items():
            position = await self._consumer.position(tp)
            if position >= end and tp not in self._finished:
                self._finished.add(tp)
                self._consumer.pause(tp)
            covered += min(position, end) - self._replay_start[tp]
        if self._on_progress is not None:
            self._on_progress(covered)
        if len(self._finished) == len(self._replay_end):
            self._replay_complete = True  # the drain then waits for every outcome
            self.request_stop("replay reached its end offsets")

    # ---- processing ----------------------------------------------------------------------

    def _wanted(self, rec: ConsumerRecord[bytes, bytes]) -> bool:
        tp = TopicPartition(rec.topic, rec.partition)
        if tp not in self._assigned:
            return False
        return self._replay_end is None or rec.offset < self._replay_end[tp]

    async def _process(self, batch: list[ConsumerRecord[bytes, bytes]]) -> None:
        batch = [r for r in batch if self._wanted(r)]
        if not batch:
            return
        received = time.time()
        self.stats.batches += 1
        self.metrics.batch_size.observe(len(batch))
        inp = self.settings.input
        attributes = {
            **_MESSAGING,
            "messaging.destination.name": inp.topic,
            "messaging.consumer.group.name": inp.group_id,
            "messaging.operation.type": "process",
            "messaging.batch.message_count": len(batch),
        }
        # Tasks spawned in this span inherit it: per-message spans are its children.
        with self._tracer.span(f"process {inp.topic}", attributes, kind="consumer"):
            await self._route_batch(batch, received)

    async def _route_batch(
        self, batch: list[ConsumerRecord[bytes, bytes]], received: float
    ) -> None:
        """Parse, encode and decide one batch, then hand each message to its worker task."""
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
            self.metrics.consumed.inc()
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
                extra = {**_coords(src), "kind": err.kind, **self._text(rec.value)}
                log.warning(
                    "dead letter %s (%s): %s",
                    src.idempotency_key,
                    err.kind,
                    err.reason,
                    extra=extra,
                )
                value = dead_letter_record(
                    src, rec.value, kind=err.kind, reason=err.reason, stage="parse"
                )
                self._spawn(
                    self._publish_outcome(src, self._dlq, value, received=received, kind=err.kind),
                    src,
                )
                continue
            good.append((src, query, rec))
        if not good:
            return
        t0 = time.perf_counter()
        with self._tracer.span("encode", {"messaging.batch.message_count": len(good)}):
            texts = [q.text for _, q, _ in good]
            embeddings = await asyncio.to_thread(self._encode, texts)
        t1 = time.perf_counter()
        # One router (and its targets) decides the whole batch, even if a reload swaps it.
        router, targets = self.router, self._targets
        with self._tracer.span("decide", {"semroute.routes_version": router.version}):
            decisions = router.decide(embeddings, texts)
        t2 = time.perf_counter()
        self.metrics.encode_seconds.observe(t1 - t0)
        self.metrics.decide_seconds.observe(t2 - t1)
        shared = {"encode": (t1 - t0) * 1000, "decide": (t2 - t1) * 1000}
        for i, (src, query, rec) in enumerate(good):
            explanation = decisions.explain(i, router.table)
            explanation["routes_version"] = router.version
            explanation["model"] = router.encoder.model_name
            queue_ms = max(0.0, received * 1000 - rec.timestamp) if rec.timestamp else 0.0
            timings = {"queue": queue_ms, **shared}
            target = targets.get(str(explanation["route"]))
            self._spawn(
                self._handle(src, query, rec.value, explanation, timings, received, target),
                src,
            )

    def _spawn(self, coro: Awaitable[None], src: Source) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        tp = TopicPartition(src.topic, src.partition)
        self._tasks_of.setdefault(tp, set()).add(task)
        task.add_done_callback(lambda t: self._task_done(t, src))

    def _task_done(self, task: asyncio.Task[None], src: Source) -> None:
        self._tasks.discard(task)
        self._tasks_of.get(TopicPartition(src.topic, src.partition), set()).discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("fatal error in a worker task: %r", exc, extra=_coords(src))
            if self._fatal is None:
                self._fatal = exc
            self.request_stop(f"fatal error: {exc!r}")

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

    async def _handle(
        self,
        src: Source,
        query: Query,
        raw: bytes | None,
        decision: dict[str, Any],
        timings: dict[str, float],
        received: float,
        target: Target | None,
    ) -> None:
        """Answer one routed message (LLM call or not) and publish its outcome, in one span."""
        attributes = {
            **_MESSAGING,
            "messaging.destination.name": src.topic,
            "messaging.destination.partition.id": str(src.partition),
            "messaging.kafka.offset": src.offset,
            "messaging.operation.type": "process",
            "semroute.route": str(decision["route"]),
        }
        with self._tracer.span(f"process {src.topic}", attributes, kind="consumer"):
            route = str(decision["route"])
            fallback = bool(decision["is_fallback"])
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
                        with self._tracer.span(
                            f"llm {endpoint}", {"semroute.endpoint": endpoint}, kind="client"
                        ):
                            result = await self._call_llm(target, query.text, src.idempotency_key)
                    except LLMError as err:
                        kind = _llm_error_kind(err)
                        extra = {
                            **_coords(src),
                            "kind": kind,
                            "route": route,
                            "endpoint": endpoint,
                            **self._text(query.text),
                        }
                        log.warning(
                            "dead letter %s (%s): %s",
                            src.idempotency_key,
                            kind,
                            self._loggable(err),
                            extra=extra,
                        )
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
                        await self._publish_outcome(
                            src, output.dlq_topic, value, received=received, route=route, kind=kind
                        )
                        return
                    finally:
                        self.metrics.llm_seconds.labels(endpoint).observe(time.perf_counter() - t0)
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
                await self._publish_outcome(
                    src,
                    output.topic_for(route),
                    value,
                    received=received,
                    route=route,
                    fallback=fallback,
                )
            finally:
                if endpoint is not None:
                    self._endpoint_load[endpoint] -= 1

    async def _call_llm(self, target: Target, text: str, key: str) -> LLMResult:
        """One LLM call; while the endpoint's breaker is open, wait for it rather than fail.

        A call whose retries ran out goes to the DLQ while the endpoint is otherwise healthy
        (breaker closed); once the breaker has opened (an outage), it waits for the endpoint
        like every other call. The wait is bounded by ``flow.circuit_open_max_wait_s``.
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
            except LLMRetryableError:
                outage = self._llm.breaker_state(target.endpoint) != "closed"
                if not outage or loop.time() >= deadline:
                    raise

    # ---- publishing and committing -------------------------------------------------------

    async def _publish_outcome(
        self,
        src: Source,
        topic: str,
        value: bytes,
        *,
        received: float,
        route: str | None = None,
        kind: str | None = None,
        fallback: bool = False,
    ) -> None:
        """Write one outcome record (a dead letter when ``kind`` is set) and wait for the
        broker's ack, then mark the offset done.

        In ``exactly_once`` delivery the record is only queued here: the commit loop writes it
        with its partition's offset in one transaction (see ``_commit``). A send that fails or
        is cancelled (drain timeout, revoked partition) leaves the offset unfinished, so it is
        never committed past: the message is redelivered.
        """
        headers = list(src.headers)
        headers.append(("semroute-status", b"error" if kind is not None else b"ok"))
        if route is not None:
            headers.append(("semroute-route", route.encode()))

        def published() -> None:
            self._count_outcome(received, route=route, kind=kind, fallback=fallback)

        if self._txns is not None:
            tp = TopicPartition(src.topic, src.partition)
            record = OutRecord(topic, value, src.key, headers)
            self._unpublished.setdefault(tp, []).append((src.offset, record, published))
        else:
            attributes = {
                **_MESSAGING,
                "messaging.destination.name": topic,
                "messaging.operation.type": "send",
            }
            with self._tracer.span(f"send {topic}", attributes, kind="producer"):
                await self._send(topic, value, src, headers)
            published()
        self._tracker.finish(TopicPartition(src.topic, src.partition), src.offset)
        self._last_finish = time.time()
        self._commit_wanted.set()
        async with self._progress:
            self._progress.notify_all()

    def _count_outcome(
        self, received: float, *, route: str | None, kind: str | None, fallback: bool
    ) -> None:
        self.metrics.end_to_end_seconds.observe(time.time() - received)
        if kind is not None:
            self.stats.dead_letters += 1
            self.stats.errors[kind] += 1
            self.metrics.dead_letters.labels(kind).inc()
        else:
            self.stats.outcomes += 1
            if route is not None:
                self.stats.routes[route] += 1
                self.metrics.routed.labels(route).inc()
            if fallback:
                self.metrics.fallback.inc()

    @property
    def _dlq(self) -> str:
        return self.settings.output.dlq_topic

    async def _send(
        self, topic: str, value: bytes, src: Source, headers: list[tuple[str, bytes]]
    ) -> None:
        """Send until acknowledged; retriable broker errors are retried without end."""
        if self._sink is not None:
            await self._sink(topic, value, src, headers)
            return
        assert self._producer is not None
        delay = 0.1
        while True:
            try:
                fut = await self._producer.send(topic, value, key=src.key, headers=headers)
                await fut
                return
            except (KafkaTimeoutError, KafkaError) as err:
                if not (isinstance(err, KafkaTimeoutError) or getattr(err, "retriable", False)):
                    raise
                log.warning(
                    "publish to %s failed (%r); retrying in %.1fs",
                    topic,
                    err,
                    delay,
                    extra=_coords(src),
                )
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
            if self._txns is None:
                commit = {tp: OffsetAndMetadata(o, "") for tp, o in offsets.items()}
                await self._consumer.commit(commit)
            else:
                done = await asyncio.gather(*(self._transact(tp, o) for tp, o in offsets.items()))
                fenced = {tp for tp, ok in zip(offsets, done, strict=True) if not ok}
                if fenced:  # another instance owns them now: drop our state, write nothing more
                    self._assigned -= fenced
                    self._tracker.forget(fenced)
                    for tp in fenced:
                        self._unpublished.pop(tp, None)
                    offsets = {tp: o for tp, o in offsets.items() if tp not in fenced}
            self._tracker.mark_committed(offsets)
            self.stats.commits += 1

    async def _transact(self, tp: TopicPartition, next_offset: int) -> bool:
        """exactly_once: write the finished records below ``next_offset`` with that offset.

        False when the partition's transactional id was fenced by a newer owner."""
        assert self._txns is not None
        queued = self._unpublished.get(tp, [])
        ready = [entry for entry in queued if entry[0] < next_offset]
        self._unpublished[tp] = [entry for entry in queued if entry[0] >= next_offset]
        try:
            with self._tracer.span(
                "transaction", {**_MESSAGING, "messaging.batch.message_count": len(ready)}
            ):
                await self._txns.publish(tp, [record for _, record, _ in ready], next_offset)
        except PartitionFenced as err:
            log.warning("%s: not committed here, its new owner redoes it (%s)", tp, err)
            return False
        for _, _, published in ready:
            published()
        return True

    async def _drain(self, timeout: float | None) -> None:
        """Wait for in-flight work to finish (bounded); what does not finish is redelivered."""
        if not self._tasks:
            return
        log.info("draining %d in-flight messages (up to %ss)", self.in_flight, timeout)
        async with self._progress:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    # the tracker, not the task set: a task leaves the set only after its
                    # last notify, so waiting on the set would sleep out the whole timeout
                    self._progress.wait_for(
                        lambda: self._tracker.in_flight() == 0 or self._fatal is not None
                    ),
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
        self._revocations += 1
        async with self._batch_lock:  # no batch is half-dispatched past this point
            async with self._progress:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._progress.wait_for(
                            lambda: all(self._tracker.in_flight(tp) == 0 for tp in revoked)
                        ),
                        self.settings.flow.rebalance_drain_timeout_s,
                    )
            # What did not finish in time is cancelled (never committed): the new owner redoes it.
            stale = [t for tp in revoked for t in self._tasks_of.pop(tp, set())]
            for task in stale:
                task.cancel()
            await asyncio.gather(*stale, return_exceptions=True)
            try:
                await self._commit(only=revoked)
            except KafkaError as err:
                log.warning("commit on revoke failed (%r): the new owner redoes the rest", err)
            self._tracker.forget(revoked)
            for tp in revoked:
                self._unpublished.pop(tp, None)
            if self._txns is not None:
                await self._txns.release(revoked)
        log.info("partitions revoked: %s", sorted(str(tp) for tp in revoked))

    def on_assigned(self, assigned: set[TopicPartition]) -> None:
        self._assigned |= assigned
        self._assigned_at = time.time()
        if self._txns is not None:
            self._txns.assign(assigned)
        if self._paused and assigned:
            self._consumer.pause(*assigned)
        log.info("partitions assigned: %s", sorted(str(tp) for tp in assigned))

    # ---- hot reload of the routes --------------------------------------------------------

    async def _watch_routes(self) -> None:
        """Reload when the routes file's mtime/size/inode changes, or on request (SIGHUP)."""
        interval = self.settings.reload.watch_interval_s or None  # 0: on request only
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reload_wanted.wait(), interval)
            forced = self._reload_wanted.is_set()
            self._reload_wanted.clear()
            stamp = _stamp(self.settings.routes)
            if forced or stamp != self._routes_stamp:
                self._routes_stamp = stamp
                await self.reload_routes()

    async def reload_routes(self) -> bool:
        """Load, validate and embed the routes file, then swap it in between two batches.

        Returns whether a new version went live. A file that fails (bad YAML, bad schema, an
        endpoint the config lacks) is rejected with one log line; the routes in use stay.
        """
        path = self.settings.routes
        current = self.router.version
        try:
            routes = await asyncio.to_thread(load_routes, path)
            version = routes_version(routes)
            if version == current:
                log.debug("routes file %s checked: version %s unchanged", path, version)
                return False
            targets = route_targets(routes, self.settings) if self._llm is not None else {}
            router = await asyncio.to_thread(Router, routes, self.router.encoder)
        except Exception as err:  # whatever is wrong with the new file, the service goes on
            self.metrics.reloads.labels("rejected").inc()
            log.error(
                "routes reload rejected, keeping version %s: %s",
                current,
                " | ".join(line.strip() for line in str(err).splitlines() if line.strip()),
                extra={"routes_file": str(path)},
            )
            return False
        async with self._batch_lock:  # between batches
            self.router, self._targets = router, targets
        self.metrics.routes.info({"version": router.version})
        self.metrics.reloads.labels("applied").inc()
        log.info(
            "routes reloaded: version %s -> %s (%d routes)",
            current,
            router.version,
            len(routes.routes),
            extra={"routes_file": str(path)},
        )
        return True

    # ---- health and gauges ---------------------------------------------------------------

    async def lags(self) -> dict[TopicPartition, int]:
        """Per assigned partition: last stable offset (or high watermark) minus position.

        Partitions with no fetch response yet (end unknown) are left out.
        """

        async def one(tp: TopicPartition) -> tuple[TopicPartition, int] | None:
            try:
                end = self._consumer.last_stable_offset(tp)
                if end is None or end < 0:
                    end = self._consumer.highwater(tp)
                if end is None:
                    return None
                position = await asyncio.wait_for(self._consumer.position(tp), 0.5)
            except (KafkaError, AssertionError, TimeoutError):  # unassigned meanwhile, resetting
                return None
            return tp, max(0, end - position)

        found = await asyncio.gather(*(one(tp) for tp in sorted(self._assigned)))
        return dict(item for item in found if item is not None)

    async def readiness(self) -> tuple[bool, str]:
        """Ready only while the consumer demonstrably makes progress; see docs/operations.md."""
        if self._stopping.is_set():
            return False, "draining"
        if self._assigned_at is None:
            return False, "waiting for the group to assign partitions"
        now = time.time()
        stall = self.settings.observability.stall_timeout_s
        if self._paused:  # backpressure: progress means messages finishing
            idle = now - max(self._last_finish, self._assigned_at)
            if self.in_flight and idle > stall:
                return False, f"paused by backpressure and no message finished for {idle:.0f}s"
            return True, "ready (paused by backpressure)"
        if not self._assigned:  # fine while other members own every partition
            if not self._consumer.partitions_for_topic(self.settings.input.topic):
                return False, f"input topic {self.settings.input.topic!r} not found"
            return True, "ready (no partitions assigned to this member)"
        polls = []
        for tp in self._assigned:
            with contextlib.suppress(AssertionError):
                polls.append(self._consumer.last_poll_timestamp(tp) or 0)
        last_fetch = max([p / 1000 for p in polls] + [self._assigned_at])
        if now - last_fetch > stall:
            return False, f"no fetch response from the broker for {now - last_fetch:.0f}s"
        behind = sum((await self.lags()).values())
        idle = now - max(self._last_records, self._assigned_at)
        if behind and idle > stall:
            return False, f"{behind} messages behind but nothing fetched for {idle:.0f}s"
        return True, "ready"

    async def refresh_gauges(self) -> None:
        """Set the point-in-time gauges (called on each scrape)."""
        m = self.metrics
        m.in_flight.set(self.in_flight)
        m.paused.set(1 if self._paused else 0)
        if self._llm is not None:
            for endpoint in self._llm.endpoints:
                m.endpoint_in_flight.labels(endpoint).set(self._endpoint_load[endpoint])
                m.circuit_state.labels(endpoint).set(
                    CIRCUIT_STATES[self._llm.breaker_state(endpoint)]
                )
        lags = await self.lags()
        m.lag.clear()  # partitions no longer assigned disappear
        for tp, lag in lags.items():
            m.lag.labels(tp.topic, str(tp.partition)).set(lag)

    async def _metrics_response(self) -> Response:
        await self.refresh_gauges()
        return metrics_response(self.metrics)

    async def _livez(self) -> Response:
        return 200, "text/plain; charset=utf-8", b"ok\n"

    async def _readyz(self) -> Response:
        ready, why = await self.readiness()
        return (200 if ready else 503), "text/plain; charset=utf-8", f"{why}\n".encode()


_MESSAGING = {"messaging.system": "kafka"}


def _coords(src: Source) -> dict[str, Any]:
    """The message coordinates every log line about one message carries."""
    return {"topic": src.topic, "partition": src.partition, "offset": src.offset}


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def _llm_error_kind(err: LLMError) -> str:
    if isinstance(err, CircuitOpenError):
        return "llm_circuit_open"
    if isinstance(err, LLMRetryableError):
        return "llm_retries_exhausted"
    return "llm_rejected"


_CLIENT_STOP_S = 30.0


async def _stop_within(stop: Callable[[], Awaitable[None]], what: str) -> None:
    """Stop a Kafka client, but not forever: with the broker gone for good, aiokafka's flush
    and leave-group wait without end. Nothing acknowledged is lost by giving up: what was not
    acknowledged was not committed either, and is redelivered."""
    try:
        await asyncio.wait_for(stop(), _CLIENT_STOP_S)
    except TimeoutError:
        log.error("the %s did not stop within %.0fs (broker unreachable?)", what, _CLIENT_STOP_S)


@contextlib.asynccontextmanager
async def open_service(
    settings: Settings,
    *,
    llm_transport: Any = None,
    group_id: str | None = None,
    sink: Sink | None = None,
    serve_http: bool = True,
) -> AsyncIterator[Pipeline]:
    """Build a pipeline with started clients (and the HTTP server when the config asks for it).

    ``group_id`` replaces the config's (replay); with a ``sink`` no producer is made.
    Everything is stopped and closed on exit.
    """
    routes = load_routes(settings.routes)
    targets = route_targets(routes, settings) if settings.mode == "llm" else {}
    api_keys = resolve_api_keys(settings.endpoints) if settings.mode == "llm" else {}
    tracer = make_tracer(settings.tracing)
    encoder = await asyncio.to_thread(Encoder, settings.encoder)
    router = await asyncio.to_thread(Router, routes, encoder)
    consumer = make_consumer(settings, group_id=group_id)
    exactly_once = settings.delivery == "exactly_once" and sink is None
    producer = make_producer(settings) if sink is None and not exactly_once else None
    transactions = (
        PartitionTransactions(
            group_id or settings.input.group_id,
            lambda txn_id: make_transactional_producer(settings, txn_id),
            consumer.committed,
        )
        if exactly_once
        else None
    )
    llm = (
        LLMPool(settings.endpoints, transport=llm_transport, api_keys=api_keys)
        if settings.mode == "llm"
        else None
    )
    pipeline = Pipeline(
        settings,
        router,
        encoder.encode,
        consumer,
        producer,
        llm,
        targets,
        tracer=tracer,
        sink=sink,
        transactions=transactions,
    )
    obs = settings.observability
    async with contextlib.AsyncExitStack() as stack:
        # The decision's small matmuls run on the event loop: multi-threaded BLAS makes them
        # 5-30x slower under load and its spinning threads take CPU from the encoder.
        stack.enter_context(threadpool_limits(limits=1, user_api="blas"))
        # Registered before anything can fail (e.g. the metrics port is taken): stopping a
        # client that never started is harmless, leaving it unclosed is not.
        stack.push_async_callback(_stop_within, consumer.stop, "consumer")
        if producer is not None:
            stack.push_async_callback(_stop_within, producer.stop, "producer")
        stack.callback(tracer.shutdown)
        if llm is not None:
            stack.push_async_callback(llm.aclose)
        if serve_http and obs.metrics_port is not None:
            server = HttpServer(
                obs.host,
                obs.metrics_port,
                {
                    "/metrics": pipeline._metrics_response,
                    "/livez": pipeline._livez,
                    "/readyz": pipeline._readyz,
                },
            )
            await server.start()
            stack.push_async_callback(server.stop)
            pipeline.http = server
        if producer is not None:
            await producer.start()
        await consumer.start()
        if transactions is not None:
            # before the consumer stops
            stack.push_async_callback(_stop_within, transactions.close, "transactional producers")
        yield pipeline


@contextlib.contextmanager
def signal_handlers(pipeline: Pipeline) -> Iterator[None]:
    """SIGTERM/SIGINT: stop and drain, a second one cancels at once; SIGHUP: reload routes."""
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()

    def on_signal(sig: signal.Signals) -> None:
        if sig == signal.SIGHUP:
            log.info("SIGHUP: checking the routes file")
            pipeline.request_reload()
        elif pipeline.stopping:
            log.warning("second %s: exiting now without draining", sig.name)
            if main is not None:
                main.cancel()
        else:
            pipeline.request_stop(f"signal {sig.name}")

    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        yield
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


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
    everything at once (uncommitted work is redelivered on the next start). SIGHUP reloads the
    routes file.
    """
    async with open_service(settings, llm_transport=llm_transport) as pipeline:
        with signal_handlers(pipeline) if handle_signals else contextlib.nullcontext():
            log.info(
                "starting: topic=%s group=%s mode=%s routes=%s (version %s)",
                settings.input.topic,
                settings.input.group_id,
                settings.mode,
                settings.routes,
                pipeline.router.version,
            )
            return await pipeline.run(max_messages=max_messages, idle_timeout_s=idle_timeout_s)
