"""Optional OpenTelemetry spans: batch, encode, decide, one per message, LLM call, publish.

Off by default and absent from the core install: ``pip install 'semroute-stream[otel]'``.
Attributes follow the OpenTelemetry messaging semantic conventions (``messaging.system=kafka``,
``messaging.destination.name``, ``messaging.destination.partition.id``, ``messaging.kafka.offset``,
``messaging.batch.message_count``, ``messaging.operation.type``, ``messaging.consumer.group.name``).

Spans of one message are children of its batch's span: the per-message task is created inside the
batch span, and asyncio tasks inherit the context they are created in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from .._errors import ConfigError
from .settings import TracingConfig

__all__ = ["MESSAGING", "Tracer", "make_tracer"]

Attributes = Mapping[str, Any]  # str, int, float or bool values

#: The attribute every messaging span carries.
MESSAGING = {"messaging.system": "kafka"}


class Tracer:
    """Starts spans; without a real tracer (tracing off) every span is a no-op."""

    def __init__(self, otel_tracer: Any = None, provider: Any = None) -> None:
        self._tracer = otel_tracer
        self._provider = provider  # ours to flush and shut down, when we made it

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    @contextlib.contextmanager
    def span(self, name: str, attributes: Attributes, *, kind: str = "internal") -> Iterator[Any]:
        if self._tracer is None:
            yield None
            return
        from opentelemetry.trace import SpanKind

        with self._tracer.start_as_current_span(
            name, kind=getattr(SpanKind, kind.upper()), attributes=dict(attributes)
        ) as span:
            yield span

    def shutdown(self) -> None:
        if self._provider is not None:
            self._provider.shutdown()


def make_tracer(config: TracingConfig) -> Tracer:
    """The tracer ``config`` asks for; a no-op one when tracing is off."""
    if not config.enabled:
        return Tracer()
    try:
        from opentelemetry import trace
    except ImportError:
        raise ConfigError(
            "tracing.enabled: OpenTelemetry is not installed; "
            "install the extra: pip install 'semroute-stream[otel]'"
        ) from None
    if config.exporter == "global":
        return Tracer(trace.get_tracer("semroute_stream"))
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

        if config.exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as err:
        raise ConfigError(
            f"tracing.exporter {config.exporter!r}: {err.name} is not installed; "
            "install the extra: pip install 'semroute-stream[otel]'"
        ) from None
    exporter = OTLPSpanExporter() if config.exporter == "otlp" else ConsoleSpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": config.service_name}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return Tracer(provider.get_tracer("semroute_stream"), provider)
