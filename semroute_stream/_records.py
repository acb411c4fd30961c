"""Input parsing and the outcome / dead-letter record schemas (documented in the README).

Pure functions over plain values: no Kafka, no I/O. ``parse_input`` turns the raw bytes of one
message into a :class:`Query` or raises :class:`InputError` with a stable ``kind``.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from ._errors import InputError

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


@dataclass(frozen=True)
class Query:
    """A message that parsed: its text, optional id and the original payload."""

    text: str
    id: str | None
    payload: Any


def parse_input(
    value: bytes | None,
    *,
    format: Literal["json", "text"],
    text_field: str,
    id_field: str,
    max_bytes: int,
    max_chars: int,
) -> Query:
    """Validate one message value. Raises :class:`InputError` on anything unroutable."""
    if value is None:
        raise InputError("null_value", "the message value is null (a tombstone?)")
    if len(value) > max_bytes:
        raise InputError(
            "oversized", f"the message is {len(value)} bytes; the limit is {max_bytes}"
        )
    try:
        decoded = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            "invalid_utf8", f"not valid UTF-8 at byte {exc.start}: {exc.reason}"
        ) from exc
    if format == "text":
        text, ident, payload = decoded, None, decoded
    else:
        try:
            payload = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            raise InputError("invalid_json", f"not valid JSON: {exc}") from exc
        if not isinstance(payload, dict):
            raise InputError(
                "not_an_object", f"expected a JSON object, got {type(payload).__name__}"
            )
        if text_field not in payload:
            raise InputError("missing_text", f"the object has no {text_field!r} field")
        text = payload[text_field]
        if not isinstance(text, str):
            raise InputError(
                "text_not_string",
                f"field {text_field!r} is {type(text).__name__}, expected a string",
            )
        raw_id = payload.get(id_field)
        ident = None if raw_id is None else str(raw_id)
    if not text.strip():
        raise InputError("empty_text", "the text is empty or only whitespace")
    if len(text) > max_chars:
        raise InputError(
            "oversized", f"the text is {len(text)} characters; the limit is {max_chars}"
        )
    return Query(text=text, id=ident, payload=payload)


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
