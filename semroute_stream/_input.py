"""Input parsing: the raw bytes of one message -> a :class:`Query`, or an :class:`InputError`.

Shared by the service and the offline ``route`` and ``embed`` commands. Pure: no Kafka, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import orjson

from ._errors import InputError

__all__ = ["Query", "check_envelope", "json_deeper_than", "parse_input"]


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
    max_depth: int = 64,
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
        if json_deeper_than(value, payload, max_depth):
            raise InputError(
                "too_deep", f"the JSON nests deeper than {max_depth} levels (input.max_json_depth)"
            )
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


def json_deeper_than(raw: bytes, parsed: Any, limit: int) -> bool:
    """Whether ``parsed`` (the JSON document ``raw``) nests more than ``limit`` levels deep.

    A scalar is depth 0, ``{}`` or ``[]`` depth 1. The outcome record embeds the input a few
    levels down, and orjson writes at most 254 levels, so the limit is checked at parse time
    (a record that parses must also be writable). Cheap for ordinary messages: a document
    with fewer brackets than ``limit`` is never walked.
    """
    if raw.count(b"{") + raw.count(b"[") <= limit:
        return False
    stack: list[tuple[Any, int]] = [(parsed, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def check_envelope(
    key: bytes | None,
    headers: tuple[tuple[str, bytes], ...],
    *,
    max_key_bytes: int,
    max_headers: int,
    max_header_bytes: int,
) -> None:
    """Validate a message's key and headers (outcomes copy them). Raises :class:`InputError`."""
    if key is not None and len(key) > max_key_bytes:
        raise InputError(
            "oversized_key", f"the key is {len(key)} bytes; the limit is {max_key_bytes}"
        )
    if len(headers) > max_headers:
        count = len(headers)
        raise InputError(
            "too_many_headers", f"the message has {count} headers; the limit is {max_headers}"
        )
    for k, _ in headers:
        try:
            k.encode("utf-8")
        except UnicodeEncodeError:  # the consumer decoded it with surrogateescape
            raw = k.encode("utf-8", "surrogateescape")
            raise InputError(
                "undecodable_header_key", f"a header key is not UTF-8: {raw[:64]!r}"
            ) from None
    size = sum(len(k.encode("utf-8", "surrogateescape")) + len(v or b"") for k, v in headers)
    if size > max_header_bytes:
        raise InputError(
            "oversized_headers",
            f"the headers are {size} bytes in all; the limit is {max_header_bytes}",
        )
