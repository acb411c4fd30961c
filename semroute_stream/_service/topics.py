"""The output topics: their names, that they exist (or are created), and the record size limit.

Checked at start-up and on every routes reload: with ``per_route_topics`` a route name becomes
part of a topic name, so it must obey Kafka's topic rules, and a new route's topic must exist
before any outcome is written there (a send to a missing topic would stall its partition).
"""

from __future__ import annotations

import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from .._errors import ConfigError
from .._routing.schema import RoutesConfig
from .kafka import connection_kwargs, topic_partitions
from .records import RECORD_OVERHEAD_BYTES
from .settings import Settings, topic_name_problem

__all__ = ["check_topic_names", "ensure_output_topics", "output_topics"]

log = logging.getLogger("semroute_stream")


def output_topics(routes: RoutesConfig, settings: Settings) -> list[str]:
    """Every topic an outcome of these routes can be written to (the DLQ and, when parking
    is on, the retry topics included)."""
    out = settings.output
    names = [out.topic_for(r.name) for r in routes.routes] + [out.topic_for(routes.fallback.name)]
    return sorted({*names, out.dlq_topic, *settings.retry_topics()})


def check_topic_names(routes: RoutesConfig, settings: Settings) -> None:
    """With per-route topics, every route's topic name must be a valid Kafka topic name."""
    if not settings.output.per_route_topics:
        return
    problems = []
    for name in [r.name for r in routes.routes] + [routes.fallback.name]:
        topic = settings.output.topic_for(name)
        why = topic_name_problem(topic)
        if why:
            problems.append(
                f"route {name!r}: its topic {topic!r} is not valid with "
                f"output.per_route_topics: {why}"
            )
    if problems:
        raise ConfigError("\n".join(problems), file=str(settings.routes))


async def ensure_output_topics(settings: Settings, topics: list[str]) -> int:
    """Create the missing ``topics`` (``output.create_topics``) or fail naming them; return the
    largest record the outputs accept: ``output.max_record_bytes`` or the smallest topic
    ``max.message.bytes``, whichever is smaller, less :data:`RECORD_OVERHEAD_BYTES`."""
    found = await topic_partitions(settings, [*topics, settings.input.topic])
    missing = [t for t in topics if t not in found]
    admin = AIOKafkaAdminClient(**connection_kwargs(settings.kafka))
    await admin.start()
    try:
        if missing:
            if not settings.output.create_topics:
                raise ConfigError(
                    f"output topics missing on the broker: {', '.join(missing)} "
                    "(create them, or set output.create_topics: true)"
                )
            partitions = len(found.get(settings.input.topic, ())) or 1
            brokers = len((await admin.describe_cluster())["brokers"])
            replicas = min(3, brokers)  # 3 where the cluster has them
            await admin.create_topics([NewTopic(t, partitions, replicas) for t in missing])
            log.info(
                "created output topics: %s (%d partitions, %d replicas)",
                ", ".join(missing),
                partitions,
                replicas,
            )
        limits = await _max_message_bytes(admin, topics)
    finally:
        await admin.close()
    return min([settings.output.max_record_bytes, *limits]) - RECORD_OVERHEAD_BYTES


async def _max_message_bytes(admin: AIOKafkaAdminClient, topics: list[str]) -> list[int]:
    wanted = {"max.message.bytes": None}
    resources = [ConfigResource(ConfigResourceType.TOPIC, t, wanted) for t in topics]
    limits = []
    for response in await admin.describe_configs(resources):
        for resource in response.to_object()["resources"]:
            for entry in resource["config_entries"]:
                if entry["config_names"] == "max.message.bytes":
                    limits.append(int(entry["config_value"]))
    return limits
