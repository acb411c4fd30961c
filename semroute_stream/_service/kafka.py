"""Kafka plumbing: client construction from the config, and topic metadata.

The commit bookkeeping lives with delivery (:mod:`.delivery`).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import inspect
import ssl
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.abc import AbstractTokenProvider
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.conn import collect_hosts, create_conn
from aiokafka.errors import IncompatibleBrokerVersion, KafkaConnectionError, KafkaError
from aiokafka.helpers import create_ssl_context
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import Array, Boolean, Int16, Int32, Schema, String

from .._errors import ConfigError, SemrouteError
from .fetch import HeaderTolerantConsumer
from .settings import KafkaConfig, Settings

__all__ = [
    "BrokerConnectError",
    "connection_kwargs",
    "make_admin",
    "make_consumer",
    "make_producer",
    "make_transactional_producer",
    "start_client",
    "token_provider",
    "topic_operations",
    "topic_partitions",
]


class BrokerConnectError(SemrouteError, KafkaConnectionError):  # type: ignore[misc]
    """The brokers cannot be reached or refuse this client (authentication, TLS): why, and
    which setting to look at."""

    def __str__(self) -> str:  # the message alone, not KafkaError's "ClassName: message"
        return str(self.args[0]) if self.args else ""


class _FunctionTokens(AbstractTokenProvider):  # type: ignore[misc]
    """An ``AbstractTokenProvider`` around a sync or async function returning a token."""

    def __init__(self, fn: Callable[[], Any], first: str | None = None) -> None:
        self._fn = fn
        self._first = first  # the token got while finding out what ``fn`` is

    async def token(self) -> str:
        if self._first is not None:
            value: Any = self._first
            self._first = None
        elif inspect.iscoroutinefunction(self._fn):
            value = await self._fn()
        else:
            value = await asyncio.to_thread(self._fn)
        if not isinstance(value, str) or not value:
            raise ValueError(f"the OAUTHBEARER token function returned {type(value).__name__}")
        return value


_PROVIDERS: dict[str, AbstractTokenProvider] = {}


def token_provider(spec: str) -> AbstractTokenProvider:
    """The ``AbstractTokenProvider`` named by ``module:callable`` (one per spec and process,
    so that every client reuses its tokens).

    The callable may be a provider, a provider class or factory (called once), or a sync or
    async function returning the token string (wrapped; a sync one is called once here, so a
    broken one fails at start-up)."""
    if spec in _PROVIDERS:
        return _PROVIDERS[spec]
    field = "kafka.sasl_oauth_token_provider"
    module_name, _, attr = spec.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except ImportError as err:
        raise ConfigError(f"{field}: cannot import {module_name!r}: {err}") from err
    except AttributeError as err:
        raise ConfigError(f"{field}: {module_name!r} has no {attr!r}") from err
    provider: AbstractTokenProvider
    if isinstance(target, AbstractTokenProvider):
        provider = target
    elif inspect.iscoroutinefunction(target):
        provider = _FunctionTokens(target)
    elif callable(target):
        try:
            made = target()
        except Exception as err:
            raise ConfigError(f"{field}: {spec}() failed: {err!r}") from err
        if isinstance(made, AbstractTokenProvider):
            provider = made
        elif isinstance(made, str) and made:
            provider = _FunctionTokens(target, first=made)
        else:
            raise ConfigError(
                f"{field}: {spec}() returned {type(made).__name__}; expected an "
                "aiokafka.abc.AbstractTokenProvider or a token string"
            )
    else:
        raise ConfigError(f"{field}: {spec} is a {type(target).__name__}, not a callable")
    _PROVIDERS[spec] = provider
    return provider


def _ssl_context(cfg: KafkaConfig) -> ssl.SSLContext:
    password = cfg.ssl_key_password.get_secret_value() if cfg.ssl_key_password else None
    try:
        context: ssl.SSLContext = create_ssl_context(
            cafile=str(cfg.ssl_cafile) if cfg.ssl_cafile else None,
            certfile=str(cfg.ssl_certfile) if cfg.ssl_certfile else None,
            keyfile=str(cfg.ssl_keyfile) if cfg.ssl_keyfile else None,
            password=password,
        )
    except (OSError, ssl.SSLError) as err:  # never the password itself: it is not in err
        files = [
            f"kafka.{name}={value}"
            for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile")
            if (value := getattr(cfg, name)) is not None
        ]
        hint = " (or kafka.ssl_key_password)" if cfg.ssl_keyfile else ""
        raise ConfigError(
            f"kafka TLS files cannot be used: {err}; check {', '.join(files)}{hint}"
        ) from err
    context.check_hostname = cfg.ssl_check_hostname  # the chain is verified either way
    return context


def connection_kwargs(cfg: KafkaConfig) -> dict[str, Any]:
    """Bootstrap servers, client id and security settings for any aiokafka client.

    Raises :class:`ConfigError` (naming the ``kafka.*`` setting) for TLS files that cannot
    be loaded, a token provider that cannot be imported, or GSSAPI without ``gssapi``."""
    kwargs: dict[str, Any] = {
        "bootstrap_servers": cfg.bootstrap_servers,
        "client_id": cfg.client_id,
        "security_protocol": cfg.security_protocol,
        "metadata_max_age_ms": cfg.metadata_max_age_ms,
    }
    if cfg.security_protocol in ("SSL", "SASL_SSL"):
        kwargs["ssl_context"] = _ssl_context(cfg)
    if not cfg.security_protocol.startswith("SASL"):
        return kwargs
    mech = cfg.sasl_mechanism
    kwargs["sasl_mechanism"] = mech
    if mech == "OAUTHBEARER":
        assert cfg.sasl_oauth_token_provider is not None
        kwargs["sasl_oauth_token_provider"] = token_provider(cfg.sasl_oauth_token_provider)
    elif mech == "GSSAPI":
        if importlib.util.find_spec("gssapi") is None:
            raise ConfigError(
                "kafka.sasl_mechanism: GSSAPI needs the gssapi package "
                "(pip install gssapi; it builds against the system's Kerberos libraries, "
                "e.g. Debian libkrb5-dev) and a Kerberos ticket or keytab (KRB5_CLIENT_KTNAME)"
            )
        kwargs["sasl_kerberos_service_name"] = cfg.sasl_kerberos_service_name
        kwargs["sasl_kerberos_domain_name"] = cfg.sasl_kerberos_domain_name
    else:
        assert cfg.sasl_password is not None
        kwargs["sasl_plain_username"] = cfg.sasl_username
        kwargs["sasl_plain_password"] = cfg.sasl_password.get_secret_value()
    return kwargs


def make_admin(settings: Settings) -> AIOKafkaAdminClient:
    """An admin client (topic metadata, creation) with ``kafka.client_options.admin``."""
    options = settings.kafka.client_options.admin.kwargs()
    return AIOKafkaAdminClient(**connection_kwargs(settings.kafka), **options)


async def _diagnose(cfg: KafkaConfig) -> str:
    """Why a connection to the first bootstrap server fails (aiokafka only logs it)."""
    kwargs = connection_kwargs(cfg)
    for name in ("bootstrap_servers", "metadata_max_age_ms"):
        kwargs.pop(name)
    try:
        host, port, _family = collect_hosts(cfg.bootstrap_servers, randomize=False)[0]
        conn = await asyncio.wait_for(create_conn(host, port, **kwargs), 15)
    except Exception as exc:
        err = exc
    else:
        conn.close()
        return "the first server answers now; check the others"
    why = f"{type(err).__name__}: {err}"
    if isinstance(err, KafkaError) and "Authentication" in type(err).__name__:
        if cfg.sasl_mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
            why += f" (check kafka.sasl_username {cfg.sasl_username!r} and kafka.sasl_password)"
    elif isinstance(err, ssl.SSLError):
        why += " (check kafka.ssl_cafile and kafka.ssl_check_hostname)"
    return why


async def start_client(client: Any, cfg: KafkaConfig, what: str) -> None:
    """``await client.start()``; a failed bootstrap becomes a :class:`BrokerConnectError`
    that says why (bad credentials, TLS, unreachable)."""
    try:
        await client.start()
    except KafkaConnectionError as err:
        with contextlib.suppress(Exception):
            await client.close() if hasattr(client, "close") else await client.stop()
        raise BrokerConnectError(
            f"the {what} cannot connect to the brokers at {cfg.bootstrap_servers} "
            f"({cfg.security_protocol}): {await _diagnose(cfg)}"
        ) from err


def make_consumer(settings: Settings, *, group_id: str | None = None) -> AIOKafkaConsumer:
    """A consumer with manual commits and an explicit ``auto_offset_reset``, whose fetch
    survives header keys that are not UTF-8 (:mod:`.fetch`): such a record is dead-lettered.
    ``kafka.client_options.consumer`` adds to it."""
    inp = settings.input
    return HeaderTolerantConsumer(
        **connection_kwargs(settings.kafka),
        **settings.kafka.client_options.consumer.kwargs(),
        group_id=group_id or inp.group_id,
        enable_auto_commit=False,
        auto_offset_reset=inp.auto_offset_reset,
        isolation_level="read_committed",
        max_poll_records=settings.batching.max_size,
        session_timeout_ms=inp.session_timeout_ms,
        heartbeat_interval_ms=max(inp.session_timeout_ms // 3, 100),
        max_poll_interval_ms=inp.max_poll_interval_ms,
    )


#: aiokafka's default ``max_batch_size``.
_BATCH_BYTES = 16_384


def _producer_kwargs(settings: Settings, batch_bytes: int | None) -> dict[str, Any]:
    """``batch_bytes``: the largest batch the output topics accept (their smallest
    ``max.message.bytes``): batches are never made larger, or the broker would refuse them
    whole. An explicit ``kafka.client_options.producer.max_batch_size`` is kept as it is."""
    defaults = {"linger_ms": 5, "max_request_size": 4 * 1024 * 1024}
    if batch_bytes is not None:
        defaults["max_batch_size"] = min(_BATCH_BYTES, batch_bytes)
    options = settings.kafka.client_options.producer.kwargs()
    return {**connection_kwargs(settings.kafka), **defaults, **options}


def make_producer(settings: Settings, batch_bytes: int | None = None) -> AIOKafkaProducer:
    """An idempotent producer waiting for all in-sync replicas (batches of at most
    ``batch_bytes``: see :func:`_producer_kwargs`)."""
    return AIOKafkaProducer(
        **_producer_kwargs(settings, batch_bytes), acks="all", enable_idempotence=True
    )


def make_transactional_producer(
    settings: Settings, transactional_id: str, batch_bytes: int | None = None
) -> AIOKafkaProducer:
    """A producer for one input partition's transactions (``delivery: exactly_once``)."""
    return AIOKafkaProducer(
        **_producer_kwargs(settings, batch_bytes),
        acks="all",
        enable_idempotence=True,
        transactional_id=transactional_id,
        transaction_timeout_ms=settings.flow.transaction_timeout_ms,
    )


async def topic_partitions(settings: Settings, topics: list[str]) -> dict[str, set[int]]:
    """The partitions of each of ``topics`` that exists (admin client metadata requests).

    Lists the topics first: a metadata request naming a missing topic would create it on a
    broker with ``auto.create.topics.enable``.
    """
    admin = make_admin(settings)
    await start_client(admin, settings.kafka, "admin client")
    try:
        names = set(await admin.list_topics())
        present = [t for t in topics if t in names]
        found = await admin.describe_topics(present) if present else []
    finally:
        await admin.close()
    return {
        t["topic"]: {p["partition"] for p in t["partitions"]} for t in found if t["error_code"] == 0
    }


# ---- what this principal may do with a topic: Metadata v8's authorized operations (KIP-430) --

#: AclOperation codes: bit ``code`` of a topic's authorized operations.
_OPERATIONS = {3: "read", 4: "write", 5: "create", 6: "delete", 7: "alter", 8: "describe"}


class _MetadataResponseV8(Response):  # type: ignore[misc]
    API_KEY = 3
    API_VERSION = 8
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "brokers",
            Array(
                ("node_id", Int32),
                ("host", String("utf-8")),
                ("port", Int32),
                ("rack", String("utf-8")),
            ),
        ),
        ("cluster_id", String("utf-8")),
        ("controller_id", Int32),
        (
            "topics",
            Array(
                ("error_code", Int16),
                ("topic", String("utf-8")),
                ("is_internal", Boolean),
                (
                    "partitions",
                    Array(
                        ("error_code", Int16),
                        ("partition", Int32),
                        ("leader", Int32),
                        ("leader_epoch", Int32),
                        ("replicas", Array(Int32)),
                        ("isr", Array(Int32)),
                        ("offline_replicas", Array(Int32)),
                    ),
                ),
                ("authorized_operations", Int32),
            ),
        ),
        ("cluster_authorized_operations", Int32),
    )


class _MetadataRequestV8(RequestStruct):  # type: ignore[misc]
    API_KEY = 3
    API_VERSION = 8
    RESPONSE_TYPE = _MetadataResponseV8
    SCHEMA = Schema(
        ("topics", Array(String("utf-8"))),
        ("allow_auto_topic_creation", Boolean),
        ("include_cluster_authorized_operations", Boolean),
        ("include_topic_authorized_operations", Boolean),
    )


class _TopicOperationsRequest(Request[_MetadataRequestV8]):  # type: ignore[misc]
    API_KEY = 3

    def __init__(self, topics: list[str]) -> None:
        self._topics = topics

    def build(self, request_struct_class: type[_MetadataRequestV8]) -> _MetadataRequestV8:
        return request_struct_class(self._topics, False, False, True)


async def topic_operations(settings: Settings, topics: list[str]) -> dict[str, set[str]] | None:
    """What this client's principal may do with each of ``topics`` that exists and it may
    describe: ``{"read", "write", "describe", ...}``. None when the broker cannot say (no
    Metadata v8). Sends nothing to the topics."""
    admin = make_admin(settings)
    await start_client(admin, settings.kafka, "admin client")
    try:
        try:
            response = await admin._send_request(_TopicOperationsRequest(topics))
        except (IncompatibleBrokerVersion, NotImplementedError):
            return None
    finally:
        await admin.close()
    found: dict[str, set[str]] = {}
    for topic in response.to_object()["topics"]:
        bits = topic["authorized_operations"]
        if topic["error_code"] == 0 and bits >= 0:
            found[topic["topic"]] = {op for code, op in _OPERATIONS.items() if bits >> code & 1}
    return found
