"""A FastStream recipe: route every Kafka message with semroute-stream's library API.

    pip install semroute-stream "faststream[kafka]"
    SEMROUTE_ROUTES=config/routes.example.yaml KAFKA_BOOTSTRAP_SERVERS=localhost:9092 \
        PYTHONPATH=examples faststream run faststream_app:create_app --factory

Consumes ``{"id": ..., "text": ...}`` from ``queries`` (``QUERIES_TOPIC``), routes the text
with ``await router.aroute(text)`` (the encoder runs in a worker thread, off the event loop)
and publishes the decision to ``queries.routed`` (``ROUTED_TOPIC``): the route, whether it is
the fallback, the score, the route's metadata and the full explanation. This is routing only;
call the route's model from the handler if you want answers (``semroute-stream run`` is the
full service: batching, LLM calls, dead letters, exactly-once).
"""

from __future__ import annotations

import os
from typing import Any

from faststream import FastStream
from faststream.kafka import KafkaBroker
from pydantic import BaseModel

from semroute_stream import Router

INPUT_TOPIC = os.environ.get("QUERIES_TOPIC", "queries")
OUTPUT_TOPIC = os.environ.get("ROUTED_TOPIC", "queries.routed")


class Query(BaseModel):
    """An input message."""

    text: str
    id: str | None = None


def create_broker(router: Router, bootstrap: str | None = None) -> KafkaBroker:
    """A broker whose one handler routes ``INPUT_TOPIC`` into ``OUTPUT_TOPIC``."""
    servers = bootstrap or os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "localhost:9092")
    broker = KafkaBroker(servers)

    @broker.subscriber(INPUT_TOPIC, group_id="semroute-faststream")
    @broker.publisher(OUTPUT_TOPIC)
    async def route_query(query: Query) -> dict[str, Any]:
        decision = await router.aroute(query.text)
        return {
            "id": query.id,
            "text": query.text,
            "route": decision.route,
            "is_fallback": decision.is_fallback,
            "score": decision.score,
            "metadata": dict(decision.metadata),
            "decision": decision.explain(),
        }

    return broker


def create_app(router: Router | None = None) -> FastStream:
    """The app (``faststream run ... --factory``); the routes file is ``SEMROUTE_ROUTES``."""
    if router is None:
        router = Router.from_file(os.environ.get("SEMROUTE_ROUTES", "config/routes.example.yaml"))
    return FastStream(create_broker(router))
