"""Hot reload of the routes file: swapped between batches, bad files rejected."""

from __future__ import annotations

import asyncio
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import yaml
from fakes import FakeEncoder, MemoryOutbox
from ops_helpers import wait_until
from service_helpers import ROUTES, make_settings, produce, query_message, read_topic

from semroute_stream._routing.router import Router
from semroute_stream._routing.schema import load_routes, parse_routes, routes_version
from semroute_stream._service.app import open_service
from semroute_stream._service.llm import LLMPool
from semroute_stream._service.pipeline import Pipeline
from semroute_stream._service.worker import Worker

COOKING = {
    "name": "cooking",
    "endpoint": "general",
    "utterances": [
        "recommend a good recipe for banana bread",
        "how long do I bake a cake",
        "what can I cook for dinner tonight",
    ],
}
V2 = {**ROUTES, "routes": [*ROUTES["routes"], COOKING]}


def _write(path: Path, data: Any) -> None:
    """Replace the file atomically, as editors and config managers do."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    os.replace(tmp, path)


def _pipeline(tmp_path: Path, *, mode: str = "route_only", **sections: Any) -> Pipeline:
    endpoints = {"billing": "http://127.0.0.1:1/v1", "support": "http://127.0.0.1:1/v1"}
    endpoints["general"] = endpoints["billing"]
    settings = make_settings(
        tmp_path, "127.0.0.1:1", "in", mode=mode, endpoints=endpoints, **sections
    )
    router = Router(load_routes(settings.routes), FakeEncoder())
    llm = LLMPool(settings.endpoints, api_keys={}) if mode == "llm" else None
    consumer: Any = object()  # never used: these tests only reload
    return Pipeline(settings, router, consumer, MemoryOutbox(), Worker(settings, llm))


async def test_a_valid_change_is_swapped_in(tmp_path: Path) -> None:
    pipeline = _pipeline(tmp_path)
    old = pipeline.router
    assert not await pipeline.reload_routes()  # unchanged: nothing to do
    _write(pipeline.settings.routes, V2)
    assert await pipeline.reload_routes()
    assert pipeline.router is not old
    assert pipeline.router.version == routes_version(parse_routes(V2)) != old.version
    assert "cooking" in pipeline.router.routes.names
    assert b'semroute_routes_info{version="' + pipeline.router.version.encode() in (
        pipeline.metrics.render()
    )


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("routes: [unclosed", "invalid YAML"),
        ({**ROUTES, "default_treshold": 0.3}, "did you mean 'default_threshold'"),
        ({**ROUTES, "routes": [*ROUTES["routes"], {**COOKING, "name": "billing"}]}, "billing"),
    ],
)
async def test_a_bad_file_is_rejected_and_the_old_routes_stay(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: Any, reason: str
) -> None:
    pipeline = _pipeline(tmp_path)
    old = pipeline.router
    _write(pipeline.settings.routes, content)
    with caplog.at_level(logging.ERROR, logger="semroute_stream"):
        assert not await pipeline.reload_routes()
    assert pipeline.router is old
    (line,) = [r for r in caplog.records if "reload rejected" in r.getMessage()]
    assert f"keeping version {old.version}" in line.getMessage() and reason in line.getMessage()
    assert b'semroute_routes_reloads_total{result="rejected"} 1.0' in pipeline.metrics.render()


async def test_llm_mode_rejects_routes_whose_endpoint_is_not_configured(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pipeline = _pipeline(tmp_path, mode="llm")
    old = pipeline.router
    _write(
        pipeline.settings.routes,
        {**V2, "routes": [*ROUTES["routes"], {**COOKING, "endpoint": "chef"}]},
    )
    with caplog.at_level(logging.ERROR, logger="semroute_stream"):
        assert not await pipeline.reload_routes()
    assert pipeline.router is old
    assert "'chef' is not defined in the service config's endpoints" in caplog.text
    _write(pipeline.settings.routes, V2)
    assert await pipeline.reload_routes()
    assert pipeline.routes.targets["cooking"].endpoint == "general"


async def test_sighup_path_reloads_without_a_file_watch(tmp_path: Path) -> None:
    pipeline = _pipeline(tmp_path, reload={"watch_interval_s": 0})
    old = pipeline.router.version
    watcher = asyncio.create_task(pipeline.routes.watch())
    try:
        _write(pipeline.settings.routes, V2)
        await asyncio.sleep(0.1)  # the watcher waits for a request only: no reload yet
        assert pipeline.router.version == old
        pipeline.request_reload()  # what SIGHUP does
        await wait_until(lambda: pipeline.router.version != old, timeout=10)
    finally:
        watcher.cancel()


# ---- on a real broker ------------------------------------------------------------------


@pytest.mark.kafka
async def test_hot_reload_mid_stream_loses_nothing_and_versions_the_outcomes(
    kafka_bootstrap: str, new_topic: Any, tmp_path: Path
) -> None:
    topic = await new_topic(partitions=2)
    settings = make_settings(
        tmp_path, kafka_bootstrap, topic, mode="route_only", reload={"watch_interval_s": 0.1}
    )
    banana = "recommend a good recipe for banana bread"
    texts = ["where is my package", "I was charged twice", banana, "the app crashes"]
    n = 40
    msgs = [query_message(texts[i % len(texts)], f"q{i}") for i in range(2 * n)]
    async with open_service(settings) as pipeline:
        v1 = pipeline.router.version
        run = asyncio.create_task(pipeline.run())
        try:
            await produce(kafka_bootstrap, topic, msgs[:n])
            await wait_until(lambda: pipeline.stats.outcomes >= 10)
            _write(settings.routes, V2)  # while the first half is still being routed
            await wait_until(lambda: pipeline.router.version != v1, timeout=30)
            v2 = pipeline.router.version
            await produce(kafka_bootstrap, topic, msgs[n:])
            await wait_until(lambda: pipeline.stats.outcomes == 2 * n, timeout=60)
        finally:
            pipeline.request_stop()
            await run

    out = await read_topic(kafka_bootstrap, f"{topic}.out", expect=2 * n)
    assert sorted(r["id"] for r in out) == sorted(f"q{i}" for i in range(2 * n))  # one each
    versions = {r["decision"]["routes_version"] for r in out}
    assert versions == {v1, v2}
    by_partition: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in out:
        by_partition[r["source"]["partition"]].append(r)
    for records in by_partition.values():  # per partition: v1 ... v1 v2 ... v2, never back
        order = [
            r["decision"]["routes_version"]
            for r in sorted(records, key=lambda r: r["source"]["offset"])
        ]
        assert order == sorted(order, key=lambda v: v == v2)
    for r in out:
        if r["input"]["text"] == banana:
            expected = "cooking" if r["decision"]["routes_version"] == v2 else "fallback"
            assert r["route"] == expected
        if int(r["id"][1:]) >= n:  # produced after the swap
            assert r["decision"]["routes_version"] == v2
