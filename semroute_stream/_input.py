"""Input parsing: the raw bytes of one message -> a :class:`Query`, or an :class:`InputError`.

Shared by the service and the offline ``route`` and ``embed`` commands. Pure: no Kafka, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import orjson

from ._errors import InputError

__all__ = ["Query", "parse_input"]


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
