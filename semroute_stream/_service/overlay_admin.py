"""``semroute-stream overlay show|export|rollback``: the overlay topic read and managed offline.

* ``show``: the current version, the entries per label, the latest entries and the versions the
  topic's records reach, oldest first (what ``rollback`` can return to);
* ``export``: the routes file plus the overlay, as a routes file ``fit`` and ``eval`` accept;
* ``rollback VERSION``: write the tombstones and re-adds that turn the current content into
  that version's; every replica converges on it (and retrains) like on any overlay change.

Versions are enumerated by replaying the topic: each record that changes the content reaches a
version. Compaction removes superseded records, so only versions still reachable from the
retained records are listed (the current one always is).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiokafka import TopicPartition

from .._errors import SemrouteError
from .._routing.schema import load_routes, routes_version, save_routes
from .kafka import make_producer, start_client, topic_partitions
from .learning import composed_version, make_overlay_reader
from .overlay import EMPTY_VERSION, Overlay, as_json, diff, merge, replay_versions
from .settings import Settings

__all__ = ["export_overlay", "read_overlay", "rollback_overlay", "show_overlay"]

Record = tuple[int, bytes | None, bytes | None]


async def read_overlay(settings: Settings) -> list[Record]:
    """Every record of the overlay topic, as (offset, key, value), in order."""
    tp = TopicPartition(settings.overlay_topic, 0)
    if not await topic_partitions(settings, [tp.topic]):
        raise SemrouteError(f"overlay topic {tp.topic!r} not found (is learning enabled?)")
    reader = make_overlay_reader(settings)
    await start_client(reader, settings.kafka, "overlay reader")
    try:
        reader.assign([tp])
        await reader.seek_to_beginning(tp)
        end = (await reader.end_offsets([tp]))[tp]
        records: list[Record] = []
        while await reader.position(tp) < end:
            got = await reader.getmany(tp, timeout_ms=1000)
            records += [(r.offset, r.key, r.value) for r in got.get(tp, [])]
        return records
    finally:
        await reader.stop()


def _current(records: list[Record]) -> Overlay:
    overlay = Overlay()
    for _, key, value in records:
        overlay.apply(key, value)
    return overlay


async def show_overlay(settings: Settings, *, recent: int = 10) -> dict[str, Any]:
    """The overlay's version, counts, latest entries and reachable versions."""
    records = await read_overlay(settings)
    overlay = _current(records)
    latest: dict[bytes, int] = {key: off for off, key, _ in records if key is not None}
    newest = sorted(overlay.entries, key=lambda k: latest.get(k, -1), reverse=True)[:recent]
    base = load_routes(settings.routes)
    return {
        "topic": settings.overlay_topic,
        "version": overlay.version,
        "routes_version": composed_version(base, overlay.version),
        "entries": len(overlay.entries),
        "records": len(records),
        "ignored_records": overlay.ignored,
        "counts": overlay.counts(),
        "recent": [as_json(overlay.entries[k]) for k in newest],
        "versions": [
            {"offset": off, "version": v, "entries": len(content)}
            for off, v, content in replay_versions(records)
        ],
    }


async def export_overlay(settings: Settings, path: Path) -> dict[str, Any]:
    """Write the routes file plus the overlay to ``path`` (YAML, or JSON for ``.json``)."""
    overlay = _current(await read_overlay(settings))
    base = load_routes(settings.routes)
    routes, skipped = merge(base, overlay.entries.values())
    await asyncio.to_thread(save_routes, routes, path)
    return {
        "path": str(path),
        "version": overlay.version,
        "routes_version": composed_version(base, overlay.version),
        "exported_routes_version": routes_version(routes),
        "utterances": sum(len(r.utterances) for r in routes.routes),
        "skipped": len(skipped),
    }


async def rollback_overlay(settings: Settings, version: str) -> dict[str, Any]:
    """Write what turns the overlay's content into ``version``'s (``empty``: no entries)."""
    records = await read_overlay(settings)
    history = replay_versions(records)
    wanted = EMPTY_VERSION if version in ("empty", EMPTY_VERSION) else version
    found = [content for _, v, content in history if v == wanted]
    if not found:
        known = ", ".join(dict.fromkeys(v for _, v, _ in history))
        raise SemrouteError(f"overlay version {version!r} not found in the topic (known: {known})")
    current = _current(records)
    ops = diff(current.entries, found[-1])
    producer = make_producer(settings)
    await start_client(producer, settings.kafka, "producer")
    try:
        sends = [await producer.send(settings.overlay_topic, v, key=k, partition=0) for k, v in ops]
        await asyncio.gather(*sends)
    finally:
        await producer.stop()
    return {
        "from": current.version,
        "to": wanted,
        "tombstones": sum(v is None for _, v in ops),
        "re_added": sum(v is not None for _, v in ops),
    }
