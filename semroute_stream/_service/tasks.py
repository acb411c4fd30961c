"""The per-message tasks in flight, grouped by partition (a revoked partition's are cancelled)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from aiokafka import TopicPartition

from .records import Source

__all__ = ["PartitionTasks"]


class PartitionTasks:
    """The per-message tasks in flight, by partition (to cancel a revoked partition's)."""

    def __init__(self, on_done: Callable[[asyncio.Task[None], Source], None]) -> None:
        self._of: dict[TopicPartition, set[asyncio.Task[None]]] = {}
        self._on_done = on_done

    def spawn(self, coro: Coroutine[Any, Any, None], src: Source) -> None:
        task = asyncio.ensure_future(coro)
        tp = TopicPartition(src.topic, src.partition)
        self._of.setdefault(tp, set()).add(task)
        task.add_done_callback(lambda t: self._done(t, tp, src))

    def _done(self, task: asyncio.Task[None], tp: TopicPartition, src: Source) -> None:
        self._of.get(tp, set()).discard(task)
        self._on_done(task, src)

    def __bool__(self) -> bool:
        return any(self._of.values())

    async def cancel(self, tps: set[TopicPartition] | None = None) -> None:
        """Cancel the tasks of ``tps`` (of every partition when None) and wait for them."""
        if tps is None:
            tasks = [t for ts in self._of.values() for t in ts]
        else:
            tasks = [t for tp in tps for t in self._of.pop(tp, set())]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
