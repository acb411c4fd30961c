"""The output topics: their names, that they exist (or are created), and the record size limit.

Checked at start-up and on every routes reload: with ``per_route_topics`` a route name becomes
part of a topic name, so it must obey Kafka's topic rules, and a new route's topic must exist
before any outcome is written there (a send to a missing topic would stall its partition).
"""

from __future__ import annotations

import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import TopicAlreadyExistsError, for_code

from .._errors import ConfigError, SemrouteError
from .._routing.schema import RoutesConfig
from .kafka import make_admin, start_client, topic_partitions
from .records import RECORD_OVERHEAD_BYTES
from .settings import Settings, topic_name_problem

__all__ = [
    "audit_topics",
    "check_topic_names",
    "create_topics",
    "ensure_learning_topics",
    "ensure_output_topics",
    "output_topics",
    "topic_roles",
]

log = logging.getLogger("semroute_stream")


def output_topics(routes: RoutesConfig, settings: Settings) -> list[str]:
    """Every topic an outcome of these routes can be written to (the DLQ and, when on, the
    retry, review and shadow topics included)."""
    out = settings.output
    names = [out.topic_for(r.name) for r in routes.routes] + [out.topic_for(routes.fallback.name)]
    return sorted({*names, out.dlq_topic, *settings.retry_topics(), *audit_topics(settings)})


def audit_topics(settings: Settings) -> list[str]:
    """The review and shadow topics, those that are on."""
    return [t for t in (settings.review_topic(), settings.shadow_topic()) if t is not None]


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
    admin = make_admin(settings)
    await start_client(admin, settings.kafka, "admin client")
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


def topic_roles(settings: Settings, routes: RoutesConfig) -> list[tuple[str, str]]:
    """Every topic the router reads or writes, with its role: the input, the responses (one
    per route with ``per_route_topics``), the dead letters and the retry topics."""
    out = settings.output
    roles = [(settings.input.topic, "input")]
    if out.per_route_topics:
        names = [*routes.names, routes.fallback.name]
        roles += [(out.topic_for(name), f"responses of route {name}") for name in names]
    else:
        roles.append((out.responses_topic, "responses"))
    roles.append((out.dlq_topic, "dead letters"))
    roles += [(t, f"parked messages of endpoint {e}") for t, e in settings.retry_topics().items()]
    if settings.learning.enabled:
        roles.append((settings.corrections_topic, "corrections"))
        roles.append((settings.overlay_topic, "overlay (compacted, 1 partition)"))
    if (review := settings.review_topic()) is not None:
        roles.append((review, "decisions for review"))
    if (shadow := settings.shadow_topic()) is not None:
        roles.append((shadow, "shadow routes' disagreements"))
    return roles


_COMPACT = {"cleanup.policy": "compact"}


def _new_topic(settings: Settings, topic: str, partitions: int, replication: int) -> NewTopic:
    """The overlay topic is compacted with one partition (one order every replica replays)."""
    if settings.learning.enabled and topic == settings.overlay_topic:
        return NewTopic(topic, 1, replication, topic_configs=_COMPACT)
    return NewTopic(topic, partitions, replication)


async def ensure_learning_topics(settings: Settings) -> None:
    """The corrections and overlay topics exist (created when missing, with
    ``output.create_topics``); the overlay topic is compacted with one partition."""
    overlay, corrections = settings.overlay_topic, settings.corrections_topic
    found = await topic_partitions(settings, [overlay, corrections, settings.input.topic])
    missing = [t for t in (corrections, overlay) if t not in found]
    if missing and not settings.output.create_topics:
        raise ConfigError(
            f"learning topics missing on the broker: {', '.join(missing)} "
            "(create them with semroute-stream topics create, or set output.create_topics: true)"
        )
    if missing:
        partitions = len(found.get(settings.input.topic, ())) or 1
        await create_topics(settings, missing, partitions)
    if overlay not in found:
        return  # just created so (a broker may not describe a new topic's configs yet)
    if len(found[overlay]) != 1:
        raise ConfigError(
            f"learning.overlay_topic {overlay!r} has {len(found[overlay])} partitions, needs 1"
        )
    admin = make_admin(settings)
    await start_client(admin, settings.kafka, "admin client")
    try:
        resource = ConfigResource(ConfigResourceType.TOPIC, overlay, {"cleanup.policy": None})
        policy = None
        for response in await admin.describe_configs([resource]):
            for res in response.to_object()["resources"]:
                for entry in res["config_entries"]:
                    if entry["config_names"] == "cleanup.policy":
                        policy = entry["config_value"]
    finally:
        await admin.close()
    if policy is None or "compact" not in policy:
        raise ConfigError(
            f"learning.overlay_topic {overlay!r} has cleanup.policy={policy}, needs compact "
            "(a deleted overlay record would be lost on the next restart)"
        )


async def create_topics(
    settings: Settings, topics: list[str], partitions: int, replication: int | None = None
) -> dict[str, str]:
    """Create ``topics`` that do not exist; return what happened to each (``created`` or
    ``exists (N partitions)``). ``replication`` None: 3, or fewer on a smaller cluster.
    Idempotent; raises :class:`SemrouteError` naming a topic the broker refused."""
    found = await topic_partitions(settings, topics)
    missing = [t for t in topics if t not in found]
    done = {t: f"exists ({len(found[t])} partitions)" for t in topics if t in found}
    if not missing:
        return done
    admin = make_admin(settings)
    await start_client(admin, settings.kafka, "admin client")
    try:
        if replication is None:
            replication = min(3, len((await admin.describe_cluster())["brokers"]))
        response = await admin.create_topics(
            [_new_topic(settings, t, partitions, replication) for t in missing]
        )
    finally:
        await admin.close()
    problems = []
    for topic, code, *rest in response.topic_errors:
        if code == 0:
            done[topic] = "created"
        elif code == TopicAlreadyExistsError.errno:  # made meanwhile by someone else
            done[topic] = "exists"
        else:
            message = rest[0] if rest and rest[0] else ""
            problems.append(f"{topic}: {for_code(code).__name__} {message}".rstrip())
    if problems:
        raise SemrouteError("the broker refused to create: " + "; ".join(problems))
    return {t: done[t] for t in topics}
