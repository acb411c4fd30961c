"""``semroute-stream publish``: send JSON lines (or lines of text) to the input topic.

For first runs and demos: every line is checked before anything is sent, then all are sent
through the router's own idempotent producer (``acks=all``) and counted once acknowledged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

import orjson
from aiokafka.errors import KafkaError

from .._errors import InputError
from .kafka import make_producer, start_client
from .settings import Settings

__all__ = ["Message", "parse_lines", "publish"]


@dataclass(frozen=True)
class Message:
    key: bytes | None
    value: bytes


def parse_lines(lines: Iterable[str], settings: Settings, *, text: bool) -> list[Message]:
    """One message per non-blank line. JSON lines must be objects; they are keyed by the
    input's ``id_field`` when it is present. Text lines become ``{text_field: line}``.
    Raises :class:`InputError` naming the first bad line."""
    inp = settings.input
    messages = []
    for number, line in enumerate(lines, 1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        if text:
            messages.append(Message(None, orjson.dumps({inp.text_field: line})))
            continue
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError as err:
            raise InputError("invalid_json", f"line {number}: {err}") from err
        if not isinstance(obj, dict):
            raise InputError("not_an_object", f"line {number}: a JSON object is expected")
        ident = obj.get(inp.id_field)
        key = None if ident is None else str(ident).encode()
        messages.append(Message(key, orjson.dumps(obj)))
    return messages


async def publish(
    settings: Settings, topic: str, messages: list[Message]
) -> tuple[int, str | None]:
    """Send ``messages`` to ``topic``; return how many the brokers acknowledged and the first
    error (None when every one was)."""
    producer = make_producer(settings)
    await start_client(producer, settings.kafka, "producer")
    sent: list[asyncio.Future[object]] = []
    refused: KafkaError | None = None
    try:
        try:
            for m in messages:
                sent.append(await producer.send(topic, m.value, key=m.key))
        except KafkaError as err:  # e.g. the topic's metadata never came: stop sending
            refused = err
        results = await asyncio.gather(*sent, return_exceptions=True)
    finally:
        await producer.stop()
    failures = [r for r in results if isinstance(r, BaseException)]
    first = failures[0] if failures else refused
    return len(results) - len(failures), None if first is None else f"{first!r}"
