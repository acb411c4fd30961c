"""What a message becomes: its :class:`Source`, its :class:`Outcome`, and the outcome /
dead-letter record schemas (documented in docs/delivery.md).

Pure functions over plain values: no Kafka, no I/O.
"""

from __future__ import annotations

import base64
import hashlib
import time
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from .._input import Query

__all__ = [
    "DEAD_LETTER_SCHEMA",
    "OUTCOME_SCHEMA",
    "PARKED_SCHEMA",
    "RECORD_OVERHEAD_BYTES",
    "REVIEW_SCHEMA",
    "SHADOW_SCHEMA",
    "OutRecord",
    "Outcome",
    "Parked",
    "RecordTooLarge",
    "Source",
    "coords",
    "dead_letter_record",
    "envelope_bytes",
    "outcome_record",
    "parked_record",
    "read_parked",
    "review_record",
    "shadow_record",
]

#: Room left in a topic's ``max.message.bytes`` for the record batch framing.
RECORD_OVERHEAD_BYTES = 512

OUTCOME_SCHEMA = "semroute.outcome/1"
PARKED_SCHEMA = "semroute.parked/1"
DEAD_LETTER_SCHEMA = "semroute.dead_letter/1"
REVIEW_SCHEMA = "semroute.review/1"
SHADOW_SCHEMA = "semroute.shadow/1"

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

    @classmethod
    def of(cls, rec: Any) -> Source:
        """The source of a consumed ``ConsumerRecord``."""
        headers = tuple((k, v) for k, v in rec.headers)
        return cls(rec.topic, rec.partition, rec.offset, rec.timestamp, rec.key, headers)

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
    timestamp_ms: int | None = None  # None: the producer stamps it with this host's clock


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
    copy_envelope: bool = True  # False when the input's key or headers were the problem
    timestamp_ms: int | None = None
    parked: bool = False  # not final: written to its endpoint's retry topic (see Worker.park)
    consumed: Source | None = None  # where it was consumed from, when not ``src`` (a retry)
    #: records that ride with this outcome (review, shadow): written with it, same durability
    extras: tuple[OutRecord, ...] = ()

    @property
    def at(self) -> Source:
        """The consumed record whose offset this outcome finishes (commit bookkeeping)."""
        return self.consumed or self.src

    def record(self) -> OutRecord:
        """The record to write: the input's key and headers, plus status and route headers."""
        headers = list(self.src.headers) if self.copy_envelope else []
        status = b"parked" if self.parked else b"error" if self.kind is not None else b"ok"
        headers.append(("semroute-status", status))
        if self.route is not None:
            headers.append(("semroute-route", self.route.encode()))
        key = self.src.key if self.copy_envelope else None
        return OutRecord(self.topic, self.value, key, headers, self.timestamp_ms)

    def records(self) -> list[OutRecord]:
        """Its record and the records that ride with it (exactly-once: one transaction)."""
        return [self.record(), *self.extras]


def envelope_bytes(src: Source) -> int:
    """What copying the input's key and headers adds to an output record."""
    return len(src.key or b"") + sum(len(k) + len(v or b"") + 8 for k, v in src.headers)


def _bytes_field(data: bytes | None) -> dict[str, str] | None:
    """Bytes as text when they are UTF-8, else base64: ``{"text": ...}`` or ``{"base64": ...}``."""
    if data is None:
        return None
    try:
        return {"text": data.decode("utf-8")}
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(data).decode("ascii")}


def _cut(data: bytes | None, **extra: Any) -> dict[str, Any]:
    """What replaces a copied field that did not fit: its size and its sha256."""
    data = data or b""
    return {"cut": True, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), **extra}


def _headers_bytes(headers: Headers) -> bytes:
    return b"".join(
        k.encode("utf-8", "surrogateescape") + b"\0" + (v or b"") + b"\0" for k, v in headers
    )


def _header_field(key: str, value: bytes | None) -> dict[str, Any]:
    """One header as JSON; a key that is not UTF-8 (decoded with surrogateescape by the
    consumer) as ``key_base64``, so its exact bytes survive."""
    try:
        key.encode("utf-8")
        name: dict[str, str] = {"key": key}
    except UnicodeEncodeError:
        raw = key.encode("utf-8", "surrogateescape")
        name = {"key_base64": base64.b64encode(raw).decode("ascii")}
    return {**name, **(_bytes_field(value) or {})}


def _source_fields(src: Source, copy_envelope: bool) -> dict[str, Any]:
    if copy_envelope:
        key = _bytes_field(src.key)
        headers: Any = [_header_field(k, v) for k, v in src.headers]
    else:
        key = None if src.key is None else _cut(src.key)
        headers = _cut(_headers_bytes(src.headers), count=len(src.headers))
    return {
        "idempotency_key": src.idempotency_key,
        "key": key,
        "headers": headers,
        "source": {
            "topic": src.topic,
            "partition": src.partition,
            "offset": src.offset,
            "timestamp_ms": src.timestamp_ms,
        },
    }


def _dumps(record: dict[str, Any]) -> bytes:
    return orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY)


def _dumps_within(
    record: dict[str, Any], limit: int | None, originals: dict[str, bytes | None]
) -> bytes:
    """``record`` as JSON of at most ``limit`` bytes: the copies of the input (headers, key,
    the input itself) are replaced by :func:`_cut` markers, the largest first, until it fits;
    the LLM's answer, which exists nowhere else, is cut last. ``truncated`` lists what was cut.
    """
    data = _dumps(record)
    if limit is None or len(data) <= limit:
        return data
    cut: list[str] = []
    record["truncated"] = cut
    copies = [n for n in ("headers", "key", "input", "value") if n in originals and record.get(n)]
    sizes = {n: len(_dumps({"x": record[n]})) for n in copies}
    for name in sorted(copies, key=lambda n: -sizes[n]):  # the largest copy goes first
        copied = record[name]
        extra = {"count": len(copied)} if isinstance(copied, list) else {}
        record[name] = _cut(originals[name], **extra)
        cut.append(name)
        data = _dumps(record)
        if len(data) <= limit:
            return data
    response = record.get("response")
    if isinstance(response, dict) and isinstance(response.get("content"), str):
        content = response["content"].encode()
        keep = max(0, len(content) - (len(data) - limit) - 256)
        response["content"] = content[:keep].decode("utf-8", "ignore")
        response["content_cut"] = _cut(content)
        cut.append("response.content")
        data = _dumps(record)
    if len(data) > limit:
        raise RecordTooLarge(f"{len(data)} bytes after cutting {cut}; the limit is {limit}")
    return data


class RecordTooLarge(ValueError):
    """An outcome that cannot be cut to the limit (its decision alone is too large)."""


def outcome_record(
    src: Source,
    query: Query,
    *,
    decision: dict[str, Any],
    endpoint: str | None,
    llm_model: str | None,
    response: dict[str, Any] | None,
    timings_ms: dict[str, float],
    raw: bytes | None = None,
    limit: int | None = None,
) -> bytes:
    """The success record written to the responses topic, as JSON bytes of at most ``limit``
    bytes (``raw``, the input's bytes, is what a cut input's sha256 is taken of)."""
    record: dict[str, Any] = {
        "schema": OUTCOME_SCHEMA,
        "status": "ok",
        "id": query.id,
        **_source_fields(src, copy_envelope=True),
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
    originals = {"headers": _headers_bytes(src.headers), "key": src.key, "input": raw}
    return _dumps_within(record, limit, originals)


_REASON_CHARS = 2000


def dead_letter_record(
    src: Source,
    value: bytes | None,
    *,
    kind: str,
    reason: str,
    stage: Literal["parse", "handle", "llm", "publish"],
    query: Query | None = None,
    decision: dict[str, Any] | None = None,
    endpoint: str | None = None,
    attempts: int | None = None,
    limit: int | None = None,
    copy_envelope: bool = True,
) -> bytes:
    """The record written to the dead-letter topic, as JSON bytes of at most ``limit`` bytes.
    Keeps the original bytes when they fit (else their size and sha256)."""
    if len(reason) > _REASON_CHARS:
        reason = reason[:_REASON_CHARS] + "…"
    record: dict[str, Any] = {
        "schema": DEAD_LETTER_SCHEMA,
        "status": "error",
        "error": {"kind": kind, "reason": reason, "stage": stage, "attempts": attempts},
        "id": query.id if query else None,
        **_source_fields(src, copy_envelope),
        "value": _bytes_field(value),
        "route": decision["route"] if decision else None,
        "decision": decision,
        "endpoint": endpoint,
        "processed_at_ms": int(time.time() * 1000),
    }
    originals = {"headers": _headers_bytes(src.headers), "key": src.key, "value": value}
    return _dumps_within(record, limit, originals)


def parked_record(
    src: Source,
    raw: bytes | None,
    *,
    decision: dict[str, Any],
    route: str,
    endpoint: str,
    parked_at_ms: int,
    times: int,
) -> bytes:
    """A message parked on its endpoint's retry topic: everything needed to answer it later
    without encoding or deciding again (the original bytes, key, headers and coordinates)."""
    record = {
        "schema": PARKED_SCHEMA,
        "source": {
            "topic": src.topic,
            "partition": src.partition,
            "offset": src.offset,
            "timestamp_ms": src.timestamp_ms,
        },
        "key": None if src.key is None else base64.b64encode(src.key).decode("ascii"),
        "headers": [
            [
                base64.b64encode(k.encode("utf-8", "surrogateescape")).decode("ascii"),
                None if v is None else base64.b64encode(v).decode("ascii"),
            ]
            for k, v in src.headers
        ],
        "value": None if raw is None else base64.b64encode(raw).decode("ascii"),
        "decision": decision,
        "route": route,
        "endpoint": endpoint,
        "parked_at_ms": parked_at_ms,
        "times": times,
    }
    return _dumps(record)


@dataclass(frozen=True)
class Parked:
    """A parked message read back from a retry topic."""

    src: Source
    raw: bytes | None
    decision: dict[str, Any]
    route: str
    endpoint: str
    parked_at_ms: int
    times: int


def read_parked(value: bytes | None) -> Parked:
    """Parse a retry-topic record written by :func:`parked_record` (``ValueError`` if not)."""
    try:
        data = orjson.loads(value or b"")
        if data.get("schema") != PARKED_SCHEMA:
            raise ValueError(f"not a {PARKED_SCHEMA} record")
        source = data["source"]
        b64 = base64.b64decode
        headers = tuple(
            (b64(k).decode("utf-8", "surrogateescape"), None if v is None else b64(v))
            for k, v in data["headers"]
        )
        src = Source(
            source["topic"],
            int(source["partition"]),
            int(source["offset"]),
            source["timestamp_ms"],
            None if data["key"] is None else b64(data["key"]),
            headers,  # type: ignore[arg-type]
        )
        raw = None if data["value"] is None else b64(data["value"])
        return Parked(
            src,
            raw,
            data["decision"],
            str(data["route"]),
            str(data["endpoint"]),
            int(data["parked_at_ms"]),
            int(data["times"]),
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as err:
        raise ValueError(f"unreadable parked record: {err!r}") from err


def _side_record(
    schema: str,
    topic: str,
    src: Source,
    query: Query,
    fields: dict[str, Any],
    headers: list[tuple[str, bytes]],
    limit: int | None,
) -> OutRecord:
    """A record about a decision (review, shadow): the input's coordinates, id, key and text
    (cut first when the record is over ``limit``), then ``fields``. Keyed like the input, so
    a key's records stay in order; the input's headers are not copied."""
    record: dict[str, Any] = {
        "schema": schema,
        "id": query.id,
        "idempotency_key": src.idempotency_key,
        "key": _bytes_field(src.key),
        "source": _source_fields(src, copy_envelope=False)["source"],
        "input": query.text,
        **fields,
        "processed_at_ms": int(time.time() * 1000),
    }
    value = _dumps_within(record, limit, {"input": query.text.encode(), "key": src.key})
    return OutRecord(topic, value, src.key, headers, src.timestamp_ms)


def review_record(
    topic: str,
    src: Source,
    query: Query,
    *,
    decision: dict[str, Any],
    reasons: tuple[str, ...],
    limit: int | None = None,
) -> OutRecord:
    """A decision worth a human look: why (``reasons``) and its full explanation."""
    fields = {"reasons": list(reasons), "route": decision["route"], "decision": decision}
    headers = [("semroute-review", ",".join(reasons).encode())]
    return _side_record(REVIEW_SCHEMA, topic, src, query, fields, headers, limit)


def shadow_record(
    topic: str,
    src: Source,
    query: Query,
    *,
    live: dict[str, Any],
    candidate: dict[str, Any],
    limit: int | None = None,
) -> OutRecord:
    """A decision on which the candidate routes disagree with the live ones: both explained."""
    fields = {
        "live_route": live["route"],
        "candidate_route": candidate["route"],
        "live": live,
        "candidate": candidate,
    }
    headers = [("semroute-shadow", f"{live['route']}->{candidate['route']}".encode())]
    return _side_record(SHADOW_SCHEMA, topic, src, query, fields, headers, limit)
