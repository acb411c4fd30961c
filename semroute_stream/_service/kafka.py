"""Kafka plumbing: client construction from the config, and topic metadata.

The commit bookkeeping lives with delivery (:mod:`.delivery`).
"""

from __future__ import annotations

import ssl
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.helpers import create_ssl_context

from .fetch import HeaderTolerantConsumer
from .settings import KafkaConfig, Settings

__all__ = [
    "connection_kwargs",
    "make_consumer",
    "make_producer",
    "make_transactional_producer",
    "topic_partitions",
]


def connection_kwargs(cfg: KafkaConfig) -> dict[str, Any]:
    """Bootstrap servers, client id and security settings for any aiokafka client."""
    kwargs: dict[str, Any] = {
        "bootstrap_servers": cfg.bootstrap_servers,
        "client_id": cfg.client_id,
        "security_protocol": cfg.security_protocol,
        "metadata_max_age_ms": cfg.metadata_max_age_ms,
    }
    if cfg.security_protocol in ("SSL", "SASL_SSL"):
        context: ssl.SSLContext = create_ssl_context(
            cafile=str(cfg.ssl_cafile) if cfg.ssl_cafile else None,
            certfile=str(cfg.ssl_certfile) if cfg.ssl_certfile else None,
            keyfile=str(cfg.ssl_keyfile) if cfg.ssl_keyfile else None,
        )
        kwargs["ssl_context"] = context
    if cfg.security_protocol.startswith("SASL"):
        assert cfg.sasl_password is not None
        kwargs.update(
            sasl_mechanism=cfg.sasl_mechanism,
            sasl_plain_username=cfg.sasl_username,
            sasl_plain_password=cfg.sasl_password.get_secret_value(),
        )
    return kwargs


def make_consumer(settings: Settings, *, group_id: str | None = None) -> AIOKafkaConsumer:
    """A consumer with manual commits and an explicit ``auto_offset_reset``, whose fetch
    survives header keys that are not UTF-8 (:mod:`.fetch`): such a record is dead-lettered."""
    inp = settings.input
    return HeaderTolerantConsumer(
        **connection_kwargs(settings.kafka),
        group_id=group_id or inp.group_id,
        enable_auto_commit=False,
        auto_offset_reset=inp.auto_offset_reset,
        isolation_level="read_committed",
        max_poll_records=settings.batching.max_size,
        session_timeout_ms=inp.session_timeout_ms,
        heartbeat_interval_ms=max(inp.session_timeout_ms // 3, 100),
        max_poll_interval_ms=inp.max_poll_interval_ms,
    )


def make_producer(settings: Settings) -> AIOKafkaProducer:
    """An idempotent producer waiting for all in-sync replicas."""
    return AIOKafkaProducer(
        **connection_kwargs(settings.kafka),
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
        max_request_size=4 * 1024 * 1024,
    )


def make_transactional_producer(settings: Settings, transactional_id: str) -> AIOKafkaProducer:
    """A producer for one input partition's transactions (``delivery: exactly_once``)."""
    return AIOKafkaProducer(
        **connection_kwargs(settings.kafka),
        acks="all",
        enable_idempotence=True,
        transactional_id=transactional_id,
        transaction_timeout_ms=settings.flow.transaction_timeout_ms,
        linger_ms=5,
        max_request_size=4 * 1024 * 1024,
    )


async def topic_partitions(settings: Settings, topics: list[str]) -> dict[str, set[int]]:
    """The partitions of each of ``topics`` that exists (admin client metadata requests).

    Lists the topics first: a metadata request naming a missing topic would create it on a
    broker with ``auto.create.topics.enable``.
    """
    admin = AIOKafkaAdminClient(**connection_kwargs(settings.kafka))
    await admin.start()
    try:
        names = set(await admin.list_topics())
        present = [t for t in topics if t in names]
        found = await admin.describe_topics(present) if present else []
    finally:
        await admin.close()
    return {
        t["topic"]: {p["partition"] for p in t["partitions"]} for t in found if t["error_code"] == 0
    }
