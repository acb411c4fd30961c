"""Helpers for the operations tests: HTTP GETs on the service's port, waiting for a condition."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families


async def http_get(port: int, path: str, host: str = "127.0.0.1") -> tuple[int, str]:
    """One ``GET`` on the service's HTTP server: (status, body)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        await writer.drain()
        raw = await reader.read()
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body.decode()


async def wait_until(cond: Callable[[], Any], timeout: float = 60.0, every: float = 0.05) -> Any:
    """Poll ``cond`` (sync or async) until it returns something truthy; fail after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = cond()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {cond}")
        await asyncio.sleep(every)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text -> {(sample name, sorted labels): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return found[(name, tuple(sorted(labels.items())))]
