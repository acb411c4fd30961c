"""LLMPool against httpx.MockTransport, with a fake clock, sleep and random source."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import pydantic
import pytest
from llm_stub import LLMStub, expected_content

from semroute_stream._errors import (
    CircuitOpenError,
    ConfigError,
    LLMPermanentError,
    LLMRetryableError,
)
from semroute_stream._service.llm import (
    EndpointConfig,
    LLMPool,
    LLMResult,
    _parse_retry_after,
    resolve_api_keys,
)

SECRET = "sk-test-0123456789abcdef"
Handler = Callable[[httpx.Request], Any]


def ok(request: httpx.Request) -> httpx.Response:
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": "hello"},
        "finish_reason": "stop",
    }
    usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    body = {"id": "cmpl-1", "model": "served-model", "choices": [choice], "usage": usage}
    return httpx.Response(200, json=body)


class FakeTime:
    """A clock that only moves when the pool sleeps (or a test advances it)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


class Recorder:
    """A MockTransport handler that records requests and answers from a script (last repeats)."""

    def __init__(self, *script: Handler | httpx.Response | Exception) -> None:
        self.script = list(script)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        step = self.script[min(len(self.requests), len(self.script)) - 1]
        if isinstance(step, Exception):
            raise step
        if isinstance(step, httpx.Response):
            return step
        response: httpx.Response = step(request)
        return response


def config(**overrides: Any) -> EndpointConfig:
    fields: dict[str, Any] = {"base_url": "http://llm.test/v1", "model": "m1"}
    return EndpointConfig(**(fields | overrides))


def make_pool(
    handler: Handler,
    fake: FakeTime | None = None,
    *,
    api_keys: dict[str, str] | None = None,
    **overrides: Any,
) -> LLMPool:
    fake = fake or FakeTime()
    return LLMPool(
        {"ep": config(**overrides)},
        transport=httpx.MockTransport(handler),
        api_keys=api_keys or {},
        clock=fake.clock,
        sleep=fake.sleep,
        rand=lambda: 0.5,
    )


async def test_success_parses_content_usage_and_finish_reason() -> None:
    async with make_pool(ok) as pool:
        result = await pool.complete("ep", "hi")
    assert result == LLMResult(
        endpoint="ep",
        model="served-model",
        content="hello",
        finish_reason="stop",
        usage={"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        attempts=1,
        latency_s=0.0,
        http_status=200,
    )


async def test_request_body_carries_endpoint_defaults() -> None:
    recorder = Recorder(ok)
    pool = make_pool(recorder, system_prompt="be brief", max_tokens=64, temperature=0.2)
    async with pool:
        await pool.complete("ep", "hi")
    (request,) = recorder.requests
    assert request.method == "POST"
    assert str(request.url) == "http://llm.test/v1/chat/completions"
    assert json.loads(request.content) == {
        "model": "m1",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
        ],
        "max_tokens": 64,
        "temperature": 0.2,
    }


async def test_route_overrides_reach_the_request() -> None:
    recorder = Recorder(ok)
    async with make_pool(recorder, system_prompt="default") as pool:
        await pool.complete(
            "ep", "hi", system_prompt="you route billing", model="m2", idempotency_key="k-1"
        )
    (request,) = recorder.requests
    assert json.loads(request.content) == {
        "model": "m2",
        "messages": [
            {"role": "system", "content": "you route billing"},
            {"role": "user", "content": "hi"},
        ],
    }
    assert request.headers["Idempotency-Key"] == "k-1"


async def test_result_model_falls_back_to_the_requested_one() -> None:
    minimal = {"choices": [{"message": {"content": None}}]}
    async with make_pool(Recorder(httpx.Response(200, json=minimal))) as pool:
        result = await pool.complete("ep", "hi", model="m2")
    assert (result.model, result.content, result.finish_reason, result.usage) == (
        "m2",
        "",
        None,
        {},
    )


async def test_no_system_message_without_a_system_prompt() -> None:
    recorder = Recorder(ok)
    async with make_pool(recorder) as pool:
        await pool.complete("ep", "hi")
    assert json.loads(recorder.requests[0].content)["messages"] == [
        {"role": "user", "content": "hi"}
    ]


async def test_authorization_header_and_the_key_stays_secret() -> None:
    # The server echoes the key back in a 401 body; the error must not repeat it.
    recorder = Recorder(ok, httpx.Response(401, text=f"bad key {SECRET}"))
    pool = make_pool(recorder, api_keys={"ep": SECRET}, extra_headers={"X-Team": "a"})
    async with pool:
        await pool.complete("ep", "hi")
        with pytest.raises(LLMPermanentError) as caught:
            await pool.complete("ep", "hi")
    assert recorder.requests[0].headers["Authorization"] == f"Bearer {SECRET}"
    assert recorder.requests[0].headers["X-Team"] == "a"
    assert caught.value.status == 401
    for text in (repr(pool), str(pool), str(caught.value), repr(caught.value)):
        assert SECRET not in text
    assert "bad key ***" in str(caught.value)


async def test_no_authorization_header_without_a_key() -> None:
    recorder = Recorder(ok)
    async with make_pool(recorder) as pool:
        await pool.complete("ep", "hi")
    assert "Authorization" not in recorder.requests[0].headers


async def test_503_twice_then_success() -> None:
    fake = FakeTime()
    recorder = Recorder(httpx.Response(503), httpx.Response(503), ok)
    async with make_pool(recorder, fake, backoff_initial_s=1.0) as pool:
        result = await pool.complete("ep", "hi")
    assert result.attempts == 3
    assert len(recorder.requests) == 3
    # Full jitter with rand() == 0.5: half of 1s, then half of 2s.
    assert fake.sleeps == [0.5, 1.0]
    assert result.latency_s == 1.5


async def test_backoff_is_capped_at_backoff_max() -> None:
    fake = FakeTime()
    recorder = Recorder(httpx.Response(500))
    pool = make_pool(recorder, fake, max_attempts=5, backoff_initial_s=1.0, backoff_max_s=3.0)
    async with pool:
        with pytest.raises(LLMRetryableError):
            await pool.complete("ep", "hi")
    assert fake.sleeps == [0.5, 1.0, 1.5, 1.5]


async def test_429_retry_after_seconds_is_honoured_and_capped() -> None:
    fake = FakeTime()
    recorder = Recorder(
        httpx.Response(429, headers={"Retry-After": "2"}),
        httpx.Response(429, headers={"Retry-After": "120"}),
        ok,
    )
    async with make_pool(recorder, fake, backoff_max_s=10.0) as pool:
        result = await pool.complete("ep", "hi")
    assert result.attempts == 3
    assert fake.sleeps == [2.0, 10.0]


async def test_429_retry_after_http_date() -> None:
    fake = FakeTime()
    recorder = Recorder(
        httpx.Response(429, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}), ok
    )
    async with make_pool(recorder, fake) as pool:
        await pool.complete("ep", "hi")
    assert fake.sleeps == [0.0]  # a date in the past: retry at once


def test_parse_retry_after() -> None:
    now = 1445412480.0  # Wed, 21 Oct 2015 07:28:00 GMT
    assert _parse_retry_after(None, now) is None
    assert _parse_retry_after("3", now) == 3.0
    assert _parse_retry_after("1.5", now) == 1.5
    assert _parse_retry_after("-4", now) == 0.0
    assert _parse_retry_after("Wed, 21 Oct 2015 07:28:07 GMT", now) == 7.0
    assert _parse_retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now) == 0.0
    assert _parse_retry_after("soon", now) is None
    assert _parse_retry_after("inf", now) is None


async def test_400_is_permanent_at_once() -> None:
    fake = FakeTime()
    recorder = Recorder(httpx.Response(400, json={"error": {"message": "bad " + "x" * 500}}))
    async with make_pool(recorder, fake) as pool:
        with pytest.raises(LLMPermanentError) as caught:
            await pool.complete("ep", "hi")
    assert len(recorder.requests) == 1
    assert fake.sleeps == []
    assert caught.value.status == 400
    assert caught.value.endpoint == "ep"
    assert "bad xxx" in str(caught.value)
    assert len(str(caught.value)) < 300


@pytest.mark.parametrize(
    "error",
    [
        httpx.ReadTimeout("timed out"),
        httpx.ConnectError("connection refused"),
    ],
)
async def test_transport_errors_are_retried_then_exhausted(error: Exception) -> None:
    fake = FakeTime()
    recorder = Recorder(error)
    async with make_pool(recorder, fake, max_attempts=3) as pool:
        with pytest.raises(LLMRetryableError) as caught:
            await pool.complete("ep", "hi")
    assert len(recorder.requests) == 3
    assert len(fake.sleeps) == 2
    assert caught.value.status is None
    assert type(error).__name__ in str(caught.value)
    assert "gave up after 3 attempts" in str(caught.value)


async def test_exhausted_retries_carry_the_last_status() -> None:
    recorder = Recorder(httpx.ConnectError("refused"), httpx.Response(502))
    async with make_pool(recorder, max_attempts=2) as pool:
        with pytest.raises(LLMRetryableError) as caught:
            await pool.complete("ep", "hi")
    assert caught.value.status == 502


async def test_timeout_then_success() -> None:
    recorder = Recorder(httpx.ReadTimeout("timed out"), ok)
    async with make_pool(recorder) as pool:
        assert (await pool.complete("ep", "hi")).attempts == 2


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b"{}",
        b'{"choices": []}',
        b'{"choices": [{"finish_reason": "stop"}]}',
        b'{"choices": [{"message": {"content": 42}}]}',
        b'{"choices": "abc"}',
    ],
)
async def test_malformed_body_is_permanent(body: bytes) -> None:
    recorder = Recorder(httpx.Response(200, content=body))
    async with make_pool(recorder) as pool:
        with pytest.raises(LLMPermanentError, match="malformed response") as caught:
            await pool.complete("ep", "hi")
    assert len(recorder.requests) == 1
    assert caught.value.status == 200


async def test_undecodable_body_is_permanent() -> None:
    gzip = {"Content-Encoding": "gzip"}
    garbage = httpx.Response(200, headers=gzip, stream=httpx.ByteStream(b"not gzip"))
    async with make_pool(Recorder(garbage)) as pool:
        with pytest.raises(LLMPermanentError, match="DecodingError"):
            await pool.complete("ep", "hi")


async def test_semaphore_bounds_concurrency() -> None:
    current = seen = 0

    async def slow(request: httpx.Request) -> httpx.Response:
        nonlocal current, seen
        current += 1
        seen = max(seen, current)
        for _ in range(5):
            await asyncio.sleep(0)
        current -= 1
        return ok(request)

    async with make_pool(slow, max_concurrency=3) as pool:
        calls = [asyncio.create_task(pool.complete("ep", f"q{i}")) for i in range(20)]
        await asyncio.sleep(0)
        assert pool.in_flight("ep") == 20
        await asyncio.gather(*calls)
        assert pool.in_flight("ep") == 0
    assert seen == 3


async def test_backoff_does_not_hold_the_semaphore() -> None:
    # max_concurrency=1: while the first call sleeps before its retry, the second one gets through.
    backing_off = asyncio.Event()
    release = asyncio.Event()

    async def gated_sleep(seconds: float) -> None:
        backing_off.set()
        await release.wait()

    recorder = Recorder(httpx.Response(503), ok)
    pool = LLMPool(
        {"ep": config(max_concurrency=1)},
        transport=httpx.MockTransport(recorder),
        api_keys={},
        sleep=gated_sleep,
    )
    async with pool:
        first = asyncio.create_task(pool.complete("ep", "first"))
        await backing_off.wait()
        second = await pool.complete("ep", "second")
        assert second.attempts == 1
        release.set()
        assert (await first).attempts == 2


async def test_circuit_opens_fails_fast_half_opens_and_closes() -> None:
    fake = FakeTime()
    recorder = Recorder(httpx.Response(503))
    pool = make_pool(
        recorder, fake, max_attempts=2, circuit_failure_threshold=2, circuit_reset_s=30.0
    )
    async with pool:
        assert pool.breaker_state("ep") == "closed"
        for _ in range(2):
            with pytest.raises(LLMRetryableError):
                await pool.complete("ep", "hi")
        assert len(recorder.requests) == 4  # the threshold counts calls, not attempts
        assert pool.breaker_state("ep") == "open"

        fake.now += 10.0
        with pytest.raises(CircuitOpenError, match=r"open for 20\.0s more") as caught:
            await pool.complete("ep", "hi")
        assert caught.value.endpoint == "ep"
        assert len(recorder.requests) == 4

        fake.now += 19.0
        assert pool.breaker_state("ep") == "open"
        fake.now += 1.0
        assert pool.breaker_state("ep") == "half_open"

        recorder.script = [ok]
        result = await pool.complete("ep", "hi")
        assert result.content == "hello"
        assert pool.breaker_state("ep") == "closed"


async def test_failed_trial_reopens_the_circuit() -> None:
    fake = FakeTime()
    recorder = Recorder(httpx.Response(500))
    pool = make_pool(recorder, fake, max_attempts=1, circuit_failure_threshold=1)
    async with pool:
        with pytest.raises(LLMRetryableError):
            await pool.complete("ep", "hi")
        assert pool.breaker_state("ep") == "open"
        fake.now += 30.0
        assert pool.breaker_state("ep") == "half_open"
        with pytest.raises(LLMRetryableError):
            await pool.complete("ep", "trial")
        assert pool.breaker_state("ep") == "open"
        assert len(recorder.requests) == 2


async def test_half_open_lets_one_trial_through() -> None:
    fake = FakeTime()
    trial_started = asyncio.Event()
    finish_trial = asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content)["messages"][-1]["content"] == "fail":
            return httpx.Response(500)
        trial_started.set()
        await finish_trial.wait()
        return ok(request)

    pool = make_pool(handler, fake, max_attempts=1, circuit_failure_threshold=1)
    async with pool:
        with pytest.raises(LLMRetryableError):
            await pool.complete("ep", "fail")
        fake.now += 30.0
        trial = asyncio.create_task(pool.complete("ep", "trial"))
        await trial_started.wait()
        with pytest.raises(CircuitOpenError):
            await pool.complete("ep", "meanwhile")
        finish_trial.set()
        await trial
        assert pool.breaker_state("ep") == "closed"


async def test_cancelled_trial_frees_the_trial_slot() -> None:
    fake = FakeTime()
    trial_started = asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        text = json.loads(request.content)["messages"][-1]["content"]
        if text == "fail":
            return httpx.Response(500)
        if text == "hang":
            trial_started.set()
            await asyncio.Event().wait()
        return ok(request)

    pool = make_pool(handler, fake, max_attempts=1, circuit_failure_threshold=1)
    async with pool:
        with pytest.raises(LLMRetryableError):
            await pool.complete("ep", "fail")
        fake.now += 30.0
        trial = asyncio.create_task(pool.complete("ep", "hang"))
        await trial_started.wait()
        trial.cancel()
        with pytest.raises(asyncio.CancelledError):
            await trial
        assert pool.breaker_state("ep") == "half_open"
        assert pool.in_flight("ep") == 0
        await pool.complete("ep", "second trial")
        assert pool.breaker_state("ep") == "closed"


async def test_permanent_errors_do_not_open_the_circuit() -> None:
    recorder = Recorder(httpx.Response(400))
    async with make_pool(recorder, circuit_failure_threshold=1) as pool:
        for _ in range(3):
            with pytest.raises(LLMPermanentError):
                await pool.complete("ep", "hi")
        assert pool.breaker_state("ep") == "closed"


async def test_pool_introspection_and_unknown_endpoint() -> None:
    pool = LLMPool(
        {"a": config(), "b": config(max_concurrency=2)},
        transport=httpx.MockTransport(ok),
        api_keys={},
    )
    async with pool:
        assert pool.endpoints == ("a", "b")
        assert pool.in_flight("a") == 0
        with pytest.raises(KeyError, match="nope"):
            await pool.complete("nope", "hi")
    assert repr(pool) == "LLMPool(endpoints=['a', 'b'])"


def test_endpoint_config_validation() -> None:
    assert config(base_url="http://h/v1/").base_url == "http://h/v1"
    with pytest.raises(pydantic.ValidationError):
        config(base_url="h/v1")
    with pytest.raises(pydantic.ValidationError):
        config(max_concurrency=0)
    with pytest.raises(pydantic.ValidationError):
        config(max_attempts=0)
    with pytest.raises(pydantic.ValidationError):
        config(surprise=True)


def test_resolve_api_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEY_A", "ka")
    monkeypatch.delenv("KEY_B", raising=False)
    monkeypatch.setenv("KEY_C", "")
    endpoints = {
        "a": config(api_key_env="KEY_A"),
        "b": config(api_key_env="KEY_B"),
        "c": config(api_key_env="KEY_C"),
        "d": config(),
    }
    with pytest.raises(ConfigError) as caught:
        resolve_api_keys(endpoints)
    message = str(caught.value)
    assert "endpoints.b.api_key_env" in message and "'KEY_B'" in message
    assert "endpoints.c.api_key_env" in message and "'KEY_C'" in message
    assert "endpoints.a" not in message

    monkeypatch.setenv("KEY_B", "kb")
    monkeypatch.setenv("KEY_C", "kc")
    assert resolve_api_keys(endpoints) == {"a": "ka", "b": "kb", "c": "kc"}


def test_pool_resolves_keys_at_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    with pytest.raises(ConfigError, match="NO_SUCH_KEY"):
        LLMPool({"ep": config(api_key_env="NO_SUCH_KEY")})


# -- against a real HTTP server on loopback (tests/llm_stub.py) ----------------------------------


async def test_real_http_round_trip_with_retries(llm_stub: LLMStub) -> None:
    llm_stub.api_key = SECRET
    llm_stub.fail_next(1, status=503, retry_after=0)
    llm_stub.fail_next(1, disconnect=True)
    endpoints = {"real": EndpointConfig(base_url=llm_stub.url, model="m1", max_tokens=16)}
    async with LLMPool(endpoints, api_keys={"real": SECRET}, rand=lambda: 0.0) as pool:
        result = await pool.complete(
            "real", "Why was I charged twice?", system_prompt="Billing desk.", model="m2"
        )
    messages = [
        {"role": "system", "content": "Billing desk."},
        {"role": "user", "content": "Why was I charged twice?"},
    ]
    assert result.content == expected_content(messages)
    assert (result.model, result.attempts, result.http_status) == ("m2", 3, 200)
    assert result.usage["prompt_tokens"] == 7
    last = llm_stub.requests[-1]
    assert last.headers["authorization"] == f"Bearer {SECRET}"
    assert last.body == {"model": "m2", "messages": messages, "max_tokens": 16}


async def test_real_http_concurrency_limit_and_connection_refused(llm_stub: LLMStub) -> None:
    llm_stub.latency = 0.05
    endpoints = {"real": EndpointConfig(base_url=llm_stub.url, model="m1", max_concurrency=2)}
    fake = FakeTime()
    async with LLMPool(endpoints, api_keys={}, sleep=fake.sleep) as pool:
        results = await asyncio.gather(*(pool.complete("real", f"q{i}") for i in range(6)))
        assert [r.content for r in results] == [f"echo: q{i}" for i in range(6)]
        assert llm_stub.max_in_flight == 2

        llm_stub.stop()
        with pytest.raises(LLMRetryableError, match="ConnectError") as caught:
            await pool.complete("real", "anyone there?")
    assert caught.value.status is None
    assert len(fake.sleeps) == 3  # max_attempts=4
