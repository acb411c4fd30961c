"""The pipeline's dispatch path with no broker: an in-memory outbox, the fake encoder, and an
LLM answered through httpx's MockTransport. Every input ends as exactly one outcome."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import orjson
from aiokafka import TopicPartition
from fakes import FakeEncoder, MemoryOutbox, consumer_record
from ops_helpers import wait_until
from service_helpers import BAD_INPUTS, QUERIES, make_settings, query_message

from semroute_stream._routing.router import Router
from semroute_stream._routing.schema import load_routes
from semroute_stream._service.llm import LLMPool
from semroute_stream._service.pipeline import Pipeline
from semroute_stream._service.worker import Worker, route_targets

TP = TopicPartition("in", 0)
ENDPOINTS = {name: "http://llm.test/v1" for name in ("billing", "support", "general")}


def _pipeline(tmp_path: Path, handler: Any = None) -> tuple[Pipeline, MemoryOutbox]:
    mode = "route_only" if handler is None else "llm"
    settings = make_settings(tmp_path, "127.0.0.1:1", "in", mode=mode, endpoints=ENDPOINTS)
    routes = load_routes(settings.routes)
    router = Router(routes, FakeEncoder())
    llm = None
    targets = {}
    if handler is not None:
        llm = LLMPool(settings.endpoints, transport=httpx.MockTransport(handler), api_keys={})
        targets = route_targets(routes, settings)
    outbox = MemoryOutbox()
    consumer: Any = object()  # dispatch never touches the consumer
    pipeline = Pipeline(settings, router, consumer, outbox, Worker(settings, llm), targets=targets)
    pipeline.on_assigned({TP})
    return pipeline, outbox


async def _dispatch(pipeline: Pipeline, values: list[bytes | None]) -> None:
    await pipeline.dispatch(
        [consumer_record(i, v, key=b"k", headers=[("trace", b"t-1")]) for i, v in enumerate(values)]
    )
    await wait_until(lambda: pipeline.in_flight == 0, timeout=10)


async def test_every_input_gets_exactly_one_outcome(tmp_path: Path) -> None:
    pipeline, outbox = _pipeline(tmp_path)
    good: list[bytes | None] = [query_message(text, f"q{i}") for i, (text, _) in enumerate(QUERIES)]
    bad = [value for value, _ in BAD_INPUTS]
    await _dispatch(pipeline, good + bad)

    by_offset = {o.src.offset: o for o in outbox.outcomes}
    assert len(outbox.outcomes) == len(by_offset) == len(good) + len(bad)
    for i, (_, route) in enumerate(QUERIES):
        outcome = by_offset[i]
        assert outcome.kind is None and outcome.topic == "in.out"
        assert outcome.route == route and outcome.fallback == (route == "fallback")
        assert orjson.loads(outcome.value)["decision"]["route"] == route
    for j, (_, kind) in enumerate(BAD_INPUTS, start=len(good)):
        assert (by_offset[j].topic, by_offset[j].kind) == ("in.dlq", kind)
    # Key and headers are carried, plus the status and route headers.
    record = by_offset[0].record()
    assert record.key == b"k"
    assert record.headers == [
        ("trace", b"t-1"),
        ("semroute-status", b"ok"),
        ("semroute-route", b"billing"),
    ]
    assert by_offset[len(good)].record().headers[-1] == ("semroute-status", b"error")
    outbox.commit()
    assert outbox.committed == {TP: len(good) + len(bad)}
    assert pipeline.stats.consumed == len(good) + len(bad) and pipeline.stats.batches == 1


async def test_llm_answers_and_rejections_leave_by_the_same_path(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = orjson.loads(request.content)
        if "refund" in body["messages"][-1]["content"]:
            return httpx.Response(400, json={"error": {"message": "bad request"}})
        answer = {"role": "assistant", "content": f"answer from {body['model']}"}
        return httpx.Response(
            200,
            json={
                "model": body["model"],
                "choices": [{"message": answer, "finish_reason": "stop"}],
            },
        )

    pipeline, outbox = _pipeline(tmp_path, handler)
    charged, refund = QUERIES[0][0], QUERIES[1][0]
    await _dispatch(pipeline, [query_message(charged, "a"), query_message(refund, "b")])
    ok, rejected = sorted(outbox.outcomes, key=lambda o: o.src.offset)
    assert ok.kind is None and ok.topic == "in.out"
    assert orjson.loads(ok.value)["response"]["content"] == "answer from billing-model"
    assert (rejected.topic, rejected.kind, rejected.route) == ("in.dlq", "llm_rejected", "billing")
    letter = orjson.loads(rejected.value)
    assert letter["error"]["stage"] == "llm" and letter["decision"]["route"] == "billing"
    assert pipeline.worker.endpoint_load["billing"] == 0  # released after each message
