"""The service assembled: clients, collaborators and the pipeline, started and stopped together.

:func:`open_service` is the one place the pieces are wired: settings → routes and router,
consumer, outbox (at-least-once through the producer or a ``sink``, or exactly-once through
per-partition transactional producers), worker (with the LLM pool in ``llm`` mode), observer
and the HTTP server for ``/metrics``, ``/livez`` and ``/readyz``. :func:`run_service` runs it
under signal handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from threadpoolctl import threadpool_limits

from .._encoder import Encoder
from .._routing.router import Router
from .._routing.schema import load_routes
from .audit import Audit
from .corrections import CorrectionsIntake
from .delivery import (
    CLIENT_STOP_S,
    AtLeastOnceOutbox,
    ExactlyOnceOutbox,
    Outbox,
    Send,
    producer_send,
)
from .kafka import make_consumer, make_producer, make_transactional_producer
from .learning import Learner, make_overlay_reader
from .llm import LLMPool, resolve_api_keys
from .observe import HttpServer, Observer, RunStats
from .pipeline import Pipeline
from .records import RECORD_OVERHEAD_BYTES
from .settings import Settings
from .shadow import ShadowRoutes
from .topics import (
    check_topic_names,
    ensure_learning_topics,
    ensure_output_topics,
    output_topics,
)
from .tracing import make_tracer
from .transactions import PartitionState, PartitionTransactions
from .worker import Worker, route_targets

__all__ = ["open_service", "run_service", "signal_handlers"]

log = logging.getLogger("semroute_stream")


async def _stop_within(stop: Callable[[], Awaitable[None]], what: str) -> None:
    """Stop a Kafka client, but not forever: with the broker gone for good, aiokafka's flush
    and leave-group wait without end. Nothing acknowledged is lost by giving up: what was not
    acknowledged was not committed either, and is redelivered."""
    try:
        await asyncio.wait_for(stop(), CLIENT_STOP_S)
    except TimeoutError:
        log.error("the %s did not stop within %.0fs (broker unreachable?)", what, CLIENT_STOP_S)


def _outbox(
    settings: Settings,
    consumer: AIOKafkaConsumer,
    observer: Observer,
    send: Send | None,
    group_id: str | None,
    batch_bytes: int | None,
) -> Outbox:
    interval = settings.flow.commit_interval_ms
    if send is None and settings.delivery == "exactly_once":
        heartbeat_s = max(settings.input.session_timeout_ms // 3, 100) / 1000

        async def still_ours(tp: TopicPartition) -> bool:
            """After a fence: a rebalance that gave ``tp`` to another member reaches us within
            a heartbeat or two (as a revocation); if none came, the broker aborted our
            transaction for taking too long, and the partition is still ours."""
            await asyncio.sleep(2.5 * heartbeat_s)
            owned = transactions.state(tp) is PartitionState.OWNED
            return owned and tp in consumer.assignment()

        transactions = PartitionTransactions(
            group_id or settings.input.group_id,
            lambda txn_id: make_transactional_producer(settings, txn_id, batch_bytes),
            consumer.committed,
            still_ours=still_ours,
        )
        return ExactlyOnceOutbox(transactions, observer=observer, commit_interval_ms=interval)
    assert send is not None
    return AtLeastOnceOutbox(send, consumer.commit, observer=observer, commit_interval_ms=interval)


@contextlib.asynccontextmanager
async def open_service(
    settings: Settings,
    *,
    llm_transport: Any = None,
    group_id: str | None = None,
    sink: Send | None = None,
    serve_http: bool = True,
) -> AsyncIterator[Pipeline]:
    """Build a pipeline with started clients (and the HTTP server when the config asks for it).

    ``group_id`` replaces the config's (replay); with a ``sink`` (a :data:`~.delivery.Send`)
    no producer is made and delivery is at-least-once into it. Everything is stopped and closed
    on exit.
    """
    routes = load_routes(settings.routes)
    check_topic_names(routes, settings)
    llm_mode = settings.mode == "llm"
    targets = route_targets(routes, settings) if llm_mode else {}
    api_keys = resolve_api_keys(settings.endpoints) if llm_mode else {}
    observer = Observer(tracer=make_tracer(settings.tracing))
    encoder = await asyncio.to_thread(Encoder, settings.encoder)
    router = await asyncio.to_thread(Router, routes, encoder)
    shadow = None
    if settings.shadow.routes is not None:  # a candidate that fails to load fails the start
        shadow = await ShadowRoutes.load(settings, encoder, observer.metrics)
    # The first broker contact (a wrong password, a missing topic fail here): before any
    # client that would need closing exists.
    record_limit = None
    if sink is None:  # outputs on the broker: they exist (or are made) and bound the records
        record_limit = await ensure_output_topics(settings, output_topics(routes, settings))
    consumer = make_consumer(settings, group_id=group_id)
    exactly_once = settings.delivery == "exactly_once" and sink is None
    # batches no larger than the smallest output topic limit, or the broker refuses them
    batch_bytes = None if record_limit is None else record_limit + RECORD_OVERHEAD_BYTES
    producers = _Producers(settings, batch_bytes)
    producer = producers.new() if sink is None and not exactly_once else None
    send = producer_send(producer, observer, renew=producers.new) if producer else sink
    outbox = _outbox(settings, consumer, observer, send, group_id, batch_bytes)
    llm = (
        LLMPool(settings.endpoints, transport=llm_transport, api_keys=api_keys)
        if llm_mode
        else None
    )
    worker = Worker(settings, llm, observer)
    if record_limit is not None:
        worker.record_limit = record_limit
    # A replay into a file (a sink) writes outcomes only: no review or shadow records.
    audit = Audit(settings, observer.metrics, records=sink is None, shadow=shadow)
    pipeline = Pipeline(
        settings, router, consumer, outbox, worker, targets=targets, observer=observer, audit=audit
    )
    pipeline.routes.shadow = shadow
    obs = settings.observability
    learning = settings.learning.enabled and sink is None and group_id is None  # not in replay
    if learning:
        await ensure_learning_topics(settings)
    async with contextlib.AsyncExitStack() as stack:
        # The decision's small matmuls run on the event loop: multi-threaded BLAS makes them
        # 5-30x slower under load and its spinning threads take CPU from the encoder.
        stack.enter_context(threadpool_limits(limits=1, user_api="blas"))
        # Registered before anything can fail (e.g. the metrics port is taken): stopping a
        # client that never started is harmless, leaving it unclosed is not.
        stack.push_async_callback(_stop_within, consumer.stop, "consumer")
        if producer is not None:
            stack.push_async_callback(_stop_within, producers.stop_current, "producer")
        stack.callback(observer.tracer.shutdown)
        if llm is not None:
            stack.push_async_callback(llm.aclose)
        learner = await _start_learning(settings, pipeline, stack) if learning else None
        if serve_http and obs.metrics_port is not None:
            await _serve_http(settings, pipeline, learner, stack)
        if producer is not None:
            await producer.start()
        await consumer.start()
        if isinstance(outbox, ExactlyOnceOutbox):  # closed before the consumer stops
            stack.push_async_callback(
                _stop_within, outbox.transactions.close, "transactional producers"
            )
        yield pipeline


class _Producers:
    """The at-least-once producers: the current one last, a new one made when a refused batch
    poisoned the current one's sequence numbers (``OutOfOrderSequenceNumber``)."""

    def __init__(self, settings: Settings, batch_bytes: int | None) -> None:
        self._settings = settings
        self._batch_bytes = batch_bytes
        self._all: list[AIOKafkaProducer] = []

    def new(self) -> AIOKafkaProducer:
        self._all.append(make_producer(self._settings, self._batch_bytes))
        return self._all[-1]

    async def stop_current(self) -> None:
        await self._all[-1].stop()


async def _serve_http(
    settings: Settings,
    pipeline: Pipeline,
    learner: Learner | None,
    stack: contextlib.AsyncExitStack,
) -> None:
    """Start the health/metrics server (stopped by ``stack``), ``/learning`` when learning."""
    obs = settings.observability
    assert obs.metrics_port is not None
    handlers = pipeline.health.handlers()
    if learner is not None:
        handlers["/learning"] = learner.http_status
    server = HttpServer(obs.host, obs.metrics_port, handlers)
    await server.start()
    stack.push_async_callback(server.stop)
    pipeline.health.http = server


async def _start_learning(
    settings: Settings, pipeline: Pipeline, stack: contextlib.AsyncExitStack
) -> Learner:
    """Read the overlay, put the routes file plus the overlay live, then tail the overlay,
    retrain in the background and consume the corrections while the service is open."""
    live = pipeline.routes
    learner = Learner(settings, live, pipeline.metrics)
    reader = make_overlay_reader(settings)
    stack.push_async_callback(_stop_within, reader.stop, "overlay reader")
    await reader.start()
    await learner.load(reader)
    await learner.start_live()
    consumer = make_consumer(settings, group_id=settings.corrections_group)
    stack.push_async_callback(_stop_within, consumer.stop, "corrections consumer")
    producer = make_producer(settings)
    stack.push_async_callback(_stop_within, producer.stop, "corrections producer")
    await producer.start()
    await consumer.start()
    intake = CorrectionsIntake(
        settings,
        consumer,
        producer,
        lambda: learner.overlay,
        lambda: live.base.names,
        pipeline.metrics,
        pipeline.worker,
    )
    pipeline.learner = learner
    running = learner.running(reader, intake.run(), on_death=pipeline.observer.task_failed)
    await stack.enter_async_context(running)
    return learner


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
                "starting: topic=%s group=%s mode=%s routes=%s (version %s) encoder=%r",
                settings.input.topic,
                settings.input.group_id,
                settings.mode,
                settings.routes,
                pipeline.router.version,
                pipeline.router.encoder,
            )
            return await pipeline.run(max_messages=max_messages, idle_timeout_s=idle_timeout_s)
