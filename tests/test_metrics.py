"""Metrics, the HTTP server, structured logs and tracing spans.

The Kafka test reads ``/metrics`` after a known run; the others are unit tests on a pipeline
with a fake consumer and an in-memory sink.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import TopicPartition
from fakes import FakeEncoder, consumer_record
from llm_stub import LLMStub
from ops_helpers import http_get, samples, value, wait_until
from service_helpers import BAD_INPUTS, QUERIES, make_settings, produce, query_message

from semroute_stream._errors import ERROR_KINDS, ConfigError
from semroute_stream._routing.router import Router
from semroute_stream._routing.schema import load_routes
from semroute_stream._service.app import open_service
from semroute_stream._service.delivery import AtLeastOnceOutbox
from semroute_stream._service.log_setup import JsonFormatter, TextFormatter
from semroute_stream._service.observe import HttpServer, Metrics, Observer
from semroute_stream._service.pipeline import Pipeline
from semroute_stream._service.records import OutRecord
from semroute_stream._service.settings import TracingConfig
from semroute_stream._service.tracing import Tracer, make_tracer
from semroute_stream._service.worker import Worker


@pytest.mark.kafka
async def test_metrics_endpoint_after_a_known_run(
    kafka_bootstrap: str, new_topic: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    topic = await new_topic(partitions=2)
    with LLMStub(name="good") as good, LLMStub(name="broken") as broken:
        broken.fail_always(status=400, message="no such model")
        settings = make_settings(
            tmp_path,
            kafka_bootstrap,
            topic,
            endpoints={"billing": good.url, "support": broken.url, "general": good.url},
            observability={"metrics_port": 0},
        )
        values: list[bytes | None] = [query_message(t, f"q{i}") for i, (t, _) in enumerate(QUERIES)]
        values += [v for v, _ in BAD_INPUTS]
        keys: list[bytes | None] = [f"k{i}".encode() for i in range(len(values))]
        await produce(kafka_bootstrap, topic, values, keys=keys)
        caplog.set_level(logging.WARNING, logger="semroute_stream")
        async with open_service(settings) as pipeline:
            assert pipeline.http is not None
            port = pipeline.http.port
            assert await http_get(port, "/readyz") == (
                503,
                "waiting for the group to assign partitions\n",
            )
            run = asyncio.create_task(pipeline.run())
            await wait_until(
                lambda: pipeline.stats.outcomes + pipeline.stats.dead_letters == len(values)
            )
            status, text = await http_get(port, "/metrics")
            assert status == 200
            assert await http_get(port, "/livez") == (200, "ok\n")
            assert (await http_get(port, "/readyz"))[0] == 200
            assert (await http_get(port, "/nope"))[0] == 404
            pipeline.request_stop()
            await run

    found = samples(text)
    expected_routes = {r for _, r in QUERIES}
    by_route = {r: sum(x == r for _, x in QUERIES) for r in expected_routes}
    assert value(found, "semroute_messages_consumed_total") == len(values)
    # billing and fallback answered; tech and shipping go to the broken endpoint: dead letters
    assert value(found, "semroute_messages_routed_total", route="billing") == by_route["billing"]
    assert value(found, "semroute_messages_routed_total", route="fallback") == by_route["fallback"]
    assert ("semroute_messages_routed_total", (("route", "tech"),)) not in found
    assert value(found, "semroute_messages_fallback_total") == by_route["fallback"]
    rejected = by_route["tech"] + by_route["shipping"]
    assert value(found, "semroute_dead_letters_total", kind="llm_rejected") == rejected
    for _, kind in BAD_INPUTS:
        assert value(found, "semroute_dead_letters_total", kind=kind) == 1
    for kind in ("llm_retries_exhausted", "llm_circuit_open"):
        assert value(found, "semroute_dead_letters_total", kind=kind) == 0
    assert value(found, "semroute_end_to_end_seconds_count") == len(values)
    assert value(found, "semroute_batch_size_sum") == len(values)
    assert value(found, "semroute_encode_seconds_count") >= 1
    assert value(found, "semroute_decide_seconds_count") >= 1
    assert value(found, "semroute_llm_seconds_count", endpoint="support") == rejected
    assert value(found, "semroute_llm_seconds_count", endpoint="billing") == by_route["billing"]
    assert value(found, "semroute_in_flight_messages") == 0
    assert value(found, "semroute_endpoint_in_flight_messages", endpoint="support") == 0
    assert value(found, "semroute_llm_circuit_state", endpoint="billing") == 0
    for p in range(2):
        assert value(found, "semroute_consumer_lag", topic=topic, partition=str(p)) == 0
    assert value(found, "semroute_routes_info", version=pipeline.router.version) == 1
    assert value(found, "semroute_routes_reloads_total", result="applied") == 0

    # every dead-letter line carries the message coordinates, and no message text
    lines = [r for r in caplog.records if r.getMessage().startswith("dead letter")]
    assert len(lines) == len(BAD_INPUTS) + rejected
    for r in lines:
        extra: dict[str, Any] = vars(r)  # logging sets the ``extra=`` fields on the record
        assert (
            extra["topic"] == topic
            and isinstance(extra["partition"], int)
            and isinstance(extra["offset"], int)
        )
        assert not hasattr(r, "text")
        assert "no such model" not in r.getMessage()  # the LLM's body can echo the message


def test_each_pipeline_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()
    a.consumed.inc()
    assert b"semroute_messages_consumed_total 1.0" in a.render()
    assert b"semroute_messages_consumed_total 0.0" in b.render()
    for kind in ERROR_KINDS:  # every kind is there from the start, at zero
        assert f'semroute_dead_letters_total{{kind="{kind}"}} 0.0'.encode() in b.render()


async def test_http_server_answers_get_only() -> None:
    async def hello() -> tuple[int, str, bytes]:
        return 200, "text/plain", b"hi\n"

    server = HttpServer("127.0.0.1", 0, {"/hello": hello})
    await server.start()
    try:
        assert await http_get(server.port, "/hello?x=1") == (200, "hi\n")
        assert (await http_get(server.port, "/other"))[0] == 404
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"POST /hello HTTP/1.1\r\n\r\n")
        assert (await reader.read()).startswith(b"HTTP/1.1 405")
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"garbage")
        writer.write_eof()
        assert await reader.read() == b""  # hung up on, server still fine
        writer.close()
        assert (await http_get(server.port, "/hello"))[0] == 200
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{server.port}"):
            await HttpServer("127.0.0.1", server.port, {}).start()
    finally:
        await server.stop()


def _record(**extra: Any) -> logging.LogRecord:
    record = logging.makeLogRecord(
        {"name": "semroute_stream", "levelname": "WARNING", "msg": "dead letter %s", "args": ("k",)}
    )
    record.__dict__.update(extra)
    return record


def test_json_and_text_log_lines_carry_the_extras() -> None:
    record = _record(topic="in", partition=2, offset=41, kind="invalid_json")
    line = orjson.loads(JsonFormatter().format(record))
    assert line["msg"] == "dead letter k" and line["level"] == "warning"
    assert (line["topic"], line["partition"], line["offset"], line["kind"]) == (
        "in",
        2,
        41,
        "invalid_json",
    )
    assert line["ts"].endswith("Z")
    text = TextFormatter().format(record)
    assert text.endswith("dead letter k [topic=in partition=2 offset=41 kind=invalid_json]")


# ---- a pipeline on a fake consumer: tracing spans and the log-text option ------------------


class _Sink:
    def __init__(self) -> None:
        self.records: list[tuple[str, dict[str, Any]]] = []

    async def __call__(self, record: OutRecord) -> None:
        self.records.append((record.topic, orjson.loads(record.value)))


async def _no_commit(offsets: Any) -> None:
    return None


def _fake_pipeline(
    tmp_path: Path, tracer: Tracer | None = None, **sections: Any
) -> tuple[Pipeline, _Sink]:
    settings = make_settings(tmp_path, "127.0.0.1:1", "in", mode="route_only", **sections)
    router = Router(load_routes(settings.routes), FakeEncoder())
    sink = _Sink()
    observer = Observer(tracer=tracer)
    pipeline = Pipeline(
        settings,
        router,
        object(),  # no consumer: the test only dispatches
        AtLeastOnceOutbox(sink, _no_commit, observer=observer),
        Worker(settings, None, observer),
        observer=observer,
    )
    pipeline.on_assigned({TopicPartition("in", 0)})
    return pipeline, sink


async def _process(pipeline: Pipeline, values: list[bytes | None]) -> None:
    await pipeline.dispatch([consumer_record(i, v) for i, v in enumerate(values)])
    await wait_until(lambda: pipeline.in_flight == 0, timeout=10)


async def test_spans_follow_the_messaging_conventions(tmp_path: Path) -> None:
    otel_sdk = pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = otel_sdk.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    pipeline, sink = _fake_pipeline(tmp_path, Tracer(provider.get_tracer("test")))
    await _process(pipeline, [query_message("where is my package", "a"), b"{not json"])
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"process in", "encode", "decide", "send in.out", "send in.dlq"}
    batch = next(
        s
        for s in exporter.get_finished_spans()
        if (s.attributes or {}).get("messaging.batch.message_count") == 2
    )
    assert batch.attributes is not None
    assert batch.attributes["messaging.system"] == "kafka"
    assert batch.attributes["messaging.destination.name"] == "in"
    trace_ids = {s.context.trace_id for s in exporter.get_finished_spans()}
    assert len(trace_ids) == 1  # one trace per batch: the messages' spans are its children
    message = [
        s for s in exporter.get_finished_spans() if "messaging.kafka.offset" in (s.attributes or {})
    ]
    assert [(m.attributes or {})["messaging.kafka.offset"] for m in message] == [0]
    assert message[0].parent is not None and message[0].parent.span_id == batch.context.span_id
    assert [t for t, _ in sink.records].count("in.dlq") == 1


async def test_message_text_is_logged_only_when_asked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="semroute_stream")
    quiet, _ = _fake_pipeline(tmp_path)
    await _process(quiet, [b'{"text": 12, "secret": "hunter2"}'])
    loud, _ = _fake_pipeline(tmp_path, logging={"log_message_text": True})
    await _process(loud, [b'{"text": 12, "secret": "hunter2"}'])
    first, second = [r for r in caplog.records if r.getMessage().startswith("dead letter")]
    assert "hunter2" not in first.getMessage() and not hasattr(first, "text")
    assert "hunter2" in second.text  # type: ignore[attr-defined]
    assert (first.topic, first.partition, first.offset) == ("in", 0, 0)  # type: ignore[attr-defined]


def test_tracing_is_off_by_default_and_explains_a_missing_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert not make_tracer(TracingConfig()).enabled
    with make_tracer(TracingConfig()).span("x", {"a": 1}) as span:
        assert span is None
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'semroute-stream\[otel\]'"):
        make_tracer(TracingConfig(enabled=True))


def test_tracing_exporters(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("opentelemetry.sdk.trace")
    tracer = make_tracer(TracingConfig(enabled=True, exporter="console"))
    assert tracer.enabled
    tracer.shutdown()
    assert make_tracer(TracingConfig(enabled=True, exporter="global")).enabled
    otlp = "opentelemetry.exporter.otlp.proto.http.trace_exporter"
    monkeypatch.setitem(sys.modules, otlp, None)
    with pytest.raises(ConfigError, match=r"tracing.exporter 'otlp': .*semroute-stream\[otel\]"):
        make_tracer(TracingConfig(enabled=True, exporter="otlp"))
