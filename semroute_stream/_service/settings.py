"""The service config: one YAML file, overridden by ``SEMROUTE_*`` environment variables.

``SEMROUTE_KAFKA__BOOTSTRAP_SERVERS=host:9092`` overrides ``kafka.bootstrap_servers``: the prefix is
``SEMROUTE_`` and ``__`` separates nested fields. Sources, highest first: the environment, a
``.env`` file (``SEMROUTE_ENV_FILE``, else ``.env`` next to the config), secret files
(``secrets_dir`` or ``SEMROUTE_SECRETS_DIR``: ``kafka__sasl_password``...), the YAML file.
Secrets (``kafka.sasl_password``, ``kafka.ssl_key_password``) are ``SecretStr``, never printed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from .._encoder import EncoderConfig
from .._errors import ConfigError
from .client_options import ClientOptions
from .llm import EndpointConfig

__all__ = [
    "BatchingConfig",
    "DriftConfig",
    "FlowConfig",
    "InputConfig",
    "KafkaConfig",
    "LearningConfig",
    "LoggingConfig",
    "ObservabilityConfig",
    "OutputConfig",
    "ReloadConfig",
    "ReviewConfig",
    "Settings",
    "ShadowConfig",
    "TracingConfig",
    "load_settings",
    "topic_name_problem",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


_PROVIDER = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


class KafkaConfig(_Section):
    """How to reach the brokers: one set of security settings for every client.

    SASL: ``PLAIN`` / ``SCRAM-*`` take ``sasl_username`` and ``sasl_password``; ``OAUTHBEARER``
    takes ``sasl_oauth_token_provider`` (``module:callable``, see :mod:`.kafka`); ``GSSAPI``
    (Kerberos) needs the ``gssapi`` package and takes ``sasl_kerberos_service_name`` /
    ``sasl_kerberos_domain_name``. TLS (``SSL``, ``SASL_SSL``): the CA, an optional client
    certificate and key (``ssl_key_password`` when the key is encrypted), hostname checks on.
    """

    bootstrap_servers: str = "127.0.0.1:9092"
    client_id: str = "semroute-stream"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: (
        Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "GSSAPI"] | None
    ) = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    #: OAUTHBEARER: ``module:callable`` returning an ``aiokafka.abc.AbstractTokenProvider``,
    #: or a sync/async function returning the token (wrapped in one).
    sasl_oauth_token_provider: str | None = None
    sasl_kerberos_service_name: str = "kafka"
    sasl_kerberos_domain_name: str | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_key_password: SecretStr | None = None
    ssl_check_hostname: bool = True
    #: How often client metadata is refreshed: a topic created after start is seen this soon.
    metadata_max_age_ms: int = Field(default=10_000, ge=1_000)
    #: Extra aiokafka options per client, from an allow-list (see client_options.py).
    client_options: ClientOptions = ClientOptions()

    @model_validator(mode="after")
    def _sasl_is_complete(self) -> KafkaConfig:
        sasl = self.security_protocol.startswith("SASL")
        mech = self.sasl_mechanism
        if sasl and mech is None:
            raise ValueError(f"security_protocol {self.security_protocol} needs sasl_mechanism")
        if not sasl and mech is not None:
            raise ValueError(
                f"sasl_mechanism {mech} needs security_protocol SASL_SSL or SASL_PLAINTEXT"
            )
        if (
            sasl
            and mech in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
            and (not self.sasl_username or self.sasl_password is None)
        ):
            raise ValueError(
                f"SASL needs sasl_username and sasl_password with {mech} "
                "(set the password with SEMROUTE_KAFKA__SASL_PASSWORD or a secret file)"
            )
        provider = self.sasl_oauth_token_provider
        if sasl and mech == "OAUTHBEARER" and not provider:
            raise ValueError("SASL OAUTHBEARER needs sasl_oauth_token_provider (module:callable)")
        if provider is not None and not _PROVIDER.fullmatch(provider):
            raise ValueError(
                f"sasl_oauth_token_provider {provider!r}: expected module:callable, "
                "e.g. mypkg.auth:token_provider"
            )
        if self.ssl_keyfile is not None and self.ssl_certfile is None:
            raise ValueError("ssl_keyfile needs ssl_certfile (the client certificate)")
        return self


class InputConfig(_Section):
    """The topic the queries come from and how to read them."""

    topic: str
    group_id: str = "semroute-stream"
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    format: Literal["json", "text"] = "json"
    text_field: str = "text"
    id_field: str = "id"
    max_message_bytes: int = Field(default=64 * 1024, ge=1)
    max_text_chars: int = Field(default=8_000, ge=1)
    # Limits that keep every outcome writable (outcomes copy the key and headers, and embed the
    # parsed JSON a few levels down; orjson writes at most 254 levels).
    max_json_depth: int = Field(default=64, ge=1, le=200)
    max_key_bytes: int = Field(default=4096, ge=0)
    max_headers: int = Field(default=64, ge=0)
    max_header_bytes: int = Field(default=16 * 1024, ge=0)
    session_timeout_ms: int = Field(default=30_000, ge=1_000)
    max_poll_interval_ms: int = Field(default=300_000, ge=1_000)


class OutputConfig(_Section):
    """Where outcomes go: one responses topic (or one per route) and a dead-letter topic."""

    responses_topic: str
    dlq_topic: str
    per_route_topics: bool = False
    route_topic_prefix: str | None = None  # default: "<responses_topic>."
    # Outcome and dead-letter records are cut to fit this and the output topics'
    # max.message.bytes (read at start-up), whichever is smaller.
    max_record_bytes: int = Field(default=1_000_000, ge=16_384)
    # Create missing output topics at start-up and on reload (else: fail fast, naming them).
    create_topics: bool = True
    # Retry (parking) topics: "<prefix><endpoint>"; default prefix "<input.topic>.retry.".
    retry_topic_prefix: str | None = None
    # Outcome timestamps: the input record's (as Kafka Streams does; immune to this host's
    # clock) or this host's clock.
    timestamps: Literal["input", "now"] = "input"

    @model_validator(mode="after")
    def _topics_are_valid(self) -> OutputConfig:
        prefix = [self.route_topic_prefix] if self.route_topic_prefix else []
        for name in [self.responses_topic, self.dlq_topic, *prefix]:
            problem = topic_name_problem(name)
            if problem:
                raise ValueError(f"{name!r}: {problem}")
        return self

    def topic_for(self, route: str) -> str:
        if not self.per_route_topics:
            return self.responses_topic
        prefix = self.route_topic_prefix or f"{self.responses_topic}."
        return f"{prefix}{route}"


_TOPIC_CHARS = re.compile(r"[a-zA-Z0-9._-]+")


def topic_name_problem(name: str) -> str | None:
    """Why ``name`` is not a valid Kafka topic name (None when it is)."""
    if not name or name in (".", ".."):
        return "a topic name cannot be empty, '.' or '..'"
    if len(name) > 249:
        return f"a topic name has at most 249 characters, this one {len(name)}"
    if not _TOPIC_CHARS.fullmatch(name):
        return "a topic name may only hold ASCII letters, digits, '.', '_' and '-'"
    return None


class BatchingConfig(_Section):
    """Micro-batches close when they hold ``max_size`` messages or ``linger_ms`` has passed.

    256, as ``semroute-stream route`` uses: under a backlog the encoder spends 16-35 % less CPU
    per message than with batches of 64 (fewer model calls, better length buckets), and a batch
    is only that large when that many messages are waiting (``benchmarks/service_vs_offline.py``).
    """

    max_size: int = Field(default=256, ge=1, le=4096)
    linger_ms: int = Field(default=25, ge=0)


class FlowConfig(_Section):
    """Backpressure, commits and shutdown."""

    max_in_flight: int = Field(default=512, ge=1)
    max_in_flight_per_endpoint: int = Field(default=256, ge=1)
    commit_interval_ms: int = Field(default=500, ge=10)
    drain_timeout_s: float = Field(default=30.0, ge=0)
    rebalance_drain_timeout_s: float = Field(default=10.0, ge=0)
    circuit_open_max_wait_s: float = Field(default=300.0, ge=0)
    # llm mode: a message whose endpoint has been unavailable (breaker open, misconfigured) this
    # long is parked on the endpoint's retry topic, so its partition's offset moves on and other
    # routes keep flowing; it is answered when the endpoint is back. None: wait (then DLQ
    # after circuit_open_max_wait_s) instead.
    park_after_s: float | None = Field(default=30.0, gt=0)
    transaction_timeout_ms: int = Field(default=60_000, ge=1_000)  # exactly_once only


class ObservabilityConfig(_Section):
    """The HTTP server for ``/metrics``, ``/livez`` and ``/readyz`` (off unless a port is set)."""

    metrics_port: int | None = Field(default=None, ge=0, le=65535)  # None: no server; 0: any
    host: str = "127.0.0.1"
    # /readyz turns 503 when the consumer makes no progress for this long (see docs/operations.md)
    stall_timeout_s: float = Field(default=30.0, gt=0)


class LoggingConfig(_Section):
    """Log format and level. Message text is never logged unless ``log_message_text``."""

    format: Literal["text", "json"] = "text"
    level: Literal["debug", "info", "warning", "error"] = "info"
    log_message_text: bool = False


class ReloadConfig(_Section):
    """Hot reload of the routes file: checked every ``watch_interval_s`` (0: on SIGHUP only)."""

    watch_interval_s: float = Field(default=5.0, ge=0)


class LearningConfig(_Section):
    """Corrections that retrain the route head in-stream (off by default; docs/learning.md).

    Corrections (``{"id", "text", "label"}``, label a route name or null) are read from
    ``corrections_topic`` by the group ``group_id``; accepted ones become entries of the overlay,
    a compacted topic every replica replays. The head is retrained in the background at most
    every ``retrain_min_interval_s``, ``retrain_debounce_s`` after the overlay changed, and
    swapped in between batches unless its cross-validated accuracy is more than
    ``guard_tolerance`` below the live routes'.
    """

    enabled: bool = False
    corrections_topic: str | None = None  # default "<input.topic>.corrections"
    overlay_topic: str | None = None  # default "<input.topic>.overlay" (compacted, 1 partition)
    group_id: str | None = None  # default "<input.group_id>.corrections"
    max_text_chars: int = Field(default=1_000, ge=1)
    retrain_debounce_s: float = Field(default=1.0, ge=0)
    retrain_min_interval_s: float = Field(default=5.0, ge=0)
    guard_tolerance: float = Field(default=0.02, ge=0, le=1)
    #: train in a separate process (no GIL shared with the routing loop), at this nice level
    retrain_process: bool = True
    retrain_nice: int = Field(default=10, ge=0, le=19)
    flip_limit: int = Field(default=3, ge=1)
    flip_window_s: float = Field(default=3600.0, gt=0)

    @model_validator(mode="after")
    def _topics_are_valid(self) -> LearningConfig:
        for name in (self.corrections_topic, self.overlay_topic):
            problem = topic_name_problem(name) if name is not None else None
            if problem:
                raise ValueError(f"{name!r}: {problem}")
        return self


ReviewReason = Literal["fallback", "low_margin", "low_confidence", "disagreement"]
REVIEW_REASONS: tuple[ReviewReason, ...] = get_args(ReviewReason)
"""Why a decision is worth a human look (``review.reasons``; see :mod:`.review`)."""


class ReviewConfig(_Section):
    """Decisions worth a human look, copied to a review topic (off by default).

    A decision is a candidate for each reason it meets: ``fallback`` (no route passed),
    ``low_margin`` (a route was chosen, leading its runner-up by less than ``margin_below``),
    ``low_confidence`` (method ``head`` only: a route was chosen with a calibrated probability
    below ``confidence_below``), ``disagreement`` (the chosen route is not the route of the
    nearest example utterance). A candidate is kept when the hash of its input's coordinates
    (topic/partition/offset) and ``seed`` falls under ``sample_rate`` (a replay keeps the same
    ones), and while a token bucket of ``max_per_minute`` (refilled evenly) has a token.
    """

    enabled: bool = False
    topic: str | None = None  # default: "<output.responses_topic>.review"
    reasons: list[ReviewReason] = list(REVIEW_REASONS)
    margin_below: float = Field(default=0.05, ge=0)
    confidence_below: float = Field(default=0.5, ge=0, le=1)
    sample_rate: float = Field(default=1.0, ge=0, le=1)
    seed: int = 0
    max_per_minute: int = Field(default=600, ge=1)

    @model_validator(mode="after")
    def _valid(self) -> ReviewConfig:
        if self.topic is not None and (problem := topic_name_problem(self.topic)):
            raise ValueError(f"topic {self.topic!r}: {problem}")
        if not self.reasons:
            raise ValueError(f"reasons: name at least one of {', '.join(REVIEW_REASONS)}")
        return self


class ShadowConfig(_Section):
    """A candidate routes file decided alongside the live one (off while ``routes`` is unset).

    Every batch is decided by both on the same embeddings; where they disagree (another
    route, or a fallback against a route) a record with both explanations goes to ``topic``.
    ``semroute-stream promote`` makes the candidate the live routes file.
    """

    routes: Path | None = None  # relative to the config file's directory
    topic: str | None = None  # default: "<output.responses_topic>.shadow"

    @model_validator(mode="after")
    def _valid(self) -> ShadowConfig:
        if self.topic is not None and (problem := topic_name_problem(self.topic)):
            raise ValueError(f"topic {self.topic!r}: {problem}")
        return self


class DriftConfig(_Section):
    """The drift signal: route shares and fallback rate of the last ``recent_messages``
    decisions against the ``baseline_messages`` decided before them (off by default)."""

    enabled: bool = False
    recent_messages: int = Field(default=1_000, ge=10)
    baseline_messages: int = Field(default=10_000, ge=10)


class TracingConfig(_Section):
    """OpenTelemetry spans (needs ``pip install 'semroute-stream[otel]'``); off by default.

    ``exporter``: ``otlp`` (OTLP/HTTP, configured by the standard ``OTEL_EXPORTER_OTLP_*``
    variables), ``console`` (spans printed to stdout), or ``global`` (use the tracer provider the
    host process already set up, e.g. with ``opentelemetry-instrument``).
    """

    enabled: bool = False
    exporter: Literal["otlp", "console", "global"] = "otlp"
    service_name: str = "semroute-stream"


class Settings(BaseSettings):
    """Everything ``semroute-stream run`` needs. Load it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="SEMROUTE_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
        # a .env file may hold other tools' variables: only SEMROUTE_* ones are read
        dotenv_filtering="match_prefix",
    )

    routes: Path
    #: Docker/Kubernetes secret files (``kafka__sasl_password``...); SEMROUTE_SECRETS_DIR too.
    secrets_dir: Path | None = None
    mode: Literal["llm", "route_only"] = "llm"
    delivery: Literal["at_least_once", "exactly_once"] = "at_least_once"
    kafka: KafkaConfig = KafkaConfig()
    input: InputConfig
    output: OutputConfig
    batching: BatchingConfig = BatchingConfig()
    flow: FlowConfig = FlowConfig()
    encoder: EncoderConfig = EncoderConfig()
    endpoints: dict[str, EndpointConfig] = {}
    observability: ObservabilityConfig = ObservabilityConfig()
    logging: LoggingConfig = LoggingConfig()
    reload: ReloadConfig = ReloadConfig()
    tracing: TracingConfig = TracingConfig()
    learning: LearningConfig = LearningConfig()

    @property
    def corrections_topic(self) -> str:
        return self.learning.corrections_topic or f"{self.input.topic}.corrections"

    @property
    def overlay_topic(self) -> str:
        return self.learning.overlay_topic or f"{self.input.topic}.overlay"

    @property
    def corrections_group(self) -> str:
        return self.learning.group_id or f"{self.input.group_id}.corrections"

    review: ReviewConfig = ReviewConfig()
    shadow: ShadowConfig = ShadowConfig()
    drift: DriftConfig = DriftConfig()

    def review_topic(self) -> str | None:
        """The review topic, when review is on."""
        if not self.review.enabled:
            return None
        return self.review.topic or f"{self.output.responses_topic}.review"

    def shadow_topic(self) -> str | None:
        """The shadow (disagreements) topic, when a candidate routes file is set."""
        if self.shadow.routes is None:
            return None
        return self.shadow.topic or f"{self.output.responses_topic}.shadow"

    @property
    def parking(self) -> bool:
        """Whether messages of an unavailable endpoint are parked on retry topics."""
        return self.mode == "llm" and self.flow.park_after_s is not None

    def retry_topic(self, endpoint: str) -> str:
        """The retry (parking) topic of ``endpoint``."""
        prefix = self.output.retry_topic_prefix or f"{self.input.topic}.retry."
        return f"{prefix}{endpoint}"

    def retry_topics(self) -> dict[str, str]:
        """Retry topic → endpoint, for every endpoint (empty when parking is off)."""
        if not self.parking:
            return {}
        return {self.retry_topic(name): name for name in sorted(self.endpoints)}

    @model_validator(mode="after")
    def _retry_topics_are_valid(self) -> Settings:
        for topic in self.retry_topics():
            problem = topic_name_problem(topic)
            if problem:
                raise ValueError(
                    f"retry topic {topic!r} (output.retry_topic_prefix + endpoint): {problem}"
                )
        if self.learning.enabled:
            for topic in (self.corrections_topic, self.overlay_topic):
                problem = topic_name_problem(topic)
                if problem:
                    raise ValueError(f"learning topic {topic!r}: {problem}")
        taken = {self.input.topic, self.output.responses_topic, self.output.dlq_topic}
        for field, side in (("review", self.review_topic()), ("shadow", self.shadow_topic())):
            if side is None:
                continue
            problem = topic_name_problem(side)
            if problem:
                raise ValueError(f"{field}.topic {side!r}: {problem}")
            if side in taken:
                raise ValueError(
                    f"{field}.topic {side!r} is already the input, responses or dead-letter "
                    "topic: it needs a topic of its own"
                )
            taken.add(side)
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Highest first: the environment, the .env file, secret files, then the YAML file
        # (it arrives as init kwargs). load_settings passes the .env file and secrets dir.
        secrets_dir = getattr(file_secret_settings, "secrets_dir", None)
        return env_settings, dotenv_settings, _SecretFiles(settings_cls, secrets_dir), init_settings


class _SecretFiles(PydanticBaseSettingsSource):
    """Docker/Kubernetes secret files: one value per file, named like the environment
    variables without their prefix (``kafka__sasl_password``; ``SEMROUTE_KAFKA__...`` works
    too), ``__`` between nested fields, any case. Hidden entries (Kubernetes' ``..data``) and
    files whose first part is not a settings section are skipped (a mounted secret may hold
    other keys). pydantic-settings' own secrets source only knows top-level fields."""

    def __init__(self, settings_cls: type[BaseSettings], secrets_dir: object) -> None:
        super().__init__(settings_cls)
        self.secrets_dir = Path(str(secrets_dir)) if secrets_dir is not None else None

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads the whole directory

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        if self.secrets_dir is None:
            return values
        fields = self.settings_cls.model_fields
        for path in sorted(self.secrets_dir.iterdir()):
            name = path.name.lower().removeprefix("semroute_")
            if name.startswith(".") or not path.is_file():
                continue
            keys = name.split("__")
            if keys[0] not in fields:
                continue
            target = values
            for key in keys[:-1]:
                nested = target.setdefault(key, {})
                if not isinstance(nested, dict):
                    break
                target = nested
            else:
                target[keys[-1]] = path.read_text(encoding="utf-8").strip()
        return values


def _describe(err: ValidationError) -> list[str]:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"{field}: {e['msg']}")
    return lines


def _env_sources(raw: dict[str, Any], base: Path, file: str) -> dict[str, Any]:
    """The ``.env`` file and the secrets directory for :class:`Settings`' sources.

    ``.env``: ``SEMROUTE_ENV_FILE`` if set (it must exist), else ``.env`` next to the config
    when there is one. Secrets: ``SEMROUTE_SECRETS_DIR`` or the file's ``secrets_dir``
    (relative to the config's directory); it must be a directory.
    """
    sources: dict[str, Any] = {}
    named = os.environ.get("SEMROUTE_ENV_FILE")
    env_file = Path(named) if named else base / ".env"
    if named and not env_file.is_file():
        raise ConfigError(f"SEMROUTE_ENV_FILE={named}: no such file", file=file)
    if env_file.is_file():
        sources["_env_file"] = env_file
        sources["_env_file_encoding"] = "utf-8"
    secrets = os.environ.get("SEMROUTE_SECRETS_DIR") or raw.get("secrets_dir")
    if secrets:
        secrets_dir = Path(str(secrets))
        if not secrets_dir.is_absolute():
            secrets_dir = base / secrets_dir
        if not secrets_dir.is_dir():
            raise ConfigError(f"secrets_dir: {secrets_dir} is not a directory", file=file)
        sources["_secrets_dir"] = secrets_dir
    return sources


def load_settings(path: str | Path) -> Settings:
    """Read the YAML config at ``path``, apply ``SEMROUTE_*`` overrides, validate.

    Relative paths in the file (``routes``, TLS files) are relative to the file's directory.
    Raises :class:`ConfigError` naming the file, each bad field and why.
    """
    path = Path(path)
    try:
        raw: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config: {exc.strerror or exc}", file=str(path)) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", file=str(path)) from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("the top level must be a mapping", file=str(path))
    base = path.resolve().parent
    sources = _env_sources(raw, base, str(path))
    try:
        settings = Settings(**raw, **sources)
    except ValidationError as exc:
        env = sorted(k for k in os.environ if k.startswith("SEMROUTE_"))
        hint = f" (environment overrides in effect: {', '.join(env)})" if env else ""
        raise ConfigError("\n".join(_describe(exc)) + hint, file=str(path)) from exc
    updates: dict[str, Any] = {}
    if "_secrets_dir" in sources:
        updates["secrets_dir"] = sources["_secrets_dir"]
    if not settings.routes.is_absolute():
        updates["routes"] = base / settings.routes
    candidate = settings.shadow.routes
    if candidate is not None and not candidate.is_absolute():
        updates["shadow"] = settings.shadow.model_copy(update={"routes": base / candidate})
    tls = {
        name: base / value
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile")
        if (value := getattr(settings.kafka, name)) is not None and not value.is_absolute()
    }
    if tls:
        updates["kafka"] = settings.kafka.model_copy(update=tls)
    return settings.model_copy(update=updates) if updates else settings
