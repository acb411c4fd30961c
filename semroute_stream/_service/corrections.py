"""The corrections topic: each correction checked, then written to the overlay (or dead-lettered).

A correction is a JSON object ``{"idempotency_key" or "id", "text", "label"}`` with ``label``
a route name, or null for "the fallback was right". :func:`read_correction` checks one record
(the input checks of :func:`~.._input.parse_input`, then the label against the routes in use);
:class:`CorrectionsIntake` consumes the topic in the group ``learning.group_id`` (each
correction reaches one replica), writes each accepted one to the overlay topic and each rejected
one to the dead-letter topic, and commits the corrections' offsets only once every one of those
writes is acknowledged (at-least-once: a correction written twice writes the same entry twice).

A rejected correction's dead letter is the main service's (:meth:`.worker.Worker.rejected`):
bounded by the dead-letter topic's record limit, and replaced by a minimal dead letter when the
broker still refuses it, so one record never stops the intake.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from .._errors import InputError
from .._input import parse_input
from .delivery import RECORD_ERRORS
from .intake import check_source
from .observe import Metrics
from .overlay import Entry, Overlay, entry_key, next_entry
from .records import Outcome, OutRecord, Source, coords
from .settings import Settings
from .worker import Worker

__all__ = ["CorrectionsIntake", "read_correction"]

log = logging.getLogger("semroute_stream")

_POLL_MS = 500


def read_correction(
    settings: Settings, src: Source, value: bytes | None, labels: Collection[str]
) -> Entry:
    """One correction record as an overlay :class:`Entry` (before the contradiction rule), or
    :class:`InputError`: the input checks (key and headers, null, size, UTF-8, JSON object, a
    non-empty ``text`` of at most ``learning.max_text_chars``), then the label (null or one of
    ``labels``)."""
    inp = settings.input
    check_source(inp, src)
    query = parse_input(
        value,
        format="json",
        text_field="text",
        id_field="id",
        max_bytes=inp.max_message_bytes,
        max_chars=settings.learning.max_text_chars,
        max_depth=inp.max_json_depth,
    )
    payload = query.payload
    if "label" not in payload:
        raise InputError("invalid_label", "no 'label' field (a route name, or null)")
    label = payload["label"]
    if label is not None and not isinstance(label, str):
        kind = type(label).__name__
        raise InputError("invalid_label", f"'label' is {kind}, not a string or null")
    if label is not None and label not in labels:
        raise InputError("unknown_route", f"label {label[:200]!r} is not a route")
    ident = payload.get("idempotency_key")
    ident = str(ident) if isinstance(ident, str | int) else query.id
    return Entry(
        text=query.text,
        label=label,
        id=ident or src.idempotency_key,
        ts_ms=src.timestamp_ms if src.timestamp_ms is not None else int(time.time() * 1000),
        source=src.idempotency_key,
    )


class CorrectionsIntake:
    """Consumes the corrections topic; writes entries to the overlay, rejects to the DLQ.

    ``overlay`` is the replica's view of the overlay (for the contradiction rule's flip count);
    ``labels()`` the route names in use; ``worker`` makes the dead letters (the main service's,
    bounded by the dead-letter topic's record limit)."""

    def __init__(
        self,
        settings: Settings,
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
        overlay: Callable[[], Overlay],
        labels: Callable[[], Collection[str]],
        metrics: Metrics,
        worker: Worker,
    ) -> None:
        self.settings = settings
        self._consumer = consumer
        self._producer = producer
        self._overlay = overlay
        self._labels = labels
        self._metrics = metrics
        self._worker = worker
        self.accepted = 0
        self.rejected = 0

    async def run(self) -> None:
        """Consume until cancelled; every batch is written, then its offsets committed (a
        batch cut short by the cancellation is read again by the next owner)."""
        self._consumer.subscribe([self.settings.corrections_topic])
        while True:
            got = await self._consumer.getmany(timeout_ms=_POLL_MS)
            records = [r for recs in got.values() for r in recs]
            if records:
                await self.handle(records)
                await self._consumer.commit()

    async def handle(self, records: list[Any]) -> None:
        """Write the batch's entries and dead letters; return when all are acknowledged."""
        labels = self._labels()
        view = self._overlay()
        received = time.time()
        pending: dict[bytes, Entry] = {}  # this batch's entries: the latest per text
        sends: list[Awaitable[Any]] = []
        for rec in records:
            src = Source.of(rec)
            value: bytes | None = getattr(rec, "value", None)
            try:
                entry = self._entry(src, value, labels, pending, view)
            except InputError as err:
                outcome = self._worker.rejected(src, value, err, received)
                sends.append(self._dead_letter(outcome))
                continue
            except Exception as err:  # a bug or a hostile record costs one dead letter
                sends.append(self._dead_letter(self._failed(src, value, err, received)))
                continue
            key = entry_key(entry.text)
            pending[key] = entry
            sends.append(
                await self._producer.send(self.settings.overlay_topic, entry.to_bytes(), key=key)
            )
            self.accepted += 1
            self._metrics.corrections.labels("accepted").inc()
        await asyncio.gather(*sends)

    def _entry(
        self,
        src: Source,
        value: bytes | None,
        labels: Collection[str],
        pending: dict[bytes, Entry],
        view: Overlay,
    ) -> Entry:
        """The entry to write for one correction (after the contradiction rule)."""
        learning = self.settings.learning
        entry = read_correction(self.settings, src, value, labels)
        key = entry_key(entry.text)
        current = pending.get(key) or view.entries.get(key)
        entry = next_entry(
            current,
            entry,
            flip_limit=learning.flip_limit,
            flip_window_ms=int(learning.flip_window_s * 1000),
        )
        if entry.quarantined and not (current and current.quarantined):
            log.warning("correction quarantined: text flip-flops", extra=coords(src))
        return entry

    def _failed(self, src: Source, value: bytes | None, err: Exception, received: float) -> Outcome:
        log.error("correction %s failed: %r", src.idempotency_key, err, exc_info=err)
        internal = InputError("internal_error", repr(err))
        return self._worker.rejected(src, value, internal, received)

    async def _dead_letter(self, outcome: Outcome) -> None:
        """Write ``outcome``; one the broker refuses as a record becomes a minimal dead letter
        (its coordinates only). Even that refused: raised (the dead-letter topic is broken)."""
        try:
            await self._send(outcome.record())
        except RECORD_ERRORS as err:
            outcome = self._worker.unpublishable(outcome, err)
            await self._send(outcome.record())
        self.rejected += 1
        self._metrics.corrections.labels("dead_lettered").inc()
        self._metrics.dead_letters.labels(outcome.kind or "").inc()

    async def _send(self, record: OutRecord) -> None:
        sent = await self._producer.send(
            record.topic,
            record.value,
            key=record.key,
            headers=record.headers,
            timestamp_ms=record.timestamp_ms,
        )
        await sent
