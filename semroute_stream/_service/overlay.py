"""The overlay: corrections accepted as utterances, kept apart from the routes file (pure logic).

The overlay lives on a compacted, single-partition Kafka topic (see :mod:`.learning`): one record
per *normalised text*, key ``t:<sha256 of the normalised text, 32 hex>``, value the JSON of an
:class:`Entry`; a tombstone (value null) removes the text from the overlay. Compaction keeps the
latest record per key, so the content every replica reaches by replaying the topic is the same,
and :attr:`Overlay.version` is a hash of that content alone (not of the replay's history).

Contradictions: the latest correction of a text (the last one written to the overlay topic)
wins. A text whose label flips more than ``flip_limit`` times within ``flip_window_ms`` is
*quarantined*: kept in the overlay, but neither added to a route nor removed from one, until a
correction after the window starts its count again. Label null means "the fallback was
right": the text is removed from every route (it becomes a fallback example).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import orjson

from .._routing.schema import RoutesConfig

__all__ = [
    "EMPTY_VERSION",
    "Entry",
    "Overlay",
    "as_json",
    "content_version",
    "diff",
    "entry_key",
    "merge",
    "next_entry",
    "normalise",
    "parse_entry",
    "replay_versions",
]

EMPTY_VERSION = "0" * 12
"""The version of an empty overlay."""

_SPACES = re.compile(r"\s+")


def normalise(text: str) -> str:
    """What makes two corrections "the same text": NFKC, case-folded, whitespace collapsed."""
    return _SPACES.sub(" ", unicodedata.normalize("NFKC", text)).strip().casefold()


def entry_key(text: str) -> bytes:
    """The overlay record key of ``text``."""
    return b"t:" + hashlib.sha256(normalise(text).encode("utf-8")).hexdigest()[:32].encode()


@dataclass(frozen=True)
class Entry:
    """One text's latest correction: ``label`` a route name, or None (the fallback was right)."""

    text: str
    label: str | None
    id: str  # the correction's idempotency key
    ts_ms: int  # the correction record's timestamp
    source: str  # topic/partition/offset of the correction
    flips: int = 0  # label changes within the current window
    since_ms: int = 0  # start of the current flip window
    quarantined: bool = False

    def to_bytes(self) -> bytes:
        return orjson.dumps(asdict(self), option=orjson.OPT_SORT_KEYS)


def parse_entry(value: bytes) -> Entry | None:
    """An overlay record's value as an :class:`Entry`, or None when it is not one (a record
    written by something else never corrupts the overlay: it is ignored)."""
    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    try:
        entry = Entry(
            text=data["text"],
            label=data["label"],
            id=data["id"],
            ts_ms=data["ts_ms"],
            source=data["source"],
            flips=data.get("flips", 0),
            since_ms=data.get("since_ms", 0),
            quarantined=data.get("quarantined", False),
        )
    except (KeyError, TypeError):
        return None
    ok = (
        isinstance(entry.text, str)
        and normalise(entry.text) != ""
        and (entry.label is None or (isinstance(entry.label, str) and entry.label != ""))
        and isinstance(entry.id, str)
        and isinstance(entry.source, str)
        and all(type(v) is int for v in (entry.ts_ms, entry.flips, entry.since_ms))
        and type(entry.quarantined) is bool
    )
    return entry if ok else None


def next_entry(current: Entry | None, new: Entry, *, flip_limit: int, flip_window_ms: int) -> Entry:
    """The entry to write for correction ``new`` of a text whose entry is ``current``.

    The same label again keeps the flip count; another label counts a flip, within the window
    that started at the current entry's ``since_ms`` (a correction past the window starts a new
    window with no flips). More than ``flip_limit`` flips in one window quarantines the text.
    """
    if current is None or new.ts_ms - current.since_ms > flip_window_ms:
        return replace(new, flips=0, since_ms=new.ts_ms, quarantined=False)
    flips = current.flips + (new.label != current.label)
    return replace(
        new,
        flips=flips,
        since_ms=current.since_ms,
        quarantined=current.quarantined or flips > flip_limit,
    )


class Overlay:
    """The overlay's content: text key → :class:`Entry`, built by applying the topic's records
    in order (:meth:`apply`)."""

    def __init__(self, entries: Mapping[bytes, Entry] | None = None) -> None:
        self.entries: dict[bytes, Entry] = dict(entries or {})
        self.ignored = 0  # records that were not overlay records (bad key or value)

    def apply(self, key: bytes | None, value: bytes | None) -> bool:
        """Apply one record of the overlay topic; whether the content changed."""
        if key is None or not key.startswith(b"t:"):
            self.ignored += 1
            return False
        if value is None:
            return self.entries.pop(key, None) is not None
        entry = parse_entry(value)
        if entry is None or entry_key(entry.text) != key:
            self.ignored += 1
            return False
        if self.entries.get(key) == entry:
            return False
        self.entries[key] = entry
        return True

    def get(self, text: str) -> Entry | None:
        return self.entries.get(entry_key(text))

    @property
    def version(self) -> str:
        """A hash of the content (12 hex chars): replicas with the same content agree on it."""
        return content_version(self.entries)

    def counts(self) -> dict[str, int]:
        """Entries per label (``null`` for fallback examples, ``quarantined`` apart)."""
        out: dict[str, int] = {}
        for entry in self.entries.values():
            name = "quarantined" if entry.quarantined else (entry.label or "null")
            out[name] = out.get(name, 0) + 1
        return dict(sorted(out.items()))

    def copy(self) -> Overlay:
        return Overlay(self.entries)


def content_version(entries: Mapping[bytes, Entry]) -> str:
    if not entries:
        return EMPTY_VERSION
    canonical = [
        [key.decode(), e.text, e.label, e.quarantined] for key, e in sorted(entries.items())
    ]
    return hashlib.sha256(orjson.dumps(canonical)).hexdigest()[:12]


def merge(base: RoutesConfig, entries: Iterable[Entry]) -> tuple[RoutesConfig, list[Entry]]:
    """The base routes with the overlay applied, and the entries left out (a label the base
    routes do not have, e.g. after a reload removed the route).

    Each overlay text (not quarantined) is first removed from every route of the base (a route
    keeps at least one utterance), then added to its label's route (label null: to none).
    Texts are added in the order of their keys, so the result depends on the content only."""
    names = set(base.names)
    live = sorted((e for e in entries if not e.quarantined), key=lambda e: entry_key(e.text))
    skipped = [e for e in live if e.label is not None and e.label not in names]
    live = [e for e in live if e.label is None or e.label in names]
    if not live:
        return base, skipped
    overridden = {normalise(e.text) for e in live}
    added: dict[str, list[str]] = {}
    for e in live:
        if e.label is not None:
            added.setdefault(e.label, []).append(e.text)
    routes = []
    for route in base.routes:
        kept = [u for u in route.utterances if normalise(u) not in overridden]
        utterances = (kept or route.utterances[:1]) if not added.get(route.name) else kept
        routes.append(
            route.model_copy(update={"utterances": utterances + added.get(route.name, [])})
        )
    return base.model_copy(update={"routes": routes}), skipped


def diff(
    current: Mapping[bytes, Entry], target: Mapping[bytes, Entry]
) -> list[tuple[bytes, bytes | None]]:
    """The records that turn ``current`` into ``target``: re-adds and tombstones, by key."""
    out: list[tuple[bytes, bytes | None]] = []
    for key in sorted(set(current) | set(target)):
        want = target.get(key)
        if want is None:
            out.append((key, None))
        elif current.get(key) != want:
            out.append((key, want.to_bytes()))
    return out


def replay_versions(
    records: Iterable[tuple[int, bytes | None, bytes | None]],
) -> list[tuple[int, str, dict[bytes, Entry]]]:
    """Replay ``(offset, key, value)`` records: every distinct content reached, as (the offset
    that reached it, its version, the content), oldest first. These are the versions a
    rollback can return to (compaction may have removed the records of older ones)."""
    overlay = Overlay()
    history: list[tuple[int, str, dict[bytes, Entry]]] = [(-1, EMPTY_VERSION, {})]
    for offset, key, value in records:
        if overlay.apply(key, value):
            history.append((offset, overlay.version, dict(overlay.entries)))
    return history


def as_json(entry: Entry) -> dict[str, Any]:
    return asdict(entry)
