"""Learning from corrections: the overlay topic tailed, the head retrained in the background,
the result swapped in between batches like a hot reload.

Every replica reads the whole overlay topic (manual assignment, no group) at start-up, before
its first batch, and then tails it: :class:`Learner` keeps the :class:`~.overlay.Overlay` read so
far. A change wakes the retrain task, which waits ``learning.retrain_debounce_s`` (more
corrections come in bursts) and at least ``learning.retrain_min_interval_s`` since the last
retrain, builds the router of the routes file plus the overlay in a worker thread (the encoder
is thread-safe; only texts it has not embedded before are encoded), asks the guard
(:mod:`.guard`), and swaps it in under :attr:`LiveRoutes.lock` -- the routing loop never waits
for a retrain, only for the swap's assignment. The live routes version is
``<routes file version>+<overlay version>`` (the file's alone while the overlay is empty).
The head is trained in a process of its own (``learning.retrain_process``), which dies with the
router however the router dies (:func:`_die_with_parent`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from .._routing.router import (
    Resolution,
    Router,
    TextEncoder,
    head_texts,
    resolve_routes,
    utterances_of,
)
from .._routing.schema import RoutesConfig, routes_version
from .guard import judge
from .kafka import connection_kwargs
from .observe import Metrics
from .overlay import EMPTY_VERSION, Entry, Overlay, content_version, merge
from .reload import LiveRoutes
from .settings import Settings

__all__ = ["CachingEncoder", "Learner", "composed_version", "make_overlay_reader"]

log = logging.getLogger("semroute_stream")

_POLL_MS = 500
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def composed_version(base: RoutesConfig, overlay: str) -> str:
    """The live routes version: the file's, plus ``+<overlay version>`` when there is one."""
    version = routes_version(base)
    return version if overlay == EMPTY_VERSION else f"{version}+{overlay}"


def make_overlay_reader(settings: Settings) -> AIOKafkaConsumer:
    """A consumer for the overlay topic: no group, every replica reads all of it."""
    return AIOKafkaConsumer(
        **connection_kwargs(settings.kafka),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )


def _train(*args: Any, **kwargs: Any) -> Resolution:
    """``resolve_routes`` in the training process, with one BLAS thread."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        return resolve_routes(*args, **kwargs)


def _start_trainer(nice: int) -> None:
    """The training process's initializer: it dies with the router, then takes ``nice``."""
    _die_with_parent()
    os.nice(nice)


def _die_with_parent() -> None:
    """End this (spawned) process when its parent process dies, however it dies (SIGKILL, the
    OOM killer): otherwise it, and multiprocessing's resource tracker, which exits once its
    last client is gone, would run on under PID 1.

    Two guards: on Linux the kernel sends SIGKILL at once (``prctl(PR_SET_PDEATHSIG)``: when the
    thread that spawned this process exits; that is the event loop's, which lives as long as
    the router); everywhere a daemon thread waits on the parent's sentinel, the pipe
    multiprocessing holds open to this process, which reads EOF when the parent dies -- also
    when it died before the prctl, and while C code holds this process's GIL it waits."""
    parent = multiprocessing.parent_process()
    if parent is None:  # not a multiprocessing child
        return
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG): errno %d", ctypes.get_errno())
    if os.getppid() != parent.pid:  # the parent died before the prctl
        os._exit(1)

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="semroute-parent-watch", daemon=True).start()


def _warm_up() -> int:
    """Imports this module (and numpy) in the training process, ahead of the first retrain."""
    return os.getpid()


class CachingEncoder:
    """An encoder that remembers the utterances' embeddings between retrains (thread-safe)."""

    def __init__(self, encoder: TextEncoder) -> None:
        self.encoder = encoder
        self._cache: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    @property
    def model_name(self) -> str:
        return self.encoder.model_name

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def seed(self, router: Router) -> None:
        """Remember the embeddings ``router`` already has (its utterances and route names)."""
        texts = utterances_of(router.routes)
        pairs = list(zip(texts, router.utterance_embeddings, strict=True))
        if router.name_embeddings is not None:
            names = head_texts(router.routes)
            pairs += list(zip(names, router.name_embeddings, strict=True))
        with self._lock:
            self._cache.update(pairs)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        with self._lock:
            cache = dict(self._cache)
        missing = [t for t in dict.fromkeys(texts) if t not in cache]
        if missing:
            cache.update(zip(missing, np.asarray(self.encoder.encode(missing)), strict=True))
        with self._lock:  # keep what this call used: the utterances of the latest routes
            self._cache = {t: cache[t] for t in texts}
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([cache[t] for t in texts]).astype(np.float32, copy=False)


@dataclass
class Status:
    """What ``/status`` and the log say about learning."""

    read: str = EMPTY_VERSION  # the overlay version read from the topic
    live: str = EMPTY_VERSION  # the overlay version in the live routes
    entries: int = 0
    held_back: str | None = None  # the version held back by the guard, with its reason
    last_retrain_s: float | None = None
    retrains: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Learner:
    """The overlay read from its topic, the retrain task, and the routes composer."""

    def __init__(self, settings: Settings, live: LiveRoutes, metrics: Metrics) -> None:
        self.settings = settings
        self.live = live
        self.overlay = Overlay()
        self.status = Status()
        self.retrained = asyncio.Event()  # set after each retrain (tests and benchmarks)
        self._metrics = metrics
        self._changed = asyncio.Event()
        self._encoder = CachingEncoder(live.router.encoder)
        self._encoder.seed(live.router)  # the first retrain encodes only the new texts
        self._topic = TopicPartition(settings.overlay_topic, 0)
        self._trainer: ProcessPoolExecutor | None = None
        live.composer = self  # a routes file reload merges the overlay too

    # ---- composing the live router ---------------------------------------------------------

    def prepare(self, base: RoutesConfig, current: Router) -> tuple[str, Callable[[], Router]]:
        """The version of ``base`` plus the overlay as read now, and a builder for its router."""
        entries = list(self.overlay.entries.values())
        version = content_version(self.overlay.entries)
        return composed_version(base, version), lambda: self.build(base, entries, version)

    def build(self, base: RoutesConfig, entries: list[Entry], overlay_version: str) -> Router:
        """The router of ``base`` plus ``entries`` (in a worker thread)."""
        routes, skipped = merge(base, entries)
        if skipped:
            log.warning("overlay: %d entries name routes the routes file lacks", len(skipped))
        encoder = self.live.router.encoder
        if overlay_version == EMPTY_VERSION:
            router = Router(routes, encoder)
        else:  # heads of overlay versions are not cached on disk: there would be one per version
            resolve = self._resolve if self.settings.learning.retrain_process else resolve_routes
            router = Router(routes, self._encoder, cache=False, resolve=resolve)
            router.encoder = encoder
        router.version = composed_version(base, overlay_version)
        return router

    def _resolve(self, *args: Any, **kwargs: Any) -> Resolution:
        """``resolve_routes`` (training, cross-validation) in the training process: its CPU
        time never holds this process's GIL, and its lower priority yields to the routing."""
        return self._training_process().submit(_train, *args, **kwargs).result()

    def _training_process(self) -> ProcessPoolExecutor:
        """The training process, started at its nice level before it imports anything."""
        if self._trainer is None:
            self._trainer = ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_trainer,
                initargs=(self.settings.learning.retrain_nice,),
            )
            self._trainer.submit(_warm_up)
        return self._trainer

    def close(self) -> None:
        """Stop the training process (a retrain in it is abandoned)."""
        trainer, self._trainer = self._trainer, None
        if trainer is None:
            return
        processes = getattr(trainer, "_processes", None) or {}
        for process in list(processes.values()):
            process.terminate()
        trainer.shutdown(wait=True, cancel_futures=True)

    # ---- reading the overlay topic ---------------------------------------------------------

    async def load(self, reader: AIOKafkaConsumer) -> None:
        """Read the overlay topic from its beginning to its current end (start-up)."""
        reader.assign([self._topic])
        await reader.seek_to_beginning(self._topic)
        end = (await reader.end_offsets([self._topic]))[self._topic]
        while await reader.position(self._topic) < end:
            await self._read(reader)
        self._metrics.overlay.info({"read": self.overlay.version, "live": self.status.live})
        log.info(
            "overlay %s read: %d entries (%s)",
            self.overlay.version,
            len(self.overlay.entries),
            self.settings.overlay_topic,
        )

    async def _read(self, reader: AIOKafkaConsumer) -> bool:
        got = await reader.getmany(self._topic, timeout_ms=_POLL_MS)
        changed = False
        for rec in got.get(self._topic, []):
            changed = self.overlay.apply(rec.key, rec.value) or changed
        if changed:
            self.status.read = self.overlay.version
            self.status.entries = len(self.overlay.entries)
        return changed

    async def tail(self, reader: AIOKafkaConsumer) -> None:
        """Apply the overlay topic's new records as they come; wake the retrain task."""
        while True:
            if await self._read(reader):
                self._metrics.overlay.info({"read": self.overlay.version, "live": self.status.live})
                self._changed.set()

    # ---- retraining ------------------------------------------------------------------------

    async def retrain_loop(self) -> None:
        """Retrain whenever the overlay changed (debounced, rate-limited); never raises."""
        learning = self.settings.learning
        last = -float("inf")
        while True:
            await self._changed.wait()
            await asyncio.sleep(learning.retrain_debounce_s)
            await asyncio.sleep(max(0.0, last + learning.retrain_min_interval_s - time.monotonic()))
            self._changed.clear()
            last = time.monotonic()
            try:
                await self.retrain()
            except Exception as err:  # a failed retrain leaves the live routes as they are
                self._metrics.retrains.labels("failed").inc()
                log.error("overlay retrain failed: %r", err, exc_info=err)
            self.retrained.set()

    async def retrain(self) -> bool:
        """Build the routes file plus the overlay as read now; swap it in unless the guard
        holds it back. Whether it went live."""
        base, live = self.live.base, self.live.router
        version, build = self.prepare(base, live)
        overlay = version.partition("+")[2] or EMPTY_VERSION
        if version == live.version:
            return False
        t0 = time.perf_counter()
        router = await asyncio.to_thread(build)
        verdict = await asyncio.to_thread(
            judge, live, router, self.settings.learning.guard_tolerance
        )
        self.status.last_retrain_s = round(time.perf_counter() - t0, 3)
        self.status.retrains += 1
        if verdict.hold_back:
            self.status.held_back = f"{overlay}: {verdict.reason}"
            self._metrics.retrains.labels("held_back").inc()
            log.warning("overlay %s held back: %s", overlay, verdict.reason)
            return False
        if not await self.live.install(router, base):
            return False  # the routes file was reloaded meanwhile: its reload used the overlay
        self.status.live, self.status.held_back = overlay, None
        self._metrics.retrains.labels("applied").inc()
        self._metrics.overlay.info({"read": self.overlay.version, "live": overlay})
        log.info(
            "overlay %s live: routes version %s (%s; %.1fs)",
            overlay,
            router.version,
            verdict.reason,
            self.status.last_retrain_s,
        )
        return True

    async def start_live(self) -> None:
        """At start-up, before the first batch: the routes file plus the overlay go live,
        judged by the guard against the routes file alone (an overlay held back on a replica
        that ran before is held back here too)."""
        if self.settings.learning.retrain_process:
            self._training_process()  # started (and warmed up) now, not in the first retrain
        self.status.read = self.overlay.version
        self.status.entries = len(self.overlay.entries)
        await self.retrain()
        self._metrics.overlay.info({"read": self.overlay.version, "live": self.status.live})

    async def http_status(self) -> tuple[int, str, bytes]:
        """``GET /learning``: the overlay versions read and live, a held-back update."""
        body = orjson.dumps({**self.status.as_dict(), "counts": self.overlay.counts()})
        return 200, "application/json", body + b"\n"

    @contextlib.asynccontextmanager
    async def running(
        self,
        reader: AIOKafkaConsumer,
        intake: Coroutine[Any, Any, None],
        *,
        on_death: Callable[[str, BaseException], None],
    ) -> AsyncIterator[Learner]:
        """Tail the overlay, retrain and consume the corrections (``intake``) while the block
        runs. A task that stops with an error is reported to ``on_death`` (an ERROR log, a
        metric, /readyz) and not raised again at the exit: the service still stops cleanly."""
        tasks = [
            asyncio.create_task(self.tail(reader), name="semroute-overlay-tail"),
            asyncio.create_task(self.retrain_loop(), name="semroute-overlay-retrain"),
            asyncio.create_task(intake, name="semroute-corrections-intake"),
        ]

        def report(task: asyncio.Task[None]) -> None:
            if not task.cancelled() and (exc := task.exception()) is not None:
                on_death(task.get_name(), exc)

        for task in tasks:
            task.add_done_callback(report)
        try:
            yield self
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # failures: reported already
            await asyncio.to_thread(self.close)
