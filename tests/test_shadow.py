"""Shadow routes: the candidate decides every batch on the live embeddings; disagreements go
to the shadow topic; the agreement counters; ``promote``; end to end on a real broker."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from fakes import FakeEncoder
from service_helpers import (
    QUERIES,
    ROUTES,
    make_settings,
    outcome_counts,
    produce,
    query_message,
    read_topic,
    settings_yaml,
)

from semroute_stream import Router, RoutesConfig
from semroute_stream._cli import main
from semroute_stream._errors import ConfigError
from semroute_stream._input import Query
from semroute_stream._routing.schema import load_routes, routes_version
from semroute_stream._service.app import open_service
from semroute_stream._service.observe import Metrics
from semroute_stream._service.records import Source
from semroute_stream._service.settings import Settings, load_settings
from semroute_stream._service.shadow import ShadowRoutes, promote
from semroute_stream._service.worker import Routed

#: The candidate: the live routes without "shipping" (one route differs).
CANDIDATE: dict[str, Any] = {
    **ROUTES,
    "routes": [r for r in ROUTES["routes"] if r["name"] != "shipping"],
}


def _settings(tmp_path: Path, **extra: Any) -> Settings:
    candidate = tmp_path / "candidate.yaml"
    candidate.write_text(yaml.safe_dump(CANDIDATE))
    return make_settings(
        tmp_path, "127.0.0.1:1", "q", mode="route_only", shadow={"routes": candidate}, **extra
    )


def _routed(router: Router, texts: list[str]) -> tuple[Any, Any, list[Routed]]:
    embeddings = router.encoder.encode(texts)
    decisions = router.decide(embeddings, texts)
    routed = []
    for i, text in enumerate(texts):
        explained = decisions.explain(i, router.table)
        explained.update(routes_version=router.version, model="fake-bow")
        src = Source("q", 0, i, None, None, ())
        routed.append(
            Routed(
                src,
                Query(text, f"q{i}", {"text": text}),
                None,
                explained,
                str(explained["route"]),
                bool(explained["is_fallback"]),
                None,
                {},
                0.0,
            )
        )
    return embeddings, decisions, routed


def test_disagreements_are_exactly_where_the_candidate_decides_otherwise(
    tmp_path: Path,
) -> None:
    encoder = FakeEncoder()
    settings = _settings(tmp_path)
    live = Router(RoutesConfig.model_validate(ROUTES), encoder, cache=False)
    candidate = Router(RoutesConfig.model_validate(CANDIDATE), encoder, cache=False)
    metrics = Metrics()
    shadow = ShadowRoutes(settings, candidate, metrics)
    texts = [t for t, _ in QUERIES] + ["where is my package", "my order has not arrived yet"]
    embeddings, decisions, routed = _routed(live, texts)
    out = shadow.compare(decisions, embeddings, texts, routed, "q.out.shadow", None)
    expected = {i for i, r in enumerate(routed) if r.route == "shipping"}
    assert expected and set(out) == expected
    for i, record in out.items():
        body = orjson.loads(record.value)
        assert record.topic == "q.out.shadow"
        assert body["live_route"] == "shipping" and body["candidate_route"] != "shipping"
        assert body["live"] == routed[i].decision
        assert body["candidate"]["routes_version"] == candidate.version
        assert body["idempotency_key"] == f"q/0/{i}"
    text = metrics.render().decode()
    assert f"semroute_shadow_decided_total {float(len(texts))}" in text
    assert f"semroute_shadow_agreed_total {float(len(texts) - len(expected))}" in text
    # the live routes as their own candidate: no disagreement at all
    same = ShadowRoutes(settings, live, Metrics())
    assert same.compare(decisions, embeddings, texts, routed, "t", None) == {}


async def test_a_candidate_that_fails_is_rejected_and_the_one_in_use_stays(
    tmp_path: Path,
) -> None:
    settings = _settings(tmp_path)
    assert settings.shadow.routes is not None
    metrics = Metrics()
    shadow = await ShadowRoutes.load(settings, FakeEncoder(), metrics)
    version = shadow.router.version
    lock = asyncio.Lock()
    assert not await shadow.check(False, lock)  # unchanged
    settings.shadow.routes.write_text("routes: [")
    assert not await shadow.check(False, lock)
    assert shadow.router.version == version
    assert (
        'semroute_shadow_routes_reloads_total{result="rejected"} 1.0' in metrics.render().decode()
    )
    settings.shadow.routes.write_text(yaml.safe_dump(ROUTES))
    assert await shadow.check(True, lock)
    assert shadow.router.version == routes_version(RoutesConfig.model_validate(ROUTES))


def test_a_candidate_that_fails_to_load_fails_the_start(tmp_path: Path) -> None:
    settings = _settings(tmp_path, endpoints={"general": "http://127.0.0.1:1"})
    assert settings.shadow.routes is not None
    settings.shadow.routes.write_text(yaml.safe_dump({**CANDIDATE, "top_k": 0}))
    with pytest.raises(ConfigError, match=r"candidate\.yaml"):
        asyncio.run(ShadowRoutes.load(settings, FakeEncoder(), Metrics()))


def test_promote_replaces_the_live_file_atomically_keeping_a_backup(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = _settings(tmp_path)
    config = settings_yaml(settings, tmp_path / "service.yaml")
    live_before = settings.routes.read_bytes()
    os.chmod(settings.routes, 0o640)
    assert main(["promote", "--config", str(config)]) == 0
    printed = capsys.readouterr().out
    assert settings.shadow.routes is not None
    assert settings.routes.read_bytes() == settings.shadow.routes.read_bytes()
    assert settings.routes.stat().st_mode & 0o777 == 0o640
    backup = settings.routes.with_name("routes.yaml.before-promote")
    assert backup.read_bytes() == live_before and str(backup) in printed
    assert routes_version(load_routes(settings.routes)) in printed
    # a candidate that is not valid live routes is refused, the live file untouched
    settings.shadow.routes.write_text(yaml.safe_dump({**CANDIDATE, "fallback": {"name": 3}}))
    before = settings.routes.read_bytes()
    assert main(["promote", "--config", str(config)]) == 2
    assert settings.routes.read_bytes() == before
    assert "candidate.yaml" in capsys.readouterr().err
    no_shadow = load_settings(config).model_copy(
        update={"shadow": settings.shadow.model_copy(update={"routes": None})}
    )
    with pytest.raises(ConfigError, match=r"shadow\.routes is not set"):
        promote(no_shadow)


def test_shadow_routes_path_is_relative_to_the_config(tmp_path: Path) -> None:
    config = tmp_path / "conf" / "service.yaml"
    config.parent.mkdir()
    config.write_text(
        yaml.safe_dump(
            {
                "routes": "routes.yaml",
                "input": {"topic": "q"},
                "output": {"responses_topic": "q.out", "dlq_topic": "q.dlq"},
                "shadow": {"routes": "candidate.yaml"},
            }
        )
    )
    settings = load_settings(config)
    assert settings.shadow.routes == config.parent / "candidate.yaml"
    assert settings.shadow_topic() == "q.out.shadow"


# ---- on a real broker ----------------------------------------------------------------------


@pytest.mark.kafka
async def test_shadow_disagreements_then_promote_on_a_live_service(
    kafka_bootstrap: str, new_topic: Any, tmp_path: Path
) -> None:
    topic = await new_topic(partitions=1)
    candidate = tmp_path / "candidate.yaml"
    candidate.write_text(yaml.safe_dump(CANDIDATE))
    settings = make_settings(
        tmp_path,
        kafka_bootstrap,
        topic,
        mode="route_only",
        delivery="exactly_once",
        shadow={"routes": candidate},
        reload={"watch_interval_s": 0.2},
    )
    config = settings_yaml(settings, tmp_path / "service.yaml")
    first = [query_message(t, f"a{i}") for i, (t, _) in enumerate(QUERIES)]
    second = [query_message(t, f"b{i}") for i, (t, _) in enumerate(QUERIES)]
    shadow_topic = f"{topic}.out.shadow"
    candidate_version = routes_version(load_routes(candidate))
    async with open_service(settings) as pipeline:
        run = asyncio.create_task(pipeline.run())
        try:
            await produce(kafka_bootstrap, topic, first)
            ok = await read_topic(kafka_bootstrap, f"{topic}.out", expect=len(first))
            shipping = {r["idempotency_key"] for r in ok if r["route"] == "shipping"}
            assert len(shipping) == 2
            shadow = await read_topic(kafka_bootstrap, shadow_topic, expect=3, timeout=8)
            assert sorted(r["idempotency_key"] for r in shadow) == sorted(shipping)
            by_key = {r["idempotency_key"]: r for r in ok}
            for rec in shadow:
                assert rec["live"] == by_key[rec["idempotency_key"]]["decision"]
                assert rec["candidate"]["routes_version"] == candidate_version
                assert rec["candidate_route"] != "shipping"
            metrics = pipeline.metrics.render().decode()
            assert "semroute_shadow_decided_total 8.0" in metrics
            assert "semroute_shadow_agreed_total 6.0" in metrics

            assert main(["promote", "--config", str(config)]) == 0
            async with asyncio.timeout(30):  # the watcher picks the new file up
                while pipeline.router.version != candidate_version:
                    await asyncio.sleep(0.1)
            await produce(kafka_bootstrap, topic, second)
            every = await read_topic(kafka_bootstrap, f"{topic}.out", expect=len(first) * 2)
        finally:
            pipeline.request_stop("test over")
            await run
    after = [r for r in every if r["id"].startswith("b")]
    assert len(after) == len(second) and set(outcome_counts(every).values()) == {1}
    assert all(r["decision"]["routes_version"] == candidate_version for r in after)
    assert not any(r["route"] == "shipping" for r in after)
    # the candidate now decides as the live routes: no new disagreement
    shadow = await read_topic(kafka_bootstrap, shadow_topic, expect=3, timeout=5)
    assert len(shadow) == 2


def test_review_and_shadow_topics_are_outputs_with_roles(tmp_path: Path) -> None:
    from semroute_stream._service.topics import output_topics, topic_roles

    settings = _settings(tmp_path, review={"enabled": True, "topic": "q.to-review"})
    routes = load_routes(settings.routes)
    assert {"q.to-review", "q.out.shadow"} <= set(output_topics(routes, settings))
    roles = dict(topic_roles(settings, routes))
    assert roles["q.to-review"] == "decisions for review"
    assert roles["q.out.shadow"] == "shadow routes' disagreements"
    off = make_settings(tmp_path, "127.0.0.1:1", "q", mode="route_only")
    assert not {"q.out.review", "q.out.shadow"} & set(output_topics(routes, off))


async def test_the_routes_watcher_reloads_the_candidate_too(tmp_path: Path) -> None:
    from semroute_stream._service.reload import LiveRoutes

    settings = _settings(tmp_path, reload={"watch_interval_s": 0})  # on request only
    assert settings.shadow.routes is not None
    encoder = FakeEncoder()
    metrics = Metrics()
    live = Router(load_routes(settings.routes), encoder, cache=False)
    routes = LiveRoutes(settings, live, {}, llm=False, metrics=metrics, on_broker=False)
    routes.shadow = await ShadowRoutes.load(settings, encoder, metrics)
    settings.shadow.routes.write_text(yaml.safe_dump(ROUTES))
    watcher = asyncio.create_task(routes.watch())
    try:
        routes.request()  # what SIGHUP does
        async with asyncio.timeout(20):
            while routes.shadow.router.version != live.version:
                await asyncio.sleep(0.05)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    assert routes.router is live  # the live routes did not change
    text = metrics.render().decode()
    assert 'semroute_shadow_routes_reloads_total{result="applied"} 1.0' in text
    assert f'semroute_shadow_routes_info{{version="{live.version}"}} 1.0' in text


async def test_open_service_fails_on_a_bad_candidate_before_any_broker_contact(
    tmp_path: Path,
) -> None:
    settings = _settings(tmp_path)  # bootstrap 127.0.0.1:1: nothing listens there
    assert settings.shadow.routes is not None
    settings.shadow.routes.write_text(yaml.safe_dump({**CANDIDATE, "routes": []}))
    with pytest.raises(ConfigError, match=r"candidate\.yaml"):
        async with open_service(settings):
            pass
