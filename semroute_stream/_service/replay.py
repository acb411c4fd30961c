"""``semroute-stream replay``: reprocess a bounded range of the input topic with the live code.

What it does, and the choices made:

* **Range.** From the beginning, an offset, or a timestamp (the first offset whose record
  timestamp is at or after it, per partition), to the end offsets read when it starts: records
  produced later are left alone, so a replay always ends.
* **Assignment and group.** The partitions are assigned manually (no group membership: no
  rebalance with the live service, which keeps running). Progress is committed to a consumer
  group of the replay's own, ``<input.group_id>.replay.<UTC time>``, never to the live group.
* **Same code.** It runs :class:`~.pipeline.Pipeline` itself (parse, encode,
  decide, LLM call, outcome and dead-letter records), with the routes file as it is now.
* **Outputs.** The configured topics (outcome records keep their ``idempotency_key``, so a
  consumer deduplicating by it drops them: point the outputs elsewhere with
  ``SEMROUTE_OUTPUT__*`` if that matters), or one JSONL file of outcome and dead-letter records
  (in completion order: sort by ``source`` if needed).
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .._errors import ConfigError
from .app import open_service, signal_handlers
from .kafka import topic_partitions
from .observe import RunStats
from .records import OutRecord
from .settings import Settings

__all__ = [
    "JsonlSink",
    "ReplayStart",
    "parse_partitions",
    "parse_timestamp",
    "plan",
    "run_replay",
]

log = logging.getLogger("semroute_stream")


@dataclass(frozen=True)
class ReplayStart:
    """Where each partition's replay starts: exactly one of the three."""

    beginning: bool = False
    offset: int | None = None
    timestamp_ms: int | None = None


def parse_timestamp(text: str) -> int:
    """Epoch milliseconds from ``1764000000000`` or ISO 8601 (no zone: UTC)."""
    if re.fullmatch(r"\d+", text):
        return int(text)
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(
            f"--from-timestamp {text!r}: expected epoch milliseconds or ISO 8601 "
            "(e.g. 2025-11-24T16:00:00Z)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


def parse_partitions(text: str) -> list[int]:
    """``"0,1,4-7"`` -> ``[0, 1, 4, 5, 6, 7]``."""
    found: set[int] = set()
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise ConfigError(f"--partitions {text!r}: expected numbers and ranges like 0,1,4-7")
        low, high = int(m.group(1)), int(m.group(2) or m.group(1))
        found.update(range(low, high + 1))
    return sorted(found)


async def plan(
    settings: Settings,
    consumer: AIOKafkaConsumer,
    start: ReplayStart,
    partitions: list[int] | None,
) -> dict[TopicPartition, tuple[int, int]]:
    """``{partition: (start offset, end offset)}``, leaving out partitions with nothing to do."""
    topic = settings.input.topic
    existing = (await topic_partitions(settings, [topic])).get(topic)
    if not existing:
        raise ConfigError(f"input topic {topic!r} does not exist on the broker")
    wanted = sorted(existing) if partitions is None else partitions
    missing = sorted(set(wanted) - existing)
    if missing:
        raise ConfigError(f"topic {topic!r} has no partition {missing} (it has {len(existing)})")
    tps = [TopicPartition(topic, p) for p in wanted]
    ends = await consumer.end_offsets(tps)
    if start.timestamp_ms is not None:
        found = await consumer.offsets_for_times({tp: start.timestamp_ms for tp in tps})
        starts = {tp: (found[tp].offset if found.get(tp) else ends[tp]) for tp in tps}
    else:
        begins = await consumer.beginning_offsets(tps)
        if start.offset is not None:
            starts = {tp: min(max(start.offset, begins[tp]), ends[tp]) for tp in tps}
        else:
            starts = dict(begins)
    return {tp: (starts[tp], ends[tp]) for tp in tps if starts[tp] < ends[tp]}


class JsonlSink:
    """Outcome and dead-letter records as JSON lines in one file (replaces the producer)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[bytes] = open(self.path, "wb")  # noqa: SIM115 - closed by close()

    async def __call__(self, record: OutRecord) -> None:
        self._file.write(record.value + b"\n")

    def close(self) -> None:
        self._file.close()


async def run_replay(
    settings: Settings,
    start: ReplayStart,
    *,
    partitions: list[int] | None = None,
    output: str | Path | None = None,
    progress: bool | None = None,
    handle_signals: bool = True,
    llm_transport: Any = None,
) -> RunStats:
    """Replay the input topic's range once; see the module docstring.

    ``progress``: a tqdm bar with rate and ETA on stderr (default: when stderr is a terminal).
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    group = f"{settings.input.group_id}.replay.{stamp}"
    sink = JsonlSink(output) if output is not None else None
    show = sys.stderr.isatty() if progress is None else progress
    try:
        async with open_service(
            settings, group_id=group, sink=sink, serve_http=False, llm_transport=llm_transport
        ) as pipeline:
            ranges = await plan(settings, pipeline.consumer, start, partitions)
            total = sum(end - begin for begin, end in ranges.values())
            log.info(
                "replay: %d offsets in %d partitions of %s (group %s, routes version %s) -> %s",
                total,
                len(ranges),
                settings.input.topic,
                group,
                pipeline.router.version,
                output or "the configured topics",
            )
            quiet_logs = logging_redirect_tqdm() if show else contextlib.nullcontext()
            with quiet_logs, tqdm(total=total, unit="msg", desc="replay", disable=not show) as bar:

                def on_progress(covered: int) -> None:
                    bar.update(covered - bar.n)

                if not handle_signals:
                    return await pipeline.replay(ranges, on_progress)
                with signal_handlers(pipeline):
                    return await pipeline.replay(ranges, on_progress)
    finally:
        if sink is not None:
            sink.close()
