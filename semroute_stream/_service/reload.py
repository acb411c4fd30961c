"""The routes in use, and their hot reload between two batches.

:class:`LiveRoutes` holds the router and the route → endpoint targets the pipeline decides
with. It reloads when the routes file's mtime/size/inode changes (``reload.watch_interval_s``)
or on request (SIGHUP): the new file is loaded, validated and embedded off the event loop, then
swapped in under the pipeline's batch lock, so one batch is always decided by one version.
The shadow (candidate) routes, when set, are checked at the same times (:mod:`.shadow`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Protocol

from .._files import file_stamp
from .._routing.router import Router
from .._routing.schema import RoutesConfig, load_routes, routes_version
from .observe import Metrics
from .settings import Settings
from .shadow import ShadowRoutes
from .topics import check_topic_names, ensure_output_topics, output_topics
from .worker import Target, route_targets

__all__ = ["Composer", "LiveRoutes"]

log = logging.getLogger("semroute_stream")


class Composer(Protocol):
    """What turns a routes file into the live router: by default the file alone; with
    learning on, the file plus the overlay (:class:`~.learning.Learner`)."""

    def prepare(self, base: RoutesConfig, current: Router) -> tuple[str, Callable[[], Router]]:
        """The version the routes would have, and a function (run in a worker thread) that
        builds their router; called on the event loop."""
        ...


class FileOnly:
    """The routes file alone: its version, its router."""

    def prepare(self, base: RoutesConfig, current: Router) -> tuple[str, Callable[[], Router]]:
        return routes_version(base), lambda: Router(base, current.encoder)


class LiveRoutes:
    """The live router and targets; ``llm`` says whether targets are needed (``llm`` mode)."""

    def __init__(
        self,
        settings: Settings,
        router: Router,
        targets: dict[str, Target],
        *,
        llm: bool,
        metrics: Metrics,
        on_broker: bool = True,
    ) -> None:
        self.settings = settings
        self.router = router
        self.targets = targets
        #: the routes file as last loaded (with learning on, ``router`` adds the overlay)
        self.base: RoutesConfig = router.routes
        self.composer: Composer = FileOnly()
        #: Held by the pipeline from a batch's fetch result to its dispatch (and while it
        #: revokes partitions); a swap takes it, so it happens between two batches.
        self.lock = asyncio.Lock()
        self._llm = llm
        self._on_broker = on_broker  # outputs are topics (not a replay file): check them
        #: set by a reload that read the output topics' limit anew (the worker follows it)
        self.record_limit: int | None = None
        self._metrics = metrics
        self._wanted = asyncio.Event()
        self._stamp: tuple[int, int, int] | None = None
        #: the candidate routes, checked with the live file (same interval, SIGHUP too)
        self.shadow: ShadowRoutes | None = None
        metrics.routes.info({"version": router.version})

    def request(self) -> None:
        """Check the routes file now (what SIGHUP does)."""
        self._wanted.set()

    async def watch(self) -> None:
        """Reload when the routes file's mtime/size/inode changes, or on request."""
        interval = self.settings.reload.watch_interval_s or None  # 0: on request only
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wanted.wait(), interval)
            forced = self._wanted.is_set()
            self._wanted.clear()
            stamp = file_stamp(self.settings.routes)
            if forced or stamp != self._stamp:
                self._stamp = stamp
                await self.reload()
            if self.shadow is not None:
                await self.shadow.check(forced, self.lock)

    async def reload(self) -> bool:
        """Load, validate and embed the routes file, then swap it in between two batches.

        Returns whether a new version went live. A file that fails (bad YAML, bad schema, an
        endpoint the config lacks) is rejected with one log line; the routes in use stay.
        """
        path = self.settings.routes
        current = self.router.version
        try:
            routes = await asyncio.to_thread(load_routes, path)
            version, build = self.composer.prepare(routes, self.router)
            if version == current:
                log.debug("routes file %s checked: version %s unchanged", path, version)
                return False
            targets = route_targets(routes, self.settings) if self._llm else {}
            check_topic_names(routes, self.settings)
            limit = None
            if self.settings.output.per_route_topics and self._on_broker:
                topics = output_topics(routes, self.settings)
                limit = await ensure_output_topics(self.settings, topics)
            router = await asyncio.to_thread(build)
        except Exception as err:  # whatever is wrong with the new file, the service goes on
            self._metrics.reloads.labels("rejected").inc()
            log.error(
                "routes reload rejected, keeping version %s: %s",
                current,
                " | ".join(line.strip() for line in str(err).splitlines() if line.strip()),
                extra={"routes_file": str(path)},
            )
            return False
        async with self.lock:  # between batches
            self.router, self.targets, self.base = router, targets, routes
            if limit is not None:  # the new routes' topics may take smaller records
                self.record_limit = limit
        self._metrics.routes.info({"version": router.version})
        self._metrics.reloads.labels("applied").inc()
        log.info(
            "routes reloaded: version %s -> %s (%d routes)",
            current,
            router.version,
            len(routes.routes),
            extra={"routes_file": str(path)},
        )
        return True

    async def install(self, router: Router, base: RoutesConfig) -> bool:
        """Swap in ``router`` (built on ``base`` plus something else: the overlay) between two
        batches; not if the routes file was reloaded meanwhile (it is stale then)."""
        async with self.lock:
            if routes_version(base) != routes_version(self.base):
                return False
            self.router = router
        self._metrics.routes.info({"version": router.version})
        return True
