"""The consume loop: fetch → micro-batch → parse → encode → decide → dispatch; backpressure,
drain and rebalance.

Everything else is a collaborator with one job (wired by :mod:`.app`):

* :class:`~.reload.LiveRoutes`: the router and targets in use, and their hot reload;
* :class:`~.worker.Worker`: a routed query → its :class:`~.records.Outcome` (LLM call or not);
* :class:`~.delivery.Outbox`: outcomes out, offsets committed only past durable outcomes;
* :class:`~.audit.Audit`: review records, shadow decisions, decision-quality metrics;
* :class:`~.bounds.RunBounds`: when a run stops by itself (count, idle timeout, replay end);
* :class:`~.health.Health`: readiness, lag and gauges; :class:`~.observe.Observer`: stats,
  metrics and spans.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeAlias

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import ConsumerRecord

from .._errors import InputError
from .._input import Query
from .._routing.router import Router
from .audit import Audit
from .bounds import RunBounds
from .delivery import RECORD_ERRORS, ExactlyOnceOutbox, Outbox
from .health import Activity, Health
from .intake import decided, hold_retries, read_query, unparked
from .observe import HttpServer, Metrics, Observer, RunStats
from .records import Outcome, Source, coords
from .reload import LiveRoutes
from .settings import Settings
from .tasks import PartitionTasks
from .tracing import MESSAGING
from .worker import Routed, Target, Worker

if TYPE_CHECKING:
    from .learning import Learner

__all__ = ["Pipeline"]

log = logging.getLogger("semroute_stream")

_POLL_MS = 200  # how long one fetch waits for the first message of a batch
_KEEPALIVE_S = 1.0  # while paused, how often to call getmany so the group keeps us

Record: TypeAlias = "ConsumerRecord[bytes, bytes]"


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._pipeline.on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._pipeline.on_assigned(set(assigned))
        await self._pipeline.prepare(set(assigned))


class Pipeline:
    """One running router: consumes, dispatches, and hands outcomes to its outbox.

    Built by :func:`~.app.open_service`; tests may build it with their own consumer, outbox
    (e.g. an in-memory one) and worker. ``targets`` maps routes to endpoints in ``llm`` mode.
    """

    def __init__(
        self,
        settings: Settings,
        router: Router,
        consumer: AIOKafkaConsumer,
        outbox: Outbox,
        worker: Worker,
        *,
        targets: dict[str, Target] | None = None,
        observer: Observer | None = None,
        audit: Audit | None = None,
    ) -> None:
        self.settings = settings
        self.observer = observer or Observer()
        self.audit = audit or Audit(settings, self.observer.metrics)
        self.worker = worker
        self.routes = LiveRoutes(
            settings,
            router,
            targets or {},
            llm=worker.llm is not None,
            metrics=self.observer.metrics,
        )
        self.health = Health(self)
        self.learner: Learner | None = None  # learning from corrections (set by open_service)
        self.activity = Activity()
        self._consumer = consumer
        self._outbox = outbox
        outbox.on_lost = self._lost
        outbox.on_stall = self._stall
        if isinstance(outbox, ExactlyOnceOutbox):  # a refused record: its minimal dead letter
            outbox.on_refused = self.worker.unpublishable
        self._assigned: set[TopicPartition] = set()
        self._revocations = 0  # bumped by every revocation: records fetched before are stale
        self._tasks = PartitionTasks(self._task_done)
        self._stopping = asyncio.Event()
        self._progress = asyncio.Condition()  # notified whenever a message finishes
        self._fatal: BaseException | None = None
        self._bounds = RunBounds()

    # ---- control and state ----------------------------------------------------------------

    def request_stop(self, reason: str = "stop requested") -> None:
        """Stop consuming; in-flight work drains (bounded by ``flow.drain_timeout_s``)."""
        if not self._stopping.is_set():
            self.stats.stopped_by = reason
            log.info("stopping: %s", reason)
            self._stopping.set()

    def request_reload(self) -> None:
        """Check the routes file now (what SIGHUP does)."""
        self.routes.request()

    async def reload_routes(self) -> bool:
        """Reload the routes file now; whether a new version went live."""
        return await self.routes.reload()

    async def readiness(self) -> tuple[bool, str]:
        return await self.health.readiness()

    @property
    def router(self) -> Router:
        return self.routes.router

    @property
    def stats(self) -> RunStats:
        return self.observer.stats

    @property
    def metrics(self) -> Metrics:
        return self.observer.metrics

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def in_flight(self) -> int:
        return self._outbox.in_flight()

    @property
    def paused(self) -> bool:
        return self.activity.paused

    @property
    def http(self) -> HttpServer | None:
        """The ``/metrics``, ``/livez``, ``/readyz`` server, when :func:`open_service` serves."""
        return self.health.http

    @property
    def consumer(self) -> AIOKafkaConsumer:
        return self._consumer

    @property
    def assigned(self) -> frozenset[TopicPartition]:
        return frozenset(self._assigned)

    # ---- running --------------------------------------------------------------------------

    async def run(
        self, *, max_messages: int | None = None, idle_timeout_s: float | None = None
    ) -> RunStats:
        """Consume until stopped, ``max_messages`` taken, or ``idle_timeout_s`` without input."""
        topics = [self.settings.input.topic, *self.settings.retry_topics()]
        self._consumer.subscribe(topics, listener=_Listener(self))
        watcher = asyncio.create_task(self.routes.watch(), name="semroute-routes-watch")
        try:
            return await self._run(
                RunBounds(max_messages=max_messages, idle_timeout_s=idle_timeout_s)
            )
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
        bounds = RunBounds(replay=ranges, on_progress=on_progress)
        if not ranges:
            self._bounds = bounds
            self.request_stop("replay: nothing between the start and end offsets")
            return self.stats
        self._consumer.assign(list(ranges))
        for tp, (start, _) in ranges.items():
            self._consumer.seek(tp, start)
        self.on_assigned(set(ranges))
        await self.prepare(set(ranges))
        return await self._run(bounds)

    async def _run(self, bounds: RunBounds) -> RunStats:
        self._bounds = bounds
        self._outbox.start()
        try:
            await self._consume()
        finally:
            self._stopping.set()
            await self._drain(None if bounds.complete else self.settings.flow.drain_timeout_s)
            await self._outbox.stop()
        if self._fatal is not None:
            raise self._fatal
        return self.stats

    async def _consume(self) -> None:
        while not self._stopping.is_set():
            await self._wait_for_capacity()
            if self._stopping.is_set():
                break
            hold_retries(
                self.settings, self.worker.llm, self._consumer, self._assigned, self.activity
            )
            records, generation = await self._next_batch()
            batch = self._bounds.cut(records, self.stats.consumed)
            if batch:
                async with self.routes.lock:
                    # A revocation since the batch was fetched reset the positions of the
                    # partitions we kept to their committed offsets: the batch comes again.
                    if generation == self._revocations:
                        await self.dispatch(batch)
            reason = await self._bounds.stop_reason(self._consumer, self.stats.consumed)
            if reason is not None:
                self.request_stop(reason)

    async def _next_batch(self) -> tuple[list[Record], int]:
        """Up to ``batching.max_size`` records, waiting at most ``linger_ms`` after the first,
        and the revocation generation they belong to.

        Never more than ``flow.max_in_flight`` minus what is in flight, so that bound is strict.

        The generation is read when the records come out of ``getmany``, not before the call:
        aiokafka never returns records of a previous assignment (a ``getmany`` running across a
        rebalance waits for the new assignment), so a ``getmany`` that began before a
        revocation returns records of the new assignment, whose positions have already moved
        past them. Dropping those as stale would skip them, and the commit of a later offset
        of the partition would then pass them without an outcome. Records fetched before a
        revocation that comes during the linger are dropped here (they come again).
        """
        room = self.settings.flow.max_in_flight - self.in_flight
        size = max(1, min(self.settings.batching.max_size, room))
        got = await self._consumer.getmany(timeout_ms=_POLL_MS, max_records=size)
        generation = self._revocations
        records = [r for recs in got.values() for r in recs]
        if not records:
            return records, generation
        self.activity.last_records = time.time()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.batching.linger_ms / 1000
        while len(records) < size and not self._stopping.is_set():
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            more = await self._consumer.getmany(
                timeout_ms=max(1, int(remaining * 1000)), max_records=size - len(records)
            )
            if not more:
                break
            if generation != self._revocations:  # the records before are of the old assignment
                records, generation = [], self._revocations
            records.extend(r for recs in more.values() for r in recs)
        return records, generation

    # ---- backpressure -----------------------------------------------------------------------

    async def _wait_for_capacity(self) -> None:
        """Backpressure: pause every partition while too much is in flight; stay in the group."""
        if not self._over_capacity():
            return
        self.activity.paused = True
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
            self.activity.paused = False
            held = self._bounds.finished | set(self.activity.stalled) | self.activity.held
            self._consumer.resume(*(self._assigned - held))
            # Paused, the input was not taken, not missing: the idle clock starts again, or a
            # pause longer than the idle timeout would end the run with records waiting.
            self._bounds.touch()
            log.info("backpressure released: %d in flight", self.in_flight)

    def _over_capacity(self) -> bool:
        flow = self.settings.flow
        if self.in_flight + self._outbox.backlog() >= flow.max_in_flight:
            return True
        load = self.worker.endpoint_load.values()
        return any(n >= flow.max_in_flight_per_endpoint for n in load)

    # ---- dispatch ---------------------------------------------------------------------------

    async def dispatch(self, batch: list[Record]) -> None:
        """Parse, encode and decide one batch (in one span), then give each message its task."""
        batch = [r for r in batch if self._wanted(r)]
        if not batch:
            return
        received = time.time()
        self.stats.batches += 1
        self.metrics.batch_size.observe(len(batch))
        inp = self.settings.input
        attributes = {
            **MESSAGING,
            "messaging.destination.name": inp.topic,
            "messaging.consumer.group.name": inp.group_id,
            "messaging.operation.type": "process",
            "messaging.batch.message_count": len(batch),
        }
        # Tasks spawned in this span inherit it: per-message spans are its children.
        with self.observer.tracer.span(f"process {inp.topic}", attributes, kind="consumer"):
            good = self._parse(batch, received)
            if good:
                await self._decide(good, received)

    def _wanted(self, rec: Record) -> bool:
        return TopicPartition(rec.topic, rec.partition) in self._assigned and self._bounds.wanted(
            rec
        )

    def _parse(self, batch: list[Record], received: float) -> list[tuple[Source, Query, Record]]:
        """Track every record; dead-letter those that do not parse; return the others."""
        inp = self.settings.input
        good = []
        retries = self.settings.retry_topics()
        for rec in batch:
            src = Source.of(rec)
            self._outbox.track(TopicPartition(rec.topic, rec.partition), rec.offset)
            self.stats.consumed += 1
            self.metrics.consumed.inc()
            if rec.topic in retries:
                self._unpark(src, rec.value, received)
                continue
            try:
                query = read_query(inp, src, rec.value)
            except InputError as err:
                outcome = self.worker.rejected(src, rec.value, err, received)
                self._tasks.spawn(self._deliver(outcome), src)
                continue
            good.append((src, query, rec))
        return good

    def _unpark(self, at: Source, value: bytes | None, received: float) -> None:
        """A parked message back from its retry topic: answered with its parked decision."""
        try:
            routed = unparked(self.settings, self.routes, at, value, received)
        except InputError as err:
            self._tasks.spawn(self._deliver(self.worker.rejected(at, value, err, received)), at)
            return
        self._tasks.spawn(self._handle(routed), at)

    async def _decide(self, good: list[tuple[Source, Query, Record]], received: float) -> None:
        """Encode and decide the parsed messages in one call each; spawn their tasks."""
        tracer = self.observer.tracer
        # One router (and its targets) decides the whole batch, even if a reload swaps it.
        router, targets = self.routes.router, self.routes.targets
        if self.routes.record_limit is not None:
            self.worker.record_limit = self.routes.record_limit
        t0 = time.perf_counter()
        with tracer.span("encode", {"messaging.batch.message_count": len(good)}):
            texts = [q.text for _, q, _ in good]
            embeddings = await asyncio.to_thread(router.encoder.encode, texts)
        t1 = time.perf_counter()
        with tracer.span("decide", {"semroute.routes_version": router.version}):
            decisions = router.decide(embeddings, texts)
        t2 = time.perf_counter()
        self.metrics.encode_seconds.observe(t1 - t0)
        self.metrics.decide_seconds.observe(t2 - t1)
        shared = {"encode": (t1 - t0) * 1000, "decide": (t2 - t1) * 1000}
        batch = [
            decided(router, decisions, i, targets, src, query, rec.value, received)
            for i, (src, query, rec) in enumerate(good)
        ]
        # quality metrics; review and shadow records, which ride with the outcomes
        batch = self.audit.batch(
            router, decisions, embeddings, texts, batch, self.worker.record_limit
        )
        for routed in batch:
            routed.timings.update(shared)
            self._tasks.spawn(self._handle(routed), routed.src)

    async def _handle(self, routed: Routed) -> None:
        """Answer one routed message and deliver its outcome, in one span."""
        src = routed.src
        attributes = {
            **MESSAGING,
            "messaging.destination.name": src.topic,
            "messaging.destination.partition.id": str(src.partition),
            "messaging.kafka.offset": src.offset,
            "messaging.operation.type": "process",
            "semroute.route": routed.route,
        }
        span = self.observer.tracer.span(f"process {src.topic}", attributes, kind="consumer")
        with span, self.worker.occupying(routed):
            try:
                outcome = await self.worker.answer(routed)
            except Exception as err:  # one message's failure is that message's dead letter
                outcome = self.worker.failed(routed, err)
            if routed.extras:
                outcome = dataclasses.replace(outcome, extras=routed.extras)
            await self._deliver(outcome)

    async def _deliver(self, outcome: Outcome) -> None:
        """The one way out for responses and dead letters alike. An outcome the broker refuses
        as a record (too large, an invalid topic) becomes a minimal dead letter instead."""
        try:
            await self._outbox.publish(outcome)
        except RECORD_ERRORS as err:
            if outcome.kind == "unpublishable":
                raise  # even the minimal dead letter was refused: the DLQ itself is broken
            await self._outbox.publish(self.worker.unpublishable(outcome, err))
        self.activity.last_finish = time.time()
        async with self._progress:
            self._progress.notify_all()

    def _task_done(self, task: asyncio.Task[None], src: Source) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("fatal error in a worker task: %r", exc, extra=coords(src))
            if self._fatal is None:
                self._fatal = exc
            self.request_stop(f"fatal error: {exc!r}")

    async def _drain(self, timeout: float | None) -> None:
        """Wait for in-flight work to finish (bounded); what does not finish is redelivered."""
        if not self._tasks:
            return
        log.info("draining %d in-flight messages (up to %ss)", self.in_flight, timeout)
        async with self._progress:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    # the outbox's count, not the task set: a task leaves the set only after its
                    # last notify, so waiting on the set would sleep out the whole timeout
                    self._progress.wait_for(
                        lambda: self._outbox.in_flight() == 0 or self._fatal is not None
                    ),
                    timeout,
                )
        await self._tasks.cancel()

    # ---- rebalancing ------------------------------------------------------------------------

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Stop taking work for ``revoked``, let its in-flight work finish (bounded), commit."""
        self._assigned -= revoked
        self.activity.held -= revoked
        if not revoked:
            return
        self._outbox.unassign(revoked)
        self._revocations += 1
        async with self.routes.lock:  # no batch is half-dispatched past this point
            async with self._progress:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._progress.wait_for(
                            lambda: all(self._outbox.in_flight(tp) == 0 for tp in revoked)
                        ),
                        self.settings.flow.rebalance_drain_timeout_s,
                    )
            # What did not finish in time is cancelled (never committed): the new owner redoes it.
            await self._tasks.cancel(revoked)
            await self._outbox.revoke(revoked)
        log.info("partitions revoked: %s", sorted(str(tp) for tp in revoked))

    def on_assigned(self, assigned: set[TopicPartition]) -> None:
        self._assigned |= assigned
        # aiokafka gives every assigned partition a fresh, unpaused state: a retry partition
        # held before is not any more, and hold_retries pauses it again if it must.
        self.activity.held -= assigned
        self.activity.assigned_at = time.time()
        self._bounds.touch()
        self._outbox.assign(assigned)
        if self.activity.paused and assigned:
            self._consumer.pause(*assigned)
        log.info("partitions assigned: %s", sorted(str(tp) for tp in assigned))

    async def prepare(self, assigned: set[TopicPartition]) -> None:
        """Before the first record of newly assigned partitions: let the outbox get ready
        (exactly-once: start their transactional producers, fencing any previous owner)."""
        await self._outbox.prepare(assigned)

    def _stall(self, tp: TopicPartition, reason: str | None) -> None:
        """The outbox cannot write ``tp``'s outcomes for now (``reason``) or can again."""
        if reason is not None:
            self.activity.stalled[tp] = reason
            if tp in self._assigned:
                self._consumer.pause(tp)
            return
        was = self.activity.stalled.pop(tp, None)
        if was is not None and tp in self._assigned and not self.activity.paused:
            self._consumer.resume(tp)

    def _lost(self, tps: set[TopicPartition]) -> None:
        """Partitions another instance took over (exactly-once fencing): no more work here."""
        self._assigned -= tps
