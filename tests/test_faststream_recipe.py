"""The FastStream recipe (examples/faststream_app.py) run for real with FastStream's in-memory
``TestKafkaBroker`` (no broker needed) and the real all-MiniLM-L6-v2 encoder on the bundled
support-ticket routes."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from faststream.kafka import KafkaBroker, TestKafkaBroker

from semroute_stream import Router

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "examples" / "faststream_app.py"
EXAMPLE_ROUTES = ROOT / "config" / "routes.example.yaml"


def _recipe() -> ModuleType:
    spec = importlib.util.spec_from_file_location("faststream_app", RECIPE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def router() -> Router:
    return Router.from_file(EXAMPLE_ROUTES)


@pytest.mark.slow
async def test_recipe_routes_each_message_and_publishes_the_decision(router: Router) -> None:
    recipe = _recipe()
    broker = recipe.create_broker(router)
    assert isinstance(broker, KafkaBroker)
    routed: list[dict[str, Any]] = []

    @broker.subscriber(recipe.OUTPUT_TOPIC)
    async def collect(message: dict[str, Any]) -> None:
        routed.append(message)

    billing_text = "I was billed twice for my order this month"
    outside_text = "what is the capital of France"
    async with TestKafkaBroker(broker) as test_broker:
        await test_broker.publish({"id": "t1", "text": billing_text}, topic=recipe.INPUT_TOPIC)
        await test_broker.publish({"id": "t2", "text": outside_text}, topic=recipe.INPUT_TOPIC)

    assert [message["id"] for message in routed] == ["t1", "t2"]
    billing, outside = routed
    assert billing["route"] == "billing" and billing["is_fallback"] is False
    assert billing["metadata"] == {"team": "billing", "priority": "normal"}
    assert billing["decision"]["routes_version"] == router.version
    assert billing["decision"]["model"].endswith("all-MiniLM-L6-v2")
    assert billing["score"] >= billing["decision"]["threshold"]
    assert outside["route"] == "general" and outside["is_fallback"] is True
    assert outside["decision"]["fallback_reason"] == "below_threshold"
    assert outside["metadata"] == {}
    # The published explanation is exactly what the library API (and the service) produce.
    assert billing["decision"] == router(billing_text).explain()
    assert outside["decision"] == router.route([outside_text])[0]


def test_create_app_wraps_the_broker(router: Router) -> None:
    app = _recipe().create_app(router)
    assert isinstance(app.broker, KafkaBroker)
