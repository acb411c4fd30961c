"""The library API: ``Router.from_file``, ``router(text)`` -> ``RouteDecision``,
``route_batch`` and ``aroute`` (off the event loop), with the fake bag-of-words encoder."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from fakes import FakeEncoder

import semroute_stream
import semroute_stream._routing.router as router_module
from semroute_stream import ConfigError, RouteDecision, Router

ROUTES = """\
method: max
default_threshold: 0.3
fallback: {name: general}
routes:
  - name: billing
    metadata: {team: billing}
    utterances: ["charged twice on my invoice", "refund my payment"]
  - name: shipping
    threshold: 0.35
    utterances: ["where is my parcel", "track my delivery"]
"""


@pytest.fixture
def routes_file(tmp_path: Path) -> Path:
    path = tmp_path / "routes.yaml"
    path.write_text(ROUTES, encoding="utf-8")
    return path


@pytest.fixture
def router(routes_file: Path) -> Router:
    return Router.from_file(routes_file, FakeEncoder(), cache=False)


def test_one_text_gives_a_typed_decision(router: Router) -> None:
    decision = router("I was charged twice, refund my invoice")
    assert isinstance(decision, RouteDecision)
    assert decision.route == "billing" and decision.is_fallback is False
    assert decision.fallback_reason is None
    assert decision.metadata == {"team": "billing"}
    assert decision.runner_up == "shipping"
    assert decision.score >= decision.threshold == pytest.approx(0.3)
    assert decision.margin == pytest.approx(
        decision.score - (decision.runner_up_score or 0), abs=1e-5
    )
    assert decision.text == "I was charged twice, refund my invoice"


def test_fallback_names_the_fallback_and_why(router: Router) -> None:
    decision = router("completely unrelated words here")
    assert decision.route == "general" and decision.is_fallback is True
    assert decision.fallback_reason == "below_threshold"
    assert decision.metadata == {}
    assert decision.explain()["best"] in ("billing", "shipping")


def test_explain_is_the_routers_explanation_and_a_copy(router: Router) -> None:
    text = "where is my parcel"
    decision = router(text)
    explained = decision.explain()
    assert explained == router.route([text])[0]
    assert explained["routes_version"] == router.version and explained["model"] == "fake-bow"
    assert explained["route"] == decision.route and explained["score"] == decision.score
    explained["route"] = "tampered"
    explained["top"].clear()
    assert decision.explain()["route"] == "shipping" and decision.explain()["top"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        decision.route = "billing"  # type: ignore[misc]


def test_route_batch_is_one_encoder_call_in_input_order(routes_file: Path) -> None:
    encoder = FakeEncoder()
    router = Router.from_file(routes_file, encoder, cache=False)
    encoder.calls.clear()
    texts = ["track my delivery", "refund my payment", "nothing matches zzz"]
    decisions = router.route_batch(texts)
    assert encoder.calls == [3]
    assert [d.route for d in decisions] == ["shipping", "billing", "general"]
    assert [d.text for d in decisions] == texts
    assert router.route_batch([]) == []


def test_wrong_argument_types_are_refused(router: Router) -> None:
    with pytest.raises(TypeError, match="route_batch takes a sequence"):
        router.route_batch("one text")
    with pytest.raises(TypeError, match="takes a str"):
        router(["a list"])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        router.route_batch(["ok", 3])  # type: ignore[list-item]


class ThreadRecordingEncoder(FakeEncoder):
    def __init__(self) -> None:
        super().__init__()
        self.threads: list[threading.Thread] = []

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.threads.append(threading.current_thread())
        return super().encode(texts)


async def test_aroute_encodes_off_the_event_loop(routes_file: Path) -> None:
    encoder = ThreadRecordingEncoder()
    router = Router.from_file(routes_file, encoder, cache=False)
    encoder.threads.clear()
    one = await router.aroute("where is my parcel")
    many = await router.aroute(["refund my payment", "track my delivery"])
    assert isinstance(one, RouteDecision) and one.route == "shipping"
    assert [d.route for d in many] == ["billing", "shipping"]
    assert len(encoder.threads) == 2
    assert all(t is not threading.main_thread() for t in encoder.threads)
    assert one == router("where is my parcel")


def test_from_file_uses_the_default_encoder(
    routes_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[FakeEncoder] = []

    def default_encoder() -> FakeEncoder:
        made.append(FakeEncoder(model_name="default"))
        return made[-1]

    assert router_module.default_encoder_factory() is semroute_stream.Encoder
    monkeypatch.setattr(router_module, "default_encoder_factory", lambda: default_encoder)
    router = Router.from_file(routes_file, cache=False)
    assert len(made) == 1 and router.encoder is made[0]
    assert router("refund my payment").explain()["model"] == "default"


def test_from_file_reports_a_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("routes:\n  - name: a\n    utterances: []\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.yaml"):
        Router.from_file(path, FakeEncoder())
