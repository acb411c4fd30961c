"""Learning from corrections on a real broker: the overlay changes routing, survives a restart,
converges across replicas, and hostile corrections never corrupt it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from ops_helpers import wait_until
from service_helpers import (
    committed_offsets,
    make_settings,
    produce,
    query_message,
    read_topic,
    settings_yaml,
)

from semroute_stream._cli.app import main
from semroute_stream._errors import ConfigError
from semroute_stream._routing.schema import load_routes, routes_version
from semroute_stream._service.app import open_service
from semroute_stream._service.corrections import CorrectionsIntake
from semroute_stream._service.kafka import topic_partitions
from semroute_stream._service.observe import metrics_response
from semroute_stream._service.overlay import normalise
from semroute_stream._service.pipeline import Pipeline
from semroute_stream._service.settings import Settings
from semroute_stream._service.topics import ensure_learning_topics

pytestmark = pytest.mark.kafka

GYM = "I want to cancel my gym membership"


def _settings(tmp_path: Path, bootstrap: str, topic: str, **learning: Any) -> Settings:
    return make_settings(
        tmp_path,
        bootstrap,
        topic,
        mode="route_only",
        learning={
            "enabled": True,
            "retrain_debounce_s": 0.1,
            "retrain_min_interval_s": 0,
            **learning,
        },
    )


def correction(text: str, label: str | None, ident: str) -> bytes:
    return orjson.dumps({"id": ident, "text": text, "label": label})


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Pipeline]:
    async with open_service(settings, serve_http=False) as pipeline:
        task = asyncio.create_task(pipeline.run())
        try:
            yield pipeline
        finally:
            pipeline.request_stop()
            await task


def _overlay_version(pipeline: Pipeline) -> str:
    assert pipeline.learner is not None
    return pipeline.learner.overlay.version


async def test_corrections_change_routing_and_bad_ones_are_dead_lettered(
    kafka_bootstrap: str, new_topic: Any, tmp_path: Path
) -> None:
    topic = await new_topic(partitions=1)
    settings = _settings(tmp_path, kafka_bootstrap, topic)
    base = _base_v(settings)
    good = [
        correction(GYM, "billing", "c1"),
        correction("how do I end my gym contract", "billing", "c2"),
        correction("the app crashes when I open it", None, "c3"),  # a base utterance: removed
    ]
    hostile = [
        (correction("book me a table", "restaurants", "h1"), "unknown_route"),
        (correction("   ", "billing", "h2"), "empty_text"),
        (b"{not json", "invalid_json"),
        (orjson.dumps({"id": "h4", "text": "hi", "label": 7}), "invalid_label"),
    ]
    async with running(settings) as pipeline:
        assert pipeline.router.version == base  # an empty overlay: the file's version
        await produce(
            kafka_bootstrap, settings.corrections_topic, [*good, *(v for v, _ in hostile)]
        )
        await wait_until(lambda: "+" in pipeline.router.version, timeout=90)
        live = pipeline.router
        assert live.version == f"{base}+{_overlay_version(pipeline)}"
        billing = live.routes.routes[live.routes.names.index("billing")].utterances
        assert GYM in billing
        assert all(
            normalise(u) != "the app crashes when i open it"
            for r in live.routes.routes
            for u in r.utterances
        )
        await produce(kafka_bootstrap, topic, [query_message(GYM, "q1")])
        (out,) = await read_topic(kafka_bootstrap, f"{topic}.out", expect=1)
        assert out["route"] == "billing"
        assert out["decision"]["routes_version"] == live.version
        expected = {0: len(good) + len(hostile)}

        async def committed() -> bool:
            group, name = settings.corrections_group, settings.corrections_topic
            return await committed_offsets(kafka_bootstrap, group, name) == expected

        await wait_until(committed, timeout=30)
    dlq = await read_topic(kafka_bootstrap, f"{topic}.dlq", expect=len(hostile))
    assert sorted(r["error"]["kind"] for r in dlq) == sorted(k for _, k in hostile)
    assert all(r["source"]["topic"] == settings.corrections_topic for r in dlq)


def _base(settings: Settings) -> Any:
    return load_routes(settings.routes)


async def test_restart_keeps_the_overlay_and_two_replicas_converge(
    kafka_bootstrap: str, new_topic: Any, tmp_path: Path
) -> None:
    topic = await new_topic(partitions=2)
    corrections = await new_topic(partitions=2)
    settings = _settings(tmp_path, kafka_bootstrap, topic, corrections_topic=corrections)
    texts = [f"question number {i} about my gym membership fee" for i in range(20)]
    labels = ["billing", "tech", "shipping", None]
    values = [correction(t, labels[i % 4], f"c{i}") for i, t in enumerate(texts)]
    # a flood of contradictory labels for one text, spread over both partitions
    flood = [correction("flip flop text", labels[i % 2], f"f{i}") for i in range(30)]
    async with running(settings) as a, running(settings) as b:
        await produce(kafka_bootstrap, corrections, values[:10], partition=0)
        await produce(kafka_bootstrap, corrections, values[10:], partition=1)
        await produce(kafka_bootstrap, corrections, flood[:15], partition=0)
        await produce(kafka_bootstrap, corrections, flood[15:], partition=1)
        await wait_until(
            lambda: (
                _overlay_version(a) == _overlay_version(b)
                and a.learner is not None
                and len(a.learner.overlay.entries) == len(texts) + 1
            ),
            timeout=90,
        )
        await wait_until(lambda: a.router.version == b.router.version != _base_v(settings))
        version = a.router.version
        assert a.learner is not None
        flip = a.learner.overlay.get("flip flop text")
        assert flip is not None and flip.quarantined  # never in the routes
        assert all("flip flop" not in u for r in a.router.routes.routes for u in r.utterances)
    async with running(settings) as again:  # a restart: the overlay is read back before routing
        assert again.router.version == version
        assert again.learner is not None and again.learner.status.live == version.split("+")[1]


def _base_v(settings: Settings) -> str:
    return routes_version(_base(settings))


async def test_overlay_show_export_rollback(
    kafka_bootstrap: str,
    new_topic: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    topic = await new_topic(partitions=1)
    settings = _settings(tmp_path, kafka_bootstrap, topic)
    config = settings_yaml(settings, tmp_path / "service.yaml")

    def cli(*args: str) -> Any:
        capsys.readouterr()
        assert main(["overlay", *args, "--config", str(config)]) == 0
        return orjson.loads(capsys.readouterr().out)

    async with running(settings) as pipeline:
        await produce(
            kafka_bootstrap, settings.corrections_topic, [correction(GYM, "billing", "c1")]
        )
        await wait_until(lambda: "+" in pipeline.router.version, timeout=60)
        first = _overlay_version(pipeline)
        await produce(
            kafka_bootstrap,
            settings.corrections_topic,
            [correction("my screen stays black", "tech", "c2"), correction(GYM, None, "c3")],
        )
        await wait_until(lambda: _overlay_version(pipeline) not in (first,), timeout=60)
        await wait_until(lambda: pipeline.router.version.endswith(_overlay_version(pipeline)))
        second = _overlay_version(pipeline)

        shown = await asyncio.to_thread(cli, "show")
        assert shown["version"] == second and shown["entries"] == 2
        assert shown["counts"] == {"null": 1, "tech": 1}
        assert shown["routes_version"] == pipeline.router.version
        assert shown["versions"][0]["version"] == "0" * 12
        assert first in [v["version"] for v in shown["versions"]]

        out = tmp_path / "exported.yaml"
        exported = await asyncio.to_thread(cli, "export", "-o", str(out))
        routes = load_routes(out)  # what fit and eval load
        assert exported["exported_routes_version"] == routes_version(routes)
        tech = routes.routes[routes.names.index("tech")].utterances
        assert "my screen stays black" in tech
        assert all(GYM not in r.utterances for r in routes.routes)

        back = await asyncio.to_thread(cli, "rollback", first)
        assert (back["from"], back["to"]) == (second, first)
        # the running replica converges on the old content and retrains
        await wait_until(lambda: pipeline.router.version.endswith("+" + first), timeout=60)
        billing = pipeline.router.routes.routes[pipeline.router.routes.names.index("billing")]
        assert GYM in billing.utterances
    assert (await asyncio.to_thread(cli, "show"))["version"] == first
    with pytest.raises(SystemExit):
        main(["overlay", "rollback", "--config", str(config)])  # no version given
    capsys.readouterr()
    args = ["overlay", "rollback", "feedbeeffeed", "--config", str(config)]
    assert await asyncio.to_thread(main, args) == 1
    assert "not found in the topic" in capsys.readouterr().err


async def test_topics_create_makes_a_compacted_overlay_and_a_wrong_one_fails_fast(
    kafka_bootstrap: str,
    new_topic: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    topic = await new_topic(partitions=2)
    settings = _settings(tmp_path, kafka_bootstrap, topic)
    config = settings_yaml(settings, tmp_path / "service.yaml")
    args = ["topics", "create", "--config", str(config), "--partitions", "2"]
    assert await asyncio.to_thread(main, args) == 0
    out = capsys.readouterr().out
    assert f"created                  {settings.overlay_topic} (overlay" in out
    overlay, corrections = settings.overlay_topic, settings.corrections_topic
    parts = await topic_partitions(settings, [overlay, corrections])
    assert (len(parts[overlay]), len(parts[corrections])) == (1, 2)
    await ensure_learning_topics(settings)  # compacted, one partition: accepted
    plain = await new_topic(partitions=1)  # cleanup.policy=delete
    wrong = _settings(tmp_path, kafka_bootstrap, topic, overlay_topic=plain)
    with pytest.raises(ConfigError, match=r"cleanup.policy=delete, needs compact"):
        await ensure_learning_topics(wrong)
    two = await new_topic(partitions=2, config={"cleanup.policy": "compact"})
    wrong = _settings(tmp_path, kafka_bootstrap, topic, overlay_topic=two)
    with pytest.raises(ConfigError, match=r"has 2 partitions, needs 1"):
        await ensure_learning_topics(wrong)


async def test_a_restart_mid_stream_keeps_the_overlay_and_loses_no_correction(
    kafka_bootstrap: str, new_topic: Any, tmp_path: Path
) -> None:
    topic = await new_topic(partitions=1)
    settings = _settings(tmp_path, kafka_bootstrap, topic, retrain_min_interval_s=0.5)
    values = [correction(f"gym fee question {i}", "billing", f"c{i}") for i in range(60)]
    await produce(kafka_bootstrap, settings.corrections_topic, values[:30])
    async with running(settings) as first:
        assert first.learner is not None
        learner = first.learner
        await wait_until(lambda: len(learner.overlay.entries) >= 10, timeout=60)
        await produce(kafka_bootstrap, settings.corrections_topic, values[30:])
        # stopped mid-stream: some corrections may be read but not committed
    async with running(settings) as second:
        assert second.learner is not None
        again = second.learner
        assert len(again.overlay.entries) >= 10  # read back before the first batch
        await wait_until(lambda: len(again.overlay.entries) == 60, timeout=60)
        await wait_until(lambda: second.router.version.endswith("+" + again.overlay.version))
        billing = second.router.routes.routes[second.router.routes.names.index("billing")]
        assert {f"gym fee question {i}" for i in range(60)} <= set(billing.utterances)


async def test_a_dead_corrections_intake_is_visible_and_the_service_still_stops_cleanly(
    kafka_bootstrap: str,
    new_topic: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    topic = await new_topic(partitions=1)
    settings = _settings(tmp_path, kafka_bootstrap, topic)

    async def broken(self: CorrectionsIntake, records: list[Any]) -> None:
        raise RuntimeError("intake bug")

    monkeypatch.setattr(CorrectionsIntake, "handle", broken)
    caplog.set_level(logging.ERROR, logger="semroute_stream")
    async with open_service(settings, serve_http=False) as pipeline:
        task = asyncio.create_task(pipeline.run())
        await produce(kafka_bootstrap, topic, [query_message(GYM, "q1")])
        await read_topic(kafka_bootstrap, f"{topic}.out", expect=1)  # assigned, routing
        await produce(
            kafka_bootstrap, settings.corrections_topic, [correction(GYM, "billing", "c1")]
        )

        async def not_ready() -> tuple[bool, str] | None:
            ready, why = await pipeline.health.readiness()
            return None if ready else (ready, why)

        _, why = await wait_until(not_ready, timeout=60)
        assert (
            why == "background task semroute-corrections-intake stopped: RuntimeError('intake bug')"
        )
        _, _, body = metrics_response(pipeline.metrics)
        assert b'semroute_task_failed{task="semroute-corrections-intake"} 1.0' in body
        assert "semroute-corrections-intake stopped" in caplog.text
        pipeline.request_stop()
        stats = await task  # the failure was reported; the run ends as usual
    assert stats.outcomes == 1
