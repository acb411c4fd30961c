"""Input validation and the outcome / dead-letter record schemas."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest

from semroute_stream._errors import InputError
from semroute_stream._input import Query, parse_input
from semroute_stream._service.records import (
    DEAD_LETTER_SCHEMA,
    OUTCOME_SCHEMA,
    Source,
    dead_letter_record,
    outcome_record,
)

OPTS: dict[str, Any] = {
    "format": "json",
    "text_field": "text",
    "id_field": "id",
    "max_bytes": 200,
    "max_chars": 50,
}


def parse(value: bytes | None, **over: Any) -> Query:
    return parse_input(value, **{**OPTS, **over})


def test_valid_json_object_keeps_payload_and_id() -> None:
    q = parse(b'{"text": "refund please", "id": 42, "extra": [1]}')
    assert q.text == "refund please"
    assert q.id == "42"
    assert q.payload == {"text": "refund please", "id": 42, "extra": [1]}


def test_custom_text_field_and_plain_text_mode() -> None:
    assert parse(b'{"body": "hi there"}', text_field="body").text == "hi there"
    q = parse("caf\u00e9 menu".encode(), format="text")
    assert (q.text, q.id, q.payload) == ("café menu", None, "café menu")


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (None, "null_value"),
        (b"x" * 201, "oversized"),
        (b'{"text": "\xff\xfe"}', "invalid_utf8"),
        (b"{not json", "invalid_json"),
        (b'["text"]', "not_an_object"),
        (b'{"body": "x"}', "missing_text"),
        (b'{"text": 7}', "text_not_string"),
        (b'{"text": null}', "text_not_string"),
        (b'{"text": "   \\n"}', "empty_text"),
        (b'{"text": "' + b"y" * 60 + b'"}', "oversized"),
    ],
)
def test_bad_input_kinds(value: bytes | None, kind: str) -> None:
    with pytest.raises(InputError) as info:
        parse(value)
    assert info.value.kind == kind
    assert info.value.reason  # a readable reason, never empty


def test_empty_text_in_plain_mode() -> None:
    with pytest.raises(InputError, match="empty_text"):
        parse(b"  ", format="text")


SRC = Source(
    topic="in",
    partition=2,
    offset=17,
    timestamp_ms=1_700_000_000_000,
    key=b"user-9",
    headers=(("trace", b"abc"), ("bin", b"\xff\x00")),
)


def test_outcome_record_schema() -> None:
    q = Query(text="hello", id="m1", payload={"text": "hello", "id": "m1"})
    decision = {"route": "greet", "is_fallback": False, "score": 0.9}
    rec = orjson.loads(
        outcome_record(
            SRC,
            q,
            decision=decision,
            endpoint="e1",
            llm_model="m",
            response={"content": "hi"},
            timings_ms={"total": 1.0},
        )
    )
    assert rec["schema"] == OUTCOME_SCHEMA
    assert rec["idempotency_key"] == "in/2/17"
    assert rec["source"] == {
        "topic": "in",
        "partition": 2,
        "offset": 17,
        "timestamp_ms": SRC.timestamp_ms,
    }
    assert rec["key"] == {"text": "user-9"}
    assert rec["headers"][0] == {"key": "trace", "text": "abc"}
    assert base64.b64decode(rec["headers"][1]["base64"]) == b"\xff\x00"
    assert rec["route"] == "greet" and rec["decision"] == decision
    assert rec["input"] == {"text": "hello", "id": "m1"}
    assert rec["response"] == {"content": "hi"}


def test_dead_letter_keeps_original_bytes() -> None:
    raw = b'{"text": "\xff"}'
    rec = orjson.loads(
        dead_letter_record(SRC, raw, kind="invalid_utf8", reason="bad byte", stage="parse")
    )
    assert rec["schema"] == DEAD_LETTER_SCHEMA
    assert rec["error"]["kind"] == "invalid_utf8"
    assert rec["error"]["reason"] == "bad byte"
    assert base64.b64decode(rec["value"]["base64"]) == raw
    assert rec["source"]["offset"] == 17
    null = orjson.loads(dead_letter_record(SRC, None, kind="null_value", reason="r", stage="parse"))
    assert null["value"] is None
