"""``kafka.client_options``: extra aiokafka options, per client, from an allow-list.

One map per client (``consumer``, ``producer``, ``admin``) rather than one flat map: aiokafka's
clients take different options (fetch sizes are the consumer's, ``linger_ms`` and compression
the producer's) and a shared name such as ``request_timeout_ms`` may need a different value in
each, as Java clients' ``consumer.`` / ``producer.`` prefixes allow. An unknown option is an
error that lists the allowed ones; an option the router sets itself for its guarantees is
refused with the reason.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["ASSIGNORS", "AdminOptions", "ClientOptions", "ConsumerOptions", "ProducerOptions"]

#: ``partition_assignment_strategy`` names and aiokafka's assignor classes.
ASSIGNORS = {
    "range": "aiokafka.coordinator.assignors.range:RangePartitionAssignor",
    "roundrobin": "aiokafka.coordinator.assignors.roundrobin:RoundRobinPartitionAssignor",
    "sticky": "aiokafka.coordinator.assignors.sticky.sticky_assignor:StickyPartitionAssignor",
}

_SET_IN_KAFKA = "set it in the kafka section (kafka.{name}), it applies to every client"
#: Options the router sets itself, and why they cannot be passed through.
RESERVED: dict[str, str] = {
    **{
        name: _SET_IN_KAFKA.format(name=name)
        for name in (
            "bootstrap_servers",
            "client_id",
            "security_protocol",
            "sasl_mechanism",
            "sasl_plain_username",
            "sasl_plain_password",
            "sasl_kerberos_service_name",
            "sasl_kerberos_domain_name",
            "sasl_oauth_token_provider",
            "metadata_max_age_ms",
        )
    },
    "ssl_context": "built from kafka.ssl_* (cafile, certfile, keyfile, key password, hostname)",
    "api_version": "negotiated with the broker",
    "enable_auto_commit": "the router commits an offset only once its outcome is durable",
    "auto_commit_interval_ms": "offsets are committed by the router (flow.commit_interval_ms)",
    "isolation_level": "read_committed: parked and exactly-once outcomes are transactional",
    "group_id": "set input.group_id",
    "group_instance_id": "static membership is not supported by the router",
    "auto_offset_reset": "set input.auto_offset_reset",
    "max_poll_records": "set batching.max_size",
    "session_timeout_ms": "set input.session_timeout_ms (heartbeats follow from it)",
    "heartbeat_interval_ms": "derived from input.session_timeout_ms",
    "max_poll_interval_ms": "set input.max_poll_interval_ms",
    "key_deserializer": "the router reads raw bytes",
    "value_deserializer": "the router reads raw bytes",
    "key_serializer": "the router writes raw bytes",
    "value_serializer": "the router writes raw bytes",
    "acks": "all: an outcome counts as written only once every in-sync replica has it",
    "enable_idempotence": "always on: retried sends must not duplicate outcomes",
    "transactional_id": "set per input partition by delivery: exactly_once",
    "transaction_timeout_ms": "set flow.transaction_timeout_ms",
    "partitioner": "outcomes keep the input record's key and default partitioning",
}


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _known_options(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        allowed = sorted(cls.model_fields)
        client = cls.__name__.removesuffix("Options").lower()
        problems = []
        for key in data:
            if key in allowed:
                continue
            if key in RESERVED:
                problems.append(f"{key!r} cannot be set for the {client}: {RESERVED[key]}")
            else:
                problems.append(f"unknown {client} option {key!r}; allowed: {', '.join(allowed)}")
        if problems:
            raise ValueError("; ".join(problems))
        return data

    def kwargs(self) -> dict[str, Any]:
        """The options that are set, as aiokafka keyword arguments."""
        return self.model_dump(exclude_none=True)


class _Shared(_Options):
    request_timeout_ms: int | None = Field(default=None, ge=1_000)
    retry_backoff_ms: int | None = Field(default=None, ge=0)
    connections_max_idle_ms: int | None = Field(default=None, ge=1_000)


class AdminOptions(_Shared):
    """Options of the admin client (topic checks and creation)."""


class ConsumerOptions(_Shared):
    """Options of the input consumer."""

    fetch_max_bytes: int | None = Field(default=None, ge=1)
    fetch_min_bytes: int | None = Field(default=None, ge=1)
    fetch_max_wait_ms: int | None = Field(default=None, ge=0)
    max_partition_fetch_bytes: int | None = Field(default=None, ge=1)
    # KIP-392: fetch from the nearest replica (the broker needs replica.selector.class set).
    client_rack: str | None = Field(default=None, min_length=1)
    # by name: range, roundrobin (aiokafka's default), sticky; several: the group picks one
    # every member supports. No cooperative protocol: aiokafka only has eager rebalancing.
    partition_assignment_strategy: list[Literal["range", "roundrobin", "sticky"]] | None = Field(
        default=None, min_length=1
    )
    rebalance_timeout_ms: int | None = Field(default=None, ge=1_000)
    check_crcs: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_strategy(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("partition_assignment_strategy"), str):
            return {
                **data,
                "partition_assignment_strategy": [data["partition_assignment_strategy"]],
            }
        return data

    def kwargs(self) -> dict[str, Any]:
        import importlib

        out = super().kwargs()
        if self.partition_assignment_strategy:
            classes = []
            for name in self.partition_assignment_strategy:
                module, _, attr = ASSIGNORS[name].partition(":")
                classes.append(getattr(importlib.import_module(module), attr))
            out["partition_assignment_strategy"] = tuple(classes)
        return out


class ProducerOptions(_Shared):
    """Options of the outcome producers (the transactional ones included)."""

    # lz4, snappy and zstd need cramjam (pip install cramjam); checked at start-up.
    compression_type: Literal["gzip", "snappy", "lz4", "zstd"] | None = None
    linger_ms: int | None = Field(default=None, ge=0)
    max_batch_size: int | None = Field(default=None, ge=1_024)
    max_request_size: int | None = Field(default=None, ge=16_384)


class ClientOptions(_Options):
    """``kafka.client_options``: per-client pass-through options (see the module doc)."""

    consumer: ConsumerOptions = ConsumerOptions()
    producer: ProducerOptions = ProducerOptions()
    admin: AdminOptions = AdminOptions()

    @model_validator(mode="after")
    def _codec_available(self) -> ClientOptions:
        codec = self.producer.compression_type
        if codec is not None and codec != "gzip":
            from aiokafka.codec import has_lz4, has_snappy, has_zstd

            present = {"lz4": has_lz4, "snappy": has_snappy, "zstd": has_zstd}[codec]()
            if not present:
                raise ValueError(
                    f"producer compression_type {codec!r} needs the cramjam package "
                    "(pip install cramjam); gzip needs nothing"
                )
        return self
