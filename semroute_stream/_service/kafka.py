"""Kafka plumbing: client construction from the config, and the per-partition commit tracker.

The tracker is what makes at-least-once hold while LLM calls finish out of order: for each
partition it commits only the offset below which every message has its outcome acknowledged.
"""

from __future__ import annotations

import ssl
from collections import deque
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.helpers import create_ssl_context

from .settings import KafkaConfig, Settings


def connection_kwargs(cfg: KafkaConfig) -> dict[str, Any]:
    """Bootstrap servers, client id and security settings for any aiokafka client."""
    kwargs: dict[str, Any] = {
        "bootstrap_servers": cfg.bootstrap_servers,
        "client_id": cfg.client_id,
        "security_protocol": cfg.security_protocol,
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
    """A consumer with manual commits and an explicit ``auto_offset_reset``."""
    inp = settings.input
    return AIOKafkaConsumer(
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


class _Partition:
    __slots__ = ("done", "next_offset", "pending")

    def __init__(self) -> None:
        self.pending: deque[int] = deque()  # offsets handed out, in consumption order
        self.done: set[int] = set()  # finished offsets still behind an unfinished one
        self.next_offset: int | None = None  # what to commit: everything below it is finished


class CommitTracker:
    """Per-partition progress of messages whose outcomes may finish out of order.

    ``start`` each offset in consumption order, ``finish`` it once its outcome record is
    acknowledged; ``committable`` then gives, for each partition, the offset to commit (one past
    the longest finished prefix). Pure bookkeeping: no Kafka calls.
    """

    def __init__(self) -> None:
        self._parts: dict[TopicPartition, _Partition] = {}
        self._committed: dict[TopicPartition, int] = {}

    def start(self, tp: TopicPartition, offset: int) -> None:
        self._parts.setdefault(tp, _Partition()).pending.append(offset)

    def finish(self, tp: TopicPartition, offset: int) -> None:
        part = self._parts.get(tp)
        if part is None:  # the partition was revoked meanwhile: its new owner redoes it
            return
        part.done.add(offset)
        while part.pending and part.pending[0] in part.done:
            first = part.pending.popleft()
            part.done.discard(first)
            part.next_offset = first + 1

    def in_flight(self, tp: TopicPartition | None = None) -> int:
        if tp is not None:
            part = self._parts.get(tp)
            return len(part.pending) if part else 0
        return sum(len(p.pending) for p in self._parts.values())

    def committable(self) -> dict[TopicPartition, int]:
        """Offsets that moved since the last ``mark_committed``."""
        return {
            tp: p.next_offset
            for tp, p in self._parts.items()
            if p.next_offset is not None and self._committed.get(tp) != p.next_offset
        }

    def mark_committed(self, offsets: dict[TopicPartition, int]) -> None:
        self._committed.update(offsets)

    def forget(self, tps: set[TopicPartition]) -> None:
        """Drop revoked partitions: late completions for them are ignored."""
        for tp in tps:
            self._parts.pop(tp, None)
            self._committed.pop(tp, None)
