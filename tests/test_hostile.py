"""Hostile records and hostile LLM answers, without a broker: each costs one dead letter (or a
paused endpoint), every record written stays within its limit, nothing raises out.

The same records go through a real broker and a real router in ``test_hostile_broker.py``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiokafka import TopicPartition
from aiokafka.errors import MessageSizeTooLargeError
from fakes import FakeEncoder, MemoryOutbox, consumer_record
from ops_helpers import wait_until
from service_helpers import QUERIES, make_settings, query_message

from semroute_stream._errors import (
    ERROR_KINDS,
    InputError,
    LLMMisconfiguredError,
    LLMPermanentError,
    LLMRetryableError,
)
from semroute_stream._input import check_envelope, parse_input
from semroute_stream._routing.router import Router
from semroute_stream._routing.schema import load_routes
from semroute_stream._service.delivery import AtLeastOnceOutbox
from semroute_stream._service.llm import EndpointConfig, LLMPool
from semroute_stream._service.observe import Observer
from semroute_stream._service.pipeline import Pipeline
from semroute_stream._service.records import (
    OutRecord,
    Source,
    dead_letter_record,
    outcome_record,
)
from semroute_stream._service.worker import Worker, route_targets

OPTS: dict[str, Any] = {
    "format": "json",
    "text_field": "text",
    "id_field": "id",
    "max_bytes": 1 << 20,
    "max_chars": 8000,
}
SRC = Source("in", 0, 7, 1_700_000_000_000, b"k", (("h", b"v"),))
ENDPOINTS = {name: "http://llm.test/v1" for name in ("billing", "support", "general")}


def deep(levels: int) -> bytes:
    """``{"text": "hi", "x": [[[...]]]}`` with the list nested ``levels`` deep."""
    return b'{"text": "hi", "x": ' + b"[" * levels + b"]" * levels + b"}"


# ---- input limits ---------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [64, 252, 300, 1000])
def test_json_deeper_than_the_limit_is_too_deep(levels: int) -> None:
    value = deep(levels)
    with pytest.raises(InputError) as caught:
        parse_input(value, **OPTS)
    assert caught.value.kind == "too_deep"


def test_json_within_the_limit_parses_and_its_outcome_is_writable() -> None:
    query = parse_input(deep(62), **OPTS)  # 63 levels with the outer object
    record = outcome_record(
        SRC,
        query,
        decision={"route": "r", "is_fallback": False},
        endpoint=None,
        llm_model=None,
        response=None,
        timings_ms={},
    )
    assert orjson.loads(record)["input"]["x"]


def test_envelope_limits() -> None:
    limits = {"max_key_bytes": 4096, "max_headers": 64, "max_header_bytes": 16384}
    check_envelope(b"k" * 4096, (("a", b"b"),) * 64, **limits)
    cases: list[tuple[bytes | None, tuple[tuple[str, bytes], ...], str]] = [
        (b"k" * 700_000, (), "oversized_key"),
        (None, (("h", b""),) * 50_000, "too_many_headers"),
        (None, (("h", b"v" * 20_000),), "oversized_headers"),
    ]
    for key, headers, kind in cases:
        with pytest.raises(InputError) as caught:
            check_envelope(key, headers, **limits)
        assert caught.value.kind == kind
        assert kind in ERROR_KINDS


# ---- records always fit ---------------------------------------------------------------------


def test_a_dead_letter_of_an_oversized_binary_record_fits_with_a_marker() -> None:
    value = bytes(range(256)) * 3200  # 800 KB, not UTF-8: base64 would make it 1.1 MB
    letter = dead_letter_record(
        SRC, value, kind="oversized", reason="too big", stage="parse", limit=100_000
    )
    assert len(letter) <= 100_000
    data = orjson.loads(letter)
    assert data["value"] == {
        "cut": True,
        "bytes": len(value),
        "sha256": hashlib.sha256(value).hexdigest(),
    }
    assert data["truncated"] == ["value"]
    assert data["error"]["kind"] == "oversized" and data["source"]["offset"] == 7


def test_control_bytes_dead_letter_fits() -> None:
    value = bytes([1, 2, 3, 27, 0]) * 40_000  # 200 KB that escape to 6 bytes each in JSON
    letter = dead_letter_record(
        SRC, value, kind="invalid_json", reason="x", stage="parse", limit=50_000
    )
    assert len(letter) <= 50_000 and orjson.loads(letter)["value"]["bytes"] == len(value)


def test_an_outcome_cuts_the_copies_first_and_the_answer_last() -> None:
    raw = orjson.dumps({"text": "hi", "pad": "p" * 30_000})
    query = parse_input(raw, **OPTS)
    response = {"content": "a" * 30_000, "finish_reason": "stop", "usage": {}, "attempts": 1}
    fields: dict[str, Any] = {
        "decision": {"route": "r", "is_fallback": False},
        "endpoint": "e",
        "llm_model": "m",
        "response": response,
        "timings_ms": {},
        "raw": raw,
    }
    roomy = orjson.loads(outcome_record(SRC, query, **fields, limit=40_000))
    assert roomy["truncated"] == ["input"]  # the largest copy; key and headers stay
    assert roomy["input"]["sha256"] == hashlib.sha256(raw).hexdigest()
    assert roomy["response"]["content"] == "a" * 30_000  # the answer is whole
    tight = outcome_record(SRC, query, **fields, limit=20_000)
    assert len(tight) <= 20_000
    cut = orjson.loads(tight)
    assert cut["truncated"][-1] == "response.content"
    assert cut["response"]["content_cut"]["bytes"] == 30_000
    assert cut["response"]["content"] == "a" * len(cut["response"]["content"])


# ---- hostile LLM answers ----------------------------------------------------------------------


def pool(handler: Any, **overrides: Any) -> LLMPool:
    fields: dict[str, Any] = {
        "base_url": "http://llm.test/v1",
        "model": "m1",
        "max_attempts": 2,
        "backoff_initial_s": 0.0,
        "circuit_reset_s": 60.0,
    }
    config = EndpointConfig(**(fields | overrides))
    return LLMPool({"ep": config}, transport=httpx.MockTransport(handler), api_keys={})


def completion(content: str = "ok", **extra: Any) -> dict[str, Any]:
    choice = {"message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
    return {"choices": [choice], **extra}


@pytest.mark.parametrize("status", [401, 403, 404])
async def test_auth_and_missing_endpoints_are_misconfigured_and_pause_it(status: int) -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(status, json={"error": "nope"})

    async with pool(handler) as p:
        with pytest.raises(LLMMisconfiguredError) as caught:
            await p.complete("ep", "hi")
        assert caught.value.kind == "llm_misconfigured"
        assert p.breaker_state("ep") == "open"  # paused: no call reaches it for a while
        assert f"HTTP {status}" in p.misconfigured()["ep"]
        with pytest.raises(Exception, match="circuit breaker open"):
            await p.complete("ep", "hi")
        assert calls == 1


async def test_a_garbage_200_is_misconfigured_and_a_good_answer_clears_it() -> None:
    answers = [httpx.Response(200, text="<html>login</html>")]

    def handler(request: httpx.Request) -> httpx.Response:
        return answers[0]

    async with pool(handler, circuit_reset_s=0.0) as p:
        with pytest.raises(LLMMisconfiguredError, match="not a chat completion"):
            await p.complete("ep", "hi")
        assert p.misconfigured()
        answers[0] = httpx.Response(200, json=completion())
        assert (await p.complete("ep", "hi")).content == "ok"
        assert p.misconfigured() == {} and p.breaker_state("ep") == "closed"


async def test_a_deep_answer_is_refused_without_recursion_error() -> None:
    body = b'{"choices": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    async with pool(lambda r: httpx.Response(200, content=body)) as p:
        with pytest.raises(LLMPermanentError, match="malformed"):
            await p.complete("ep", "hi")


async def test_deep_usage_is_dropped_not_copied() -> None:
    text = '{"choices": [{"message": {"content": "ok"}}], "usage": ' + '{"u": ' * 300 + "1"
    body = (text + "}" * 301).encode()
    async with pool(lambda r: httpx.Response(200, content=body)) as p:
        result = await p.complete("ep", "hi")
    assert result.content == "ok" and result.usage == {"dropped": "nested deeper than 8 levels"}


async def test_a_huge_answer_is_refused_for_that_message_only() -> None:
    big = orjson.dumps(completion("x" * 2_000_000))
    async with pool(lambda r: httpx.Response(200, content=big)) as p:
        with pytest.raises(LLMPermanentError, match="max_response_bytes") as caught:
            await p.complete("ep", "hi")
        assert not isinstance(caught.value, LLMMisconfiguredError)
        assert p.breaker_state("ep") == "closed" and p.misconfigured() == {}


class _Trickle(httpx.AsyncByteStream):
    async def __aiter__(self) -> AsyncIterator[bytes]:
        for byte in orjson.dumps(completion()):
            await asyncio.sleep(0.05)
            yield bytes([byte])


async def test_a_trickling_server_hits_the_total_deadline() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=_Trickle())

    async with pool(handler, deadline_s=0.3, timeout_s=5.0) as p:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(LLMRetryableError, match=r"deadline_s=0\.3"):
            await p.complete("ep", "hi")
        assert loop.time() - started < 3  # 2 attempts of 0.3 s, not 5 s reads of a byte


# ---- the pipeline: one message, one outcome, whatever fails -----------------------------------


def _pipeline(
    tmp_path: Path, handler: Any = None, outbox: Any = None, **sections: Any
) -> tuple[Pipeline, Any]:
    mode = "route_only" if handler is None else "llm"
    settings = make_settings(
        tmp_path, "127.0.0.1:1", "in", mode=mode, endpoints=ENDPOINTS, **sections
    )
    routes = load_routes(settings.routes)
    llm, targets = None, {}
    if handler is not None:
        llm = LLMPool(settings.endpoints, transport=httpx.MockTransport(handler), api_keys={})
        targets = route_targets(routes, settings)
    outbox = outbox or MemoryOutbox()
    consumer: Any = object()
    observer = getattr(outbox, "_observer", None) or Observer()
    worker = Worker(settings, llm, observer)
    pipeline = Pipeline(
        settings,
        Router(routes, FakeEncoder()),
        consumer,
        outbox,
        worker,
        targets=targets,
        observer=observer,
    )
    pipeline.on_assigned({TopicPartition("in", 0)})
    return pipeline, outbox


async def test_hostile_records_each_get_one_dead_letter_and_the_next_query_is_routed(
    tmp_path: Path,
) -> None:
    pipeline, outbox = _pipeline(tmp_path, input={"max_message_bytes": 1 << 20})
    hostile = [
        consumer_record(0, deep(618)),
        consumer_record(1, bytes(range(256)) * 3200),
        consumer_record(2, bytes([1, 2, 27]) * 70_000),
        consumer_record(3, query_message("hi", "k"), key=b"k" * 700_000),
        consumer_record(4, query_message("hi", "h"), headers=[("h", b"")] * 50_000),
        consumer_record(5, b'{"text": "hi", "deep": ' + b"[" * 253 + b"]" * 253 + b"}"),
        consumer_record(6, query_message(QUERIES[0][0], "ok")),
    ]
    await pipeline.dispatch(hostile)
    await wait_until(lambda: pipeline.in_flight == 0, timeout=10)
    kinds = {o.src.offset: o.kind for o in outbox.outcomes}
    assert kinds == {
        0: "too_deep",
        1: "invalid_utf8",
        2: "invalid_json",
        3: "oversized_key",
        4: "too_many_headers",
        5: "too_deep",
        6: None,
    }
    limit = pipeline.worker.record_limit
    for outcome in outbox.outcomes:
        record = outcome.record()
        size = (
            len(record.value)
            + len(record.key or b"")
            + sum(len(k) + len(v) for k, v in record.headers)
        )
        assert size <= limit
    big_key = next(o for o in outbox.outcomes if o.kind == "oversized_key").record()
    assert big_key.key is None and orjson.loads(big_key.value)["key"]["bytes"] == 700_000


async def test_an_unexpected_failure_is_that_messages_dead_letter(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise ZeroDivisionError("a bug in a transport")

    pipeline, outbox = _pipeline(tmp_path, handler)
    await pipeline.dispatch([consumer_record(0, query_message(QUERIES[0][0], "a"))])
    await wait_until(lambda: pipeline.in_flight == 0, timeout=10)
    (outcome,) = outbox.outcomes
    assert (outcome.kind, outcome.topic) == ("internal_error", "in.dlq")
    letter = orjson.loads(outcome.value)
    assert "ZeroDivisionError" in letter["error"]["reason"] and letter["error"]["stage"] == "handle"
    assert letter["decision"]["route"] == "billing"
    assert not pipeline.stopping  # the service goes on


async def test_a_misconfigured_endpoint_pauses_then_dead_letters_and_turns_not_ready(
    tmp_path: Path,
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"error": "bad key"})

    pipeline, outbox = _pipeline(tmp_path, handler, flow={"circuit_open_max_wait_s": 1.0})
    pipeline.activity.assigned_at = 0.0
    await pipeline.dispatch(
        [consumer_record(i, query_message(QUERIES[0][0], f"q{i}")) for i in range(3)]
    )
    await asyncio.sleep(0.3)
    assert outbox.outcomes == []  # waiting for the endpoint, not dead-lettering the stream
    ready, why = await pipeline.readiness()
    assert not ready and why.startswith("LLM endpoint billing misconfigured") and "401" in why
    await wait_until(lambda: pipeline.in_flight == 0, timeout=10)
    assert {o.kind for o in outbox.outcomes} == {"llm_misconfigured"}
    assert len(outbox.outcomes) == 3


async def test_an_outcome_the_broker_refuses_becomes_a_minimal_dead_letter(
    tmp_path: Path,
) -> None:
    written: list[OutRecord] = []

    async def send(record: OutRecord) -> None:
        if record.topic == "in.out":
            raise MessageSizeTooLargeError()
        written.append(record)

    async def no_commit(offsets: Any) -> None:
        return None

    outbox = AtLeastOnceOutbox(send, no_commit)
    pipeline, _ = _pipeline(tmp_path, outbox=outbox)
    await pipeline.dispatch([consumer_record(0, query_message(QUERIES[0][0], "a"))])
    await wait_until(lambda: pipeline.in_flight == 0, timeout=10)
    (record,) = written
    letter = orjson.loads(record.value)
    assert record.topic == "in.dlq" and letter["error"]["kind"] == "unpublishable"
    assert letter["error"]["stage"] == "publish" and "in.out" in letter["error"]["reason"]
    assert pipeline.stats.dead_letters == 1 and not pipeline.stopping


async def test_a_header_key_that_is_not_utf8_is_dead_lettered_with_its_bytes(
    tmp_path: Path,
) -> None:
    raw_key = b"x-\xff\xfe"
    key = raw_key.decode("utf-8", "surrogateescape")  # as HeaderTolerantConsumer hands it over
    pipeline, outbox = _pipeline(tmp_path)
    hostile = consumer_record(
        0, query_message(QUERIES[0][0], "a"), headers=[(key, b"v"), ("ok", b"1")]
    )
    await pipeline.dispatch([hostile])
    await wait_until(lambda: pipeline.in_flight == 0, timeout=10)
    (outcome,) = outbox.outcomes
    assert outcome.kind == "undecodable_header_key"
    record = outcome.record()
    assert record.headers == [("semroute-status", b"error")]  # the bad key is not re-sent
    letter = orjson.loads(record.value)
    first, second = letter["headers"]
    assert base64.b64decode(first["key_base64"]) == raw_key and first["text"] == "v"
    assert second == {"key": "ok", "text": "1"}
