"""Labelled data: JSONL, one ``{"text": "...", "label": "route name" | null}`` per line.

``null`` means the query belongs to no route, so the fallback is the right answer.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from .._errors import ConfigError
from .._routing.decision import RouteTable

__all__ = ["MAX_REPORTED_PROBLEMS", "Labelled", "label_indices", "load_labelled"]

MAX_REPORTED_PROBLEMS = 20


@dataclass(frozen=True)
class Labelled:
    """Texts and their labels (None: no route), in file order."""

    texts: list[str]
    labels: list[str | None]

    def __len__(self) -> int:
        return len(self.texts)


def load_labelled(path: str | Path, route_names: Collection[str] | None = None) -> Labelled:
    """Read labelled JSONL; with ``route_names``, a label naming no route is an error too.

    Raises ConfigError listing each bad line as ``FILE: line N: reason``.
    """
    source = str(path)
    known = set(route_names) if route_names is not None else None
    texts: list[str] = []
    labels: list[str | None] = []
    problems: list[str] = []
    try:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    text, label = _parse_labelled(raw, known)
                except ValueError as err:
                    problems.append(f"line {number}: {err}")
                    continue
                texts.append(text)
                labels.append(label)
    except OSError as err:
        raise ConfigError(f"cannot read labelled data: {err}", file=source) from None
    if problems:
        more = len(problems) - MAX_REPORTED_PROBLEMS
        shown = problems[:MAX_REPORTED_PROBLEMS] + ([f"... and {more} more"] if more > 0 else [])
        error = ConfigError("\n".join(f"{source}: {p}" for p in shown))
        error.file = source
        raise error
    return Labelled(texts, labels)


def _parse_labelled(raw: bytes, known: set[str] | None) -> tuple[str, str | None]:
    try:
        row = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        raise ValueError(f"invalid JSON: {err}") from None
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    text = row.get("text")
    if not isinstance(text, str):
        raise ValueError("'text' must be a string")
    if "label" not in row:
        raise ValueError("missing 'label' (use null for 'no route')")
    label = row["label"]
    if label is not None and not isinstance(label, str):
        raise ValueError("'label' must be a route name or null")
    if label is not None and known is not None and label not in known:
        raise ValueError(f"label {label!r} names no route")
    return text, label


def label_indices(table: RouteTable, labels: Sequence[str | None]) -> np.ndarray:
    """Labels as route indices, -1 for null. Raises ValueError for a label naming no route."""
    index = {name: i for i, name in enumerate(table.names)}
    unknown = sorted({label for label in labels if label is not None and label not in index})
    if unknown:
        raise ValueError(f"labels naming no route: {', '.join(map(repr, unknown[:10]))}")
    return np.array([-1 if label is None else index[label] for label in labels], dtype=np.intp)
