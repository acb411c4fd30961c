"""``/livez`` and ``/readyz`` on a real broker: readiness follows progress, not connections."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from kafka_local import LocalKafka
from ops_helpers import http_get, wait_until
from service_helpers import QUERIES, make_settings, produce, query_message

from semroute_stream._service.app import open_service
from semroute_stream._service.pipeline import Pipeline

pytestmark = pytest.mark.kafka


def _messages(start: int, n: int) -> list[bytes | None]:
    return [query_message(QUERIES[i % len(QUERIES)][0], f"q{i}") for i in range(start, start + n)]


async def _ready(port: int) -> bool:
    return (await http_get(port, "/readyz"))[0] == 200


async def _not_ready(port: int) -> str | None:
    status, body = await http_get(port, "/readyz")
    return body if status == 503 else None


def _settings(tmp_path: Path, bootstrap: str, topic: str) -> Any:
    return make_settings(
        tmp_path,
        bootstrap,
        topic,
        mode="route_only",
        observability={"metrics_port": 0, "stall_timeout_s": 1.0},
    )


async def test_not_ready_while_the_broker_is_down_ready_again_after(
    kafka_bootstrap: str, local_kafka: LocalKafka, new_topic: Any, tmp_path: Path
) -> None:
    topic = await new_topic(partitions=1)
    async with open_service(_settings(tmp_path, kafka_bootstrap, topic)) as pipeline:
        assert pipeline.http is not None
        port = pipeline.http.port
        run = asyncio.create_task(pipeline.run())
        try:
            await wait_until(lambda: _ready(port))
            await produce(kafka_bootstrap, topic, _messages(0, 5))
            await wait_until(lambda: pipeline.stats.outcomes == 5)

            await asyncio.to_thread(local_kafka.stop, keep_data=True)
            try:
                why = await wait_until(lambda: _not_ready(port), timeout=30)
                assert why.startswith("no fetch response from the broker")
                assert await http_get(port, "/livez") == (200, "ok\n")  # alive all the same
            finally:
                await asyncio.to_thread(local_kafka.start)

            await wait_until(lambda: _ready(port), timeout=90)
            await produce(kafka_bootstrap, topic, _messages(5, 5))  # it really works again
            await wait_until(lambda: pipeline.stats.outcomes == 10, timeout=60)
            pipeline.request_stop()
            assert await pipeline.readiness() == (False, "draining")
        finally:
            pipeline.request_stop()
            await run


async def test_a_consumer_that_silently_stops_fetching_turns_not_ready(
    kafka_bootstrap: str, new_topic: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The aiokafka failure mode (aio-libs/aiokafka#1154): connected, but no records come
    out of ``getmany`` although the partition has some. Simulated by a ``getmany`` that
    returns nothing."""
    topic = await new_topic(partitions=1)
    async with open_service(_settings(tmp_path, kafka_bootstrap, topic)) as pipeline:
        assert await pipeline.readiness() == (False, "waiting for the group to assign partitions")
        run = asyncio.create_task(pipeline.run())
        try:
            await wait_until(lambda: _is_ready(pipeline))

            in_use = asyncio.Event()

            async def stuck(*args: Any, **kwargs: Any) -> dict[Any, Any]:
                in_use.set()
                await asyncio.sleep(kwargs.get("timeout_ms", 0) / 1000)
                return {}

            monkeypatch.setattr(pipeline.consumer, "getmany", stuck)
            await in_use.wait()  # the real getmany that was running has returned
            await produce(kafka_bootstrap, topic, _messages(0, 5))
            why = await wait_until(lambda: _stalled(pipeline), timeout=30)
            assert why.startswith("5 messages behind but nothing fetched for")
            monkeypatch.undo()
            await wait_until(lambda: _is_ready(pipeline))
            await wait_until(lambda: pipeline.stats.outcomes == 5)
        finally:
            pipeline.request_stop()
            await run


async def _is_ready(pipeline: Pipeline) -> bool:
    return (await pipeline.readiness())[0]


async def _stalled(pipeline: Pipeline) -> str | None:
    ready, why = await pipeline.readiness()
    return None if ready else why
