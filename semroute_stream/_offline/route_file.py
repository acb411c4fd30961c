"""Offline file mode: route a JSONL file of queries (e.g. reprocessing logs) in batches.

Streams through the input: reads ``batch_size`` good lines, routes them, writes them, and
goes on, so memory stays flat whatever the file size. Every input line ends up in exactly
one place: the output (one line per good input line, in input order) or the rejects file
(line number, error kind, reason and the raw line) -- nothing is dropped silently.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import orjson
from tqdm import tqdm

from .._errors import InputError
from .._input import parse_input
from .._routing.router import Router

__all__ = ["OfflineSummary", "default_rejects_path", "route_file"]

MAX_LINE_BYTES = 64 * 1024
MAX_TEXT_CHARS = 8_000


@dataclass
class OfflineSummary:
    lines: int = 0
    routed: int = 0
    rejected: int = 0
    per_route: Counter[str] = field(default_factory=Counter)
    rejects_by_kind: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "lines": self.lines,
            "routed": self.routed,
            "rejected": self.rejected,
            "per_route": dict(self.per_route.most_common()),
            "rejects_by_kind": dict(self.rejects_by_kind.most_common()),
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class _Good:
    line: int
    id: str | None
    text: str


def default_rejects_path(output: str | Path) -> Path:
    """``out/x.jsonl`` -> ``out/x.rejects.jsonl``."""
    output = Path(output)
    stem = output.name.removesuffix(".jsonl") if output.name.endswith(".jsonl") else output.name
    return output.with_name(f"{stem}.rejects.jsonl")


def _lines(f: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    for number, raw in enumerate(f, start=1):
        yield number, raw.rstrip(b"\r\n") if raw.endswith(b"\n") else raw


def _write_reject(
    rejects: IO[bytes], summary: OfflineSummary, number: int, raw: bytes, err: InputError
) -> None:
    """One bad line into the rejects file, counted by kind."""
    summary.rejected += 1
    summary.rejects_by_kind[err.kind] += 1
    reject = {
        "line": number,
        "kind": err.kind,
        "reason": err.reason,
        "raw": raw.decode("utf-8", errors="replace"),
    }
    rejects.write(orjson.dumps(reject) + b"\n")


def route_file(
    router: Router,
    input_path: str | Path,
    output_path: str | Path,
    rejects_path: str | Path | None = None,
    *,
    batch_size: int = 256,
    text_field: str = "text",
    id_field: str = "id",
    format: Literal["json", "text"] = "json",
    max_line_bytes: int = MAX_LINE_BYTES,
    max_text_chars: int = MAX_TEXT_CHARS,
    progress: bool = False,
    on_reject: Callable[[int, InputError], None] | None = None,
) -> OfflineSummary:
    """Route every line of ``input_path`` into ``output_path``; bad lines go to ``rejects_path``
    (default ``OUTPUT.rejects.jsonl``, always created). ``format="text"``: each line is the
    query's text (no id). ``on_reject(line, error)`` is called for each bad line (the CLI prints
    it). The outputs' directories must exist: none is created (a typo must not make folders)."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    output_path = Path(output_path)
    rejects_path = Path(rejects_path) if rejects_path else default_rejects_path(output_path)
    for path in (output_path, rejects_path):
        if not path.parent.is_dir():
            raise FileNotFoundError(f"{path}: its directory {path.parent} does not exist")
    summary = OfflineSummary()
    started = time.perf_counter()
    total = os.path.getsize(input_path)
    with (
        open(input_path, "rb") as src,
        open(output_path, "wb") as out,
        open(rejects_path, "wb") as rejects,
        tqdm(total=total, unit="B", unit_scale=True, disable=not progress, leave=False) as bar,
    ):
        batch: list[_Good] = []

        def flush() -> None:
            for good, decision in zip(batch, router.route([g.text for g in batch]), strict=True):
                record: dict[str, Any] = {"line": good.line}
                if good.id is not None:
                    record["id"] = good.id
                record["text"] = good.text
                record.update(decision)
                out.write(orjson.dumps(record) + b"\n")
                summary.per_route[decision["route"]] += 1
            summary.routed += len(batch)
            batch.clear()

        for number, raw in _lines(src):
            summary.lines += 1
            bar.update(len(raw) + 1)
            try:
                query = parse_input(
                    raw,
                    format=format,
                    text_field=text_field,
                    id_field=id_field,
                    max_bytes=max_line_bytes,
                    max_chars=max_text_chars,
                )
            except InputError as err:
                _write_reject(rejects, summary, number, raw, err)
                if on_reject is not None:
                    on_reject(number, err)
                continue
            batch.append(_Good(number, query.id, query.text))
            if len(batch) >= batch_size:
                flush()
        if batch:
            flush()
    summary.seconds = time.perf_counter() - started
    return summary
