"""A pool of OpenAI-compatible chat-completions endpoints, called with one shared httpx client.

Per endpoint the pool keeps a concurrency limit, retries and a circuit breaker:

* **Concurrency.** An ``asyncio.Semaphore(max_concurrency)`` is held for each HTTP attempt only.
  It is released before the backoff sleep, so a call that is waiting to retry does not block
  other calls to the same endpoint.
* **Retries.** 429, 5xx, timeouts and connection errors (``httpx.TransportError``) are retried,
  up to ``max_attempts`` tries in all, with exponential backoff and full jitter:
  ``rand() * min(backoff_max_s, backoff_initial_s * 2 ** (attempt - 1))``. A ``Retry-After``
  header (seconds or HTTP date) replaces the jittered delay and is capped at ``backoff_max_s``.
  Other statuses and malformed bodies raise ``LLMPermanentError`` at once; running out of
  attempts raises ``LLMRetryableError`` with the last status.
* **Circuit breaker.** It counts whole calls, not attempts: a call that ends in
  ``LLMRetryableError`` (retries exhausted) is one failure. Any other outcome, including
  ``LLMPermanentError`` (the endpoint answered; the request was at fault), resets the count.
  ``circuit_failure_threshold`` consecutive failures open the breaker: calls then fail fast with
  ``CircuitOpenError`` for ``circuit_reset_s``. After that it is half-open: one trial call goes
  through while others still fail fast; a successful trial closes it, a failed one reopens it.

API keys are read from the environment once, at start-up (``resolve_api_keys``), and only ever
put in the ``Authorization`` header: they are not in any repr, log line or error message.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any, Self

import httpx
import orjson
import pydantic

from .._errors import (
    ConfigError,
    LLMMisconfiguredError,
    LLMPermanentError,
    LLMRetryableError,
)
from .._input import json_deeper_than
from .breaker import CircuitBreaker

__all__ = ["EndpointConfig", "LLMPool", "LLMResult", "resolve_api_keys"]

log = logging.getLogger(__name__)

_EXCERPT_CHARS = 200


class EndpointConfig(pydantic.BaseModel):
    """One OpenAI-compatible endpoint: requests go to ``POST {base_url}/chat/completions``."""

    model_config = pydantic.ConfigDict(extra="forbid")

    base_url: str
    model: str
    api_key_env: str | None = None
    system_prompt: str | None = None
    max_tokens: int | None = pydantic.Field(default=None, ge=1)
    temperature: float | None = pydantic.Field(default=None, ge=0.0)
    timeout_s: float = pydantic.Field(default=30.0, gt=0.0)
    max_concurrency: int = pydantic.Field(default=8, ge=1)
    max_attempts: int = pydantic.Field(default=4, ge=1)
    backoff_initial_s: float = pydantic.Field(default=0.25, ge=0.0)
    backoff_max_s: float = pydantic.Field(default=10.0, ge=0.0)
    circuit_failure_threshold: int = pydantic.Field(default=5, ge=1)
    circuit_reset_s: float = pydantic.Field(default=30.0, ge=0.0)
    #: Total time one attempt may take, body included (``timeout_s`` bounds each read only: a
    #: server that trickles a byte a second would never hit it).
    deadline_s: float = pydantic.Field(default=120.0, gt=0.0)
    #: Largest response body read; a larger one is rejected (the outcome must stay writable).
    max_response_bytes: int = pydantic.Field(default=512 * 1024, ge=1024)
    extra_headers: dict[str, str] = pydantic.Field(default_factory=dict)

    @pydantic.field_validator("base_url")
    @classmethod
    def _check_base_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")


@dataclass(frozen=True, slots=True)
class LLMResult:
    """One successful completion. ``latency_s`` covers the whole call, retries included."""

    endpoint: str
    model: str
    content: str
    finish_reason: str | None
    usage: dict[str, Any]
    attempts: int
    latency_s: float
    http_status: int


def resolve_api_keys(endpoints: Mapping[str, EndpointConfig]) -> dict[str, str]:
    """Read each endpoint's ``api_key_env`` variable; ``ConfigError`` lists every one unset.

    An empty variable counts as unset. Endpoints without ``api_key_env`` get no key.
    """
    keys: dict[str, str] = {}
    problems: list[str] = []
    for name, config in endpoints.items():
        if config.api_key_env is None:
            continue
        value = os.environ.get(config.api_key_env, "")
        if value:
            keys[name] = value
        else:
            problems.append(
                f"endpoints.{name}.api_key_env: environment variable"
                f" {config.api_key_env!r} is not set"
            )
    if problems:
        raise ConfigError("\n".join(problems))
    return keys


@dataclass(slots=True)
class _Endpoint:
    name: str
    config: EndpointConfig
    url: str
    headers: dict[str, str] = field(repr=False)
    api_key: str | None = field(repr=False)
    semaphore: asyncio.Semaphore
    breaker: CircuitBreaker
    in_flight: int = 0
    misconfigured: str | None = None  # why, while the endpoint answers 401/403/404 or garbage


class LLMPool:
    """Calls named OpenAI-compatible endpoints; use as ``async with LLMPool(...) as pool``.

    ``api_keys`` maps endpoint name to key; when omitted it is ``resolve_api_keys(endpoints)``,
    so a missing variable fails here, at start-up, with ``ConfigError``. ``clock`` (monotonic
    seconds), ``sleep`` and ``rand`` (uniform in [0, 1)) are injectable for tests.
    """

    def __init__(
        self,
        endpoints: Mapping[str, EndpointConfig],
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        api_keys: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if api_keys is None:
            api_keys = resolve_api_keys(endpoints)
        self._clock = clock
        self._sleep = sleep
        self._rand = rand
        self._endpoints: dict[str, _Endpoint] = {}
        for name, config in endpoints.items():
            key = api_keys.get(name)
            headers = dict(config.extra_headers)
            if key:
                headers["Authorization"] = f"Bearer {key}"
            self._endpoints[name] = _Endpoint(
                name=name,
                config=config,
                url=f"{config.base_url}/chat/completions",
                headers=headers,
                api_key=key or None,
                semaphore=asyncio.Semaphore(config.max_concurrency),
                breaker=CircuitBreaker(
                    name, config.circuit_failure_threshold, config.circuit_reset_s, clock
                ),
            )
        connections = sum(config.max_concurrency for config in endpoints.values())
        self._client = httpx.AsyncClient(
            transport=transport,
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        )

    def __repr__(self) -> str:
        return f"LLMPool(endpoints={list(self._endpoints)!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    @property
    def endpoints(self) -> tuple[str, ...]:
        return tuple(self._endpoints)

    def in_flight(self, endpoint: str) -> int:
        """Calls to ``endpoint`` inside ``complete``: queued, requesting or backing off."""
        return self._get(endpoint).in_flight

    def breaker_state(self, endpoint: str) -> str:
        """``"closed"``, ``"open"`` or ``"half_open"``."""
        return self._get(endpoint).breaker.state

    async def complete(
        self,
        endpoint: str,
        text: str,
        *,
        system_prompt: str | None = None,
        model: str | None = None,
        idempotency_key: str | None = None,
    ) -> LLMResult:
        """One chat completion of ``text``; the overrides beat the endpoint's defaults.

        ``idempotency_key`` is sent as the ``Idempotency-Key`` header on every attempt.
        """
        ep = self._get(endpoint)
        config = ep.config
        system = system_prompt if system_prompt is not None else config.system_prompt
        messages = [{"role": "system", "content": system}] if system is not None else []
        messages.append({"role": "user", "content": text})
        payload: dict[str, Any] = {"model": model or config.model, "messages": messages}
        if config.max_tokens is not None:
            payload["max_tokens"] = config.max_tokens
        if config.temperature is not None:
            payload["temperature"] = config.temperature
        headers = dict(ep.headers)
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key

        is_trial = ep.breaker.admit()
        ep.in_flight += 1
        try:
            result = await self._call(ep, payload, headers)
        except LLMRetryableError:
            self._record(ep, ok=False)
            raise
        except LLMMisconfiguredError as err:
            if ep.misconfigured is None:
                log.error(
                    "LLM endpoint %s is misconfigured, paused for %.1fs at a time: %s",
                    ep.name,
                    ep.config.circuit_reset_s,
                    err,
                )
            ep.misconfigured = str(err).removeprefix(f"{ep.name}: ")
            ep.breaker.trip()
            raise
        except LLMPermanentError:
            self._record(ep, ok=True)
            raise
        finally:
            ep.in_flight -= 1
            if is_trial:
                ep.breaker.end_trial()
        self._record(ep, ok=True)
        if ep.misconfigured is not None:
            log.warning("LLM endpoint %s answers again", ep.name)
            ep.misconfigured = None
        return result

    def unavailable_for(self, endpoint: str) -> float:
        """Seconds since the endpoint's breaker opened (0 while it is closed): an outage or a
        misconfiguration that trial calls have not ended yet."""
        breaker = self._get(endpoint).breaker
        return 0.0 if breaker.down_since is None else self._clock() - breaker.down_since

    def misconfigured(self) -> dict[str, str]:
        """The endpoints that answered 401/403/404 or not a chat completion, and why."""
        return {name: ep.misconfigured for name, ep in self._endpoints.items() if ep.misconfigured}

    def _get(self, endpoint: str) -> _Endpoint:
        try:
            return self._endpoints[endpoint]
        except KeyError:
            raise KeyError(f"unknown LLM endpoint {endpoint!r}") from None

    def _record(self, ep: _Endpoint, *, ok: bool) -> None:
        if ep.breaker.record(ok=ok):
            log.warning(
                "LLM endpoint %s: circuit breaker open for %.1fs",
                ep.name,
                ep.config.circuit_reset_s,
            )

    async def _call(
        self, ep: _Endpoint, payload: dict[str, Any], headers: dict[str, str]
    ) -> LLMResult:
        config = ep.config
        started = self._clock()
        status: int | None = None
        retry_after: float | None = None
        reason = ""
        for attempt in range(1, config.max_attempts + 1):
            try:
                async with ep.semaphore, asyncio.timeout(config.deadline_s):
                    response, body = await self._post(ep, payload, headers)
            except TimeoutError:
                status, retry_after = None, None
                reason = f"no complete answer within deadline_s={config.deadline_s:g}"
            except httpx.TransportError as exc:
                status, retry_after, reason = None, None, _describe(exc)
            except httpx.HTTPError as exc:  # e.g. a body that fails to decompress
                raise LLMPermanentError(_describe(exc), endpoint=ep.name) from exc
            else:
                if response.status_code != 429 and response.status_code < 500:
                    latency = self._clock() - started
                    return _parse(
                        ep,
                        response.status_code,
                        body,
                        model=payload["model"],
                        attempt=attempt,
                        latency_s=latency,
                    )
                status = response.status_code
                retry_after = _parse_retry_after(response.headers.get("Retry-After"), time.time())
                reason = f"HTTP {status}"
            if attempt < config.max_attempts:
                delay = self._backoff(config, attempt, retry_after)
                log.debug(
                    "LLM endpoint %s: attempt %d failed (%s); retrying in %.2fs",
                    ep.name,
                    attempt,
                    reason,
                    delay,
                )
                await self._sleep(delay)
        raise LLMRetryableError(
            f"{reason} (gave up after {config.max_attempts} attempts)",
            endpoint=ep.name,
            status=status,
            retry_after=retry_after,
        )

    async def _post(
        self, ep: _Endpoint, payload: dict[str, Any], headers: dict[str, str]
    ) -> tuple[httpx.Response, bytes]:
        """POST and read the body, at most ``max_response_bytes`` of it."""
        limit = ep.config.max_response_bytes
        request = self._client.build_request(
            "POST", ep.url, json=payload, headers=headers, timeout=ep.config.timeout_s
        )
        response = await self._client.send(request, stream=True)
        try:
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > limit:
                    raise LLMPermanentError(
                        f"response larger than max_response_bytes={limit}",
                        endpoint=ep.name,
                        status=response.status_code,
                    )
                chunks.append(chunk)
        finally:
            await response.aclose()
        return response, b"".join(chunks)

    def _backoff(self, config: EndpointConfig, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, config.backoff_max_s)
        ceiling = min(config.backoff_max_s, config.backoff_initial_s * 2.0 ** (attempt - 1))
        return self._rand() * ceiling


_MISCONFIGURED = {401: "unauthorised", 403: "forbidden", 404: "not found"}
_USAGE_DEPTH = 8


def _parse(
    ep: _Endpoint,
    status: int,
    raw: bytes,
    *,
    model: str,
    attempt: int,
    latency_s: float,
) -> LLMResult:
    """Turn a non-retryable response into a result, or raise ``LLMPermanentError``
    (``LLMMisconfiguredError`` for 401/403/404 and a 200 that is not a chat completion).

    ``model`` is the one requested; the result reports the one the server says it used, if any.
    """
    text = raw.decode("utf-8", "replace")
    if status in _MISCONFIGURED:
        raise LLMMisconfiguredError(
            f"HTTP {status} ({_MISCONFIGURED[status]}): {_excerpt(text, ep.api_key)}",
            endpoint=ep.name,
            status=status,
        )
    if not 200 <= status < 300:
        raise LLMPermanentError(
            f"HTTP {status}: {_excerpt(text, ep.api_key)}", endpoint=ep.name, status=status
        )
    malformed = LLMMisconfiguredError(
        f"malformed response (not a chat completion): {_excerpt(text, ep.api_key)}",
        endpoint=ep.name,
        status=status,
    )
    try:
        body = orjson.loads(raw)  # a limit of its own on nesting (no RecursionError)
        choice = body["choices"][0]
        content = choice["message"].get("content")
        finish_reason = choice.get("finish_reason")
    except (orjson.JSONDecodeError, LookupError, TypeError, AttributeError):
        raise malformed from None
    if not isinstance(content, str | None) or not isinstance(finish_reason, str | None):
        raise malformed
    usage = body.get("usage")
    if not isinstance(usage, dict):
        usage = {}
    elif json_deeper_than(raw, usage, _USAGE_DEPTH):
        usage = {"dropped": f"nested deeper than {_USAGE_DEPTH} levels"}
    served = body.get("model")
    return LLMResult(
        endpoint=ep.name,
        model=served if isinstance(served, str) else model,
        content=content or "",
        finish_reason=finish_reason,
        usage=usage,
        attempts=attempt,
        latency_s=latency_s,
        http_status=status,
    )


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _excerpt(text: str, secret: str | None) -> str:
    """The start of a response body on one line, with the API key blanked out if it is echoed."""
    if secret:
        text = text.replace(secret, "***")
    flat = " ".join(text.split())
    return flat if len(flat) <= _EXCERPT_CHARS else flat[:_EXCERPT_CHARS] + "…"


def _parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta seconds or HTTP date), or None."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            date = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if date.tzinfo is None:  # "-0000": UTC, zone unknown
            date = date.replace(tzinfo=UTC)
        seconds = date.timestamp() - now
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)
