"""``semroute-stream check``: what it finds, and its exit status."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from llm_stub import LLMStub
from service_helpers import make_settings, settings_yaml

from semroute_stream._cli.app import main
from semroute_stream._service.check import Finding, check


def test_an_unreadable_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().out.startswith("FAIL  config")


async def _check(config: Path) -> tuple[int, list[Finding]]:
    found: list[Finding] = []
    code = await check(config, say=found.append)
    return code, found


def _lines(found: list[Finding], status: str) -> list[str]:
    return [f"{f.what} {f.detail}" for f in found if f.status == status]


@pytest.mark.kafka
async def test_check_passes_then_names_each_problem(
    kafka_bootstrap: str, new_topic: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    topics = [await new_topic(partitions=p) for p in (2, 1, 1)]
    models = ("billing-model", "support-model", "general-model")
    with LLMStub(models=models) as stub:
        endpoints = {"billing": stub.url, "support": stub.url, "general": stub.url}
        settings = make_settings(
            tmp_path,
            kafka_bootstrap,
            topics[0],
            endpoints=endpoints,
            output={"responses_topic": topics[1], "dlq_topic": topics[2]},
        )
        code, found = await _check(settings_yaml(settings, tmp_path / "good.yaml"))
        assert code == 0, found
        assert not _lines(found, "FAIL") and not _lines(found, "WARN")
        assert f"topic {topics[0]} (input): 2 partition(s)" in _lines(found, "ok")
        assert any(line.startswith("endpoint billing: GET") for line in _lines(found, "ok"))

        # a missing dead-letter topic, an endpoint that is down, an unset API key variable
        monkeypatch.delenv("NO_SUCH_KEY", raising=False)
        bad = settings.model_copy(
            update={
                "output": settings.output.model_copy(update={"dlq_topic": f"{topics[2]}.nope"}),
                "endpoints": {
                    **settings.endpoints,
                    "support": settings.endpoints["support"].model_copy(
                        update={"base_url": "http://127.0.0.1:1/v1", "api_key_env": "NO_SUCH_KEY"}
                    ),
                },
            }
        )
        code, found = await _check(settings_yaml(bad, tmp_path / "bad.yaml"))
        assert code == 1
        failed = _lines(found, "FAIL")
        assert f"topic {topics[2]}.nope (dead letters): does not exist" in failed
        assert any(line.startswith("api keys") and "NO_SUCH_KEY" in line for line in failed)
        assert any(line.startswith("endpoint support: GET http://127.0.0.1:1") for line in failed)
        assert failed[-1] == "summary 3 problem(s)"

        # a model the endpoint does not list: ok against the package's stand-in (it answers
        # every model), a warning against any other server
        other = settings.model_copy(
            update={
                "endpoints": {
                    **settings.endpoints,
                    "general": settings.endpoints["general"].model_copy(
                        update={"model": "not-listed-model"}
                    ),
                }
            }
        )
        code, found = await _check(settings_yaml(other, tmp_path / "other.yaml"))
        assert code == 0 and not _lines(found, "WARN"), found
        assert any(
            line.startswith("endpoint general:") and "stand-in stub-llm" in line
            for line in _lines(found, "ok")
        )
        stub.owner = "someone-else"
        code, found = await _check(settings_yaml(other, tmp_path / "other.yaml"))
        assert any("'not-listed-model' not listed" in line for line in _lines(found, "WARN"))

    down = settings.model_copy(
        update={
            "mode": "route_only",
            "kafka": settings.kafka.model_copy(update={"bootstrap_servers": "127.0.0.1:1"}),
        }
    )
    code, found = await _check(settings_yaml(down, tmp_path / "down.yaml"))
    assert code == 1
    assert any(line.startswith("broker 127.0.0.1:1: unreachable") for line in _lines(found, "FAIL"))
    assert not any(f.what == "endpoint" for f in found)  # route_only: endpoints unused


@pytest.mark.kafka
async def test_check_names_the_review_and_shadow_topics_and_the_candidate(
    kafka_bootstrap: str, new_topic: Any, tmp_path: Path
) -> None:
    import yaml
    from service_helpers import ROUTES

    topic = await new_topic(partitions=1)
    candidate = tmp_path / "candidate.yaml"
    candidate.write_text(yaml.safe_dump(ROUTES))
    settings = make_settings(
        tmp_path,
        kafka_bootstrap,
        topic,
        mode="route_only",
        review={"enabled": True},
        shadow={"routes": candidate},
        output={"create_topics": False},
    )
    code, found = await _check(settings_yaml(settings, tmp_path / "c.yaml"))
    assert code == 1
    failed = _lines(found, "FAIL")
    for side in ("review", "shadow"):
        assert f"topic {topic}.out.{side} (review / shadow records): does not exist" in failed
    assert any(
        line.startswith(f"shadow {candidate}: candidate routes") for line in _lines(found, "ok")
    )
    candidate.write_text("routes: [")
    code, found = await _check(settings_yaml(settings, tmp_path / "c.yaml"))
    assert any(line.startswith("shadow ") for line in _lines(found, "FAIL"))


@pytest.mark.kafka
async def test_check_names_the_learning_topics(
    kafka_bootstrap: str, new_topic: Any, tmp_path: Path
) -> None:
    """With learning on, the corrections and overlay topics are checked: missing ones fail
    (unless created at start-up), an overlay of more than one partition fails."""
    topic = await new_topic(partitions=1)
    overlay = await new_topic(partitions=2)
    settings = make_settings(
        tmp_path,
        kafka_bootstrap,
        topic,
        mode="route_only",
        learning={"enabled": True, "overlay_topic": overlay},
        output={"create_topics": False},
    )
    code, found = await _check(settings_yaml(settings, tmp_path / "l.yaml"))
    assert code == 1
    failed = _lines(found, "FAIL")
    assert f"topic {topic}.corrections (corrections): does not exist" in failed
    assert f"topic {overlay} (overlay): 2 partitions, needs 1" in failed

    created = settings.model_copy(
        update={
            "learning": settings.learning.model_copy(update={"overlay_topic": None}),
            "output": settings.output.model_copy(update={"create_topics": True}),
        }
    )
    code, found = await _check(settings_yaml(created, tmp_path / "l2.yaml"))
    failed = _lines(found, "FAIL")
    assert not [line for line in failed if "(overlay)" in line or "(corrections)" in line]
    assert f"topic {topic}.overlay (overlay): created at start-up (output.create_topics)" in (
        _lines(found, "ok")
    )
