"""What a message becomes: its :class:`Source`, its :class:`Outcome`, and the outcome /
dead-letter record schemas (documented in the README).

Pure functions over plain values: no Kafka, no I/O.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from .._input import Query

__all__ = [
    "DEAD_LETTER_SCHEMA",
    "OUTCOME_SCHEMA",
    "OutRecord",
    "Outcome",
    "Source",
    "coords",
    "dead_letter_record",
    "outcome_record",
]

OUTCOME_SCHEMA = "semroute.outcome/1"
DEAD_LETTER_SCHEMA = "semroute.dead_letter/1"

Headers = tuple[tuple[str, bytes], ...]


@dataclass(frozen=True)
class Source:
    """Where a message came from."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None
    key: bytes | None
    headers: Headers

    @property
    def idempotency_key(self) -> str:
        return f"{self.topic}/{self.partition}/{self.offset}"


def coords(src: Source) -> dict[str, Any]:
    """The message coordinates every log line about one message carries."""
    return {"topic": src.topic, "partition": src.partition, "offset": src.offset}


@dataclass(frozen=True)
class OutRecord:
    """One record to publish."""

    topic: str
    value: bytes
    key: bytes | None
    headers: list[tuple[str, bytes]]


@dataclass(frozen=True)
class Outcome:
    """The one record a message ends as: a response (``kind`` None) or a dead letter."""

    src: Source
    topic: str
    value: bytes
    received: float  # wall clock when its batch was fetched
    route: str | None = None
    kind: str | None = None  # the dead letter's error kind
    fallback: bool = False

    def record(self) -> OutRecord:
        """The record to write: the input's key and headers, plus status and route headers."""
        headers = list(self.src.headers)
        headers.append(("semroute-status", b"error" if self.kind is not None else b"ok"))
        if self.route is not None:
            headers.append(("semroute-route", self.route.encode()))
        return OutRecord(self.topic, self.value, self.src.key, headers)


def _bytes_field(data: bytes | None) -> dict[str, str] | None:
    """Bytes as text when they are UTF-8, else base64: ``{"text": ...}`` or ``{"base64": ...}``."""
    if data is None:
        return None
    try:
        return {"text": data.decode("utf-8")}
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(data).decode("ascii")}


def _source_fields(src: Source) -> dict[str, Any]:
    return {
        "idempotency_key": src.idempotency_key,
        "key": _bytes_field(src.key),
        "headers": [{"key": k, **(_bytes_field(v) or {})} for k, v in src.headers],
        "source": {
            "topic": src.topic,
            "partition": src.partition,
            "offset": src.offset,
            "timestamp_ms": src.timestamp_ms,
        },
    }


def outcome_record(
    src: Source,
    query: Query,
    *,
    decision: dict[str, Any],
    endpoint: str | None,
    llm_model: str | None,
    response: dict[str, Any] | None,
    timings_ms: dict[str, float],
) -> bytes:
    """The success record written to the responses topic, as JSON bytes."""
    record: dict[str, Any] = {
        "schema": OUTCOME_SCHEMA,
        "status": "ok",
        "id": query.id,
        **_source_fields(src),
        "input": query.payload,
        "route": decision["route"],
        "is_fallback": decision["is_fallback"],
        "decision": decision,
        "endpoint": endpoint,
        "llm_model": llm_model,
        "response": response,
        "timings_ms": timings_ms,
        "processed_at_ms": int(time.time() * 1000),
    }
    return orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY)


def dead_letter_record(
    src: Source,
    value: bytes | None,
    *,
    kind: str,
    reason: str,
    stage: Literal["parse", "llm", "publish"],
    query: Query | None = None,
    decision: dict[str, Any] | None = None,
    endpoint: str | None = None,
    attempts: int | None = None,
) -> bytes:
    """The record written to the dead-letter topic, as JSON bytes. Keeps the original bytes."""
    record: dict[str, Any] = {
        "schema": DEAD_LETTER_SCHEMA,
        "status": "error",
        "error": {"kind": kind, "reason": reason, "stage": stage, "attempts": attempts},
        "id": query.id if query else None,
        **_source_fields(src),
        "value": _bytes_field(value),
        "route": decision["route"] if decision else None,
        "decision": decision,
        "endpoint": endpoint,
        "processed_at_ms": int(time.time() * 1000),
    }
    return orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY)
