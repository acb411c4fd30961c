"""Parking: a message whose endpoint stays unavailable goes, with its decision, to the
endpoint's retry topic (its offset moves on, other routes keep flowing) and is answered when it
comes back from there. No broker here: an in-memory outbox and httpx's MockTransport; the
real-broker scenario is in ``test_faults_hostile.py``."""

from __future__ import annotations

import asyncio
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiokafka import TopicPartition
from fakes import FakeEncoder, MemoryOutbox, consumer_record
from ops_helpers import wait_until
from service_helpers import QUERIES, make_settings, query_message

from semroute_stream._routing.router import Router
from semroute_stream._routing.schema import load_routes
from semroute_stream._service.intake import hold_retries
from semroute_stream._service.llm import LLMPool
from semroute_stream._service.pipeline import Pipeline
from semroute_stream._service.records import read_parked
from semroute_stream._service.worker import Worker, route_targets

ENDPOINTS = {"billing": "http://billing.test/v1", "support": "http://ok.test/v1"}
ENDPOINTS["general"] = ENDPOINTS["support"]


class Endpoints:
    """Billing answers 503 while ``billing_down``; the others always answer."""

    def __init__(self) -> None:
        self.billing_down = True
        self.calls: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        self.calls.append(host)
        if host == "billing.test" and self.billing_down:
            return httpx.Response(503, json={"error": "down"})
        body = orjson.loads(request.content)
        message = {"role": "assistant", "content": f"answer from {body['model']}"}
        return httpx.Response(200, json={"choices": [{"message": message}]})


def _pipeline(tmp_path: Path, handler: Endpoints) -> tuple[Pipeline, MemoryOutbox]:
    settings = make_settings(
        tmp_path,
        "127.0.0.1:1",
        "in",
        endpoints=ENDPOINTS,
        flow={"park_after_s": 0.5},
    )
    settings.endpoints["billing"] = settings.endpoints["billing"].model_copy(
        update={"max_attempts": 1, "circuit_failure_threshold": 1, "circuit_reset_s": 0.3}
    )
    routes = load_routes(settings.routes)
    llm = LLMPool(settings.endpoints, transport=httpx.MockTransport(handler), api_keys={})
    outbox = MemoryOutbox()
    consumer: Any = type("Consumer", (), {"pause": print, "resume": print})()
    pipeline = Pipeline(
        settings,
        Router(routes, FakeEncoder()),
        consumer,
        outbox,
        Worker(settings, llm),
        targets=route_targets(routes, settings),
    )
    pipeline.on_assigned({TopicPartition("in", 0), TopicPartition("in.retry.billing", 0)})
    return pipeline, outbox


async def test_an_unavailable_endpoint_parks_its_messages_and_they_come_back(
    tmp_path: Path,
) -> None:
    endpoints = Endpoints()
    pipeline, outbox = _pipeline(tmp_path, endpoints)
    billing, tech = QUERIES[0][0], QUERIES[2][0]
    values = [query_message(billing, "b1"), query_message(tech, "t1"), query_message(billing, "b2")]
    await pipeline.dispatch([consumer_record(i, v) for i, v in enumerate(values)])
    await wait_until(lambda: pipeline.in_flight == 0, timeout=10)

    by_id = {orjson.loads(o.value).get("id"): o for o in outbox.outcomes if not o.parked}
    assert by_id["t1"].kind is None  # the other route is answered meanwhile
    parked = [o for o in outbox.outcomes if o.parked]
    assert {o.topic for o in parked} == {"in.retry.billing"} and len(parked) == 2
    assert all(
        o.record().headers[-2:] == [("semroute-status", b"parked"), ("semroute-route", b"billing")]
        for o in parked
    )
    outbox.commit()
    assert outbox.committed == {TopicPartition("in", 0): 3}  # the input's offset moved on
    assert pipeline.stats.dead_letters == 0

    # The endpoint is back: the retry topic's records are answered, with the original source.
    endpoints.billing_down = False
    await asyncio.sleep(0.4)  # the breaker is half-open: a trial call may go
    outbox.outcomes.clear()
    back = [consumer_record(i, o.value, topic="in.retry.billing") for i, o in enumerate(parked)]
    await pipeline.dispatch(back)
    await wait_until(lambda: pipeline.in_flight == 0, timeout=10)
    answered = sorted(outbox.outcomes, key=lambda o: o.src.offset)
    assert [o.parked for o in answered] == [False, False]
    assert [o.src.offset for o in answered] == [0, 2]  # the input's coordinates ...
    assert [o.at.topic for o in answered] == ["in.retry.billing"] * 2  # ... committed here
    record = orjson.loads(answered[0].value)
    assert record["idempotency_key"] == "in/0/0" and record["route"] == "billing"
    assert record["response"]["content"] == "answer from billing-model"
    assert "parked" in record["timings_ms"]
    outbox.commit()
    assert outbox.committed[TopicPartition("in.retry.billing", 0)] == 2


def test_a_parked_record_keeps_everything_needed_to_answer_it(tmp_path: Path) -> None:
    from semroute_stream._service.records import Source, parked_record

    raw_key = "k-\udcff"  # a header key that was not UTF-8, as the consumer decoded it
    src = Source("in", 3, 41, 1_700_000_000_000, b"key", ((raw_key, b"v"), ("h", b"")))
    value = parked_record(
        src,
        b"\x00\xffbytes",
        decision={"route": "billing", "is_fallback": False},
        route="billing",
        endpoint="billing",
        parked_at_ms=5,
        times=2,
    )
    back = read_parked(value)
    assert back.src == src and back.raw == b"\x00\xffbytes"
    assert (back.route, back.endpoint, back.parked_at_ms, back.times) == (
        "billing",
        "billing",
        5,
        2,
    )


async def test_a_retry_partition_is_held_again_after_a_rebalance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline, _ = _pipeline(tmp_path, Endpoints())
    paused: list[TopicPartition] = []
    pipeline._consumer = type(
        "Consumer", (), {"pause": lambda self, *tps: paused.extend(tps), "resume": print}
    )()
    llm = pipeline.worker.llm
    assert llm is not None
    monkeypatch.setattr(llm, "breaker_state", lambda endpoint: "open")  # billing is down
    retry = TopicPartition("in.retry.billing", 0)
    hold = partial(hold_retries, pipeline.settings, llm, pipeline._consumer, pipeline._assigned)
    hold(pipeline.activity)
    assert paused == [retry] and retry in pipeline.activity.held
    # A rebalance gives the partition back unpaused: it must be held (paused) again.
    await pipeline.on_revoked({retry})
    assert retry not in pipeline.activity.held
    pipeline.on_assigned({retry})
    hold(pipeline.activity)
    assert paused == [retry, retry] and retry in pipeline.activity.held
