"""Shadow routes: a candidate routes file decided alongside the live one, and its promotion.

:class:`ShadowRoutes` holds the candidate's router (compiled with the live encoder, its own
head through the head cache), loaded at start (a candidate that fails to load fails the
start) and reloaded like the live routes (:class:`~.reload.LiveRoutes` checks it with the live
file; a candidate that fails is rejected, the one in use stays). :meth:`ShadowRoutes.compare`
decides a batch with the candidate on the live batch's embeddings and returns the
disagreements as shadow records. :func:`promote` makes the candidate the live routes file.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._errors import ConfigError
from .._files import atomic_copy, atomic_write_bytes, file_stamp
from .._routing.decision import Decisions
from .._routing.router import Router, TextEncoder
from .._routing.schema import RoutesConfig, load_routes, routes_version
from .observe import Metrics
from .records import OutRecord, shadow_record
from .settings import Settings
from .topics import check_topic_names
from .worker import Routed, route_targets

__all__ = ["Promoted", "ShadowRoutes", "promote", "validate_candidate"]

log = logging.getLogger("semroute_stream")


def validate_candidate(path: Path, settings: Settings) -> RoutesConfig:
    """Load ``path`` as the live routes would be loaded (schema; in ``llm`` mode every route's
    endpoint; with per-route topics the topic names): ``ConfigError`` naming what is wrong."""
    routes = load_routes(path)
    if settings.mode == "llm":
        route_targets(routes, settings.model_copy(update={"routes": path}))
    check_topic_names(routes, settings.model_copy(update={"routes": path}))
    return routes


class ShadowRoutes:
    """The candidate routes in use for shadow decisions."""

    def __init__(self, settings: Settings, router: Router, metrics: Metrics) -> None:
        assert settings.shadow.routes is not None
        self.path = settings.shadow.routes
        self.settings = settings
        self.router = router
        self._metrics = metrics
        self._stamp = file_stamp(self.path)
        metrics.shadow_routes.info({"version": router.version})

    @classmethod
    async def load(cls, settings: Settings, encoder: TextEncoder, metrics: Metrics) -> ShadowRoutes:
        """Load and compile the candidate (off the event loop); raises what is wrong with it."""
        assert settings.shadow.routes is not None
        path = settings.shadow.routes
        routes = await asyncio.to_thread(validate_candidate, path, settings)
        router = await asyncio.to_thread(Router, routes, encoder)
        log.info("shadow routes %s: version %s", path, router.version)
        return cls(settings, router, metrics)

    async def check(self, forced: bool, lock: asyncio.Lock) -> bool:
        """Reload the candidate if its file changed (or ``forced``); swap it in under ``lock``
        (between two batches). Whether a new version went live."""
        stamp = file_stamp(self.path)
        if not forced and stamp == self._stamp:
            return False
        self._stamp = stamp
        current = self.router.version
        try:
            routes = await asyncio.to_thread(validate_candidate, self.path, self.settings)
            if routes_version(routes) == current:
                return False
            router = await asyncio.to_thread(Router, routes, self.router.encoder)
        except Exception as err:  # as for the live routes: the candidate in use stays
            self._metrics.shadow_reloads.labels("rejected").inc()
            log.error(
                "shadow routes reload rejected, keeping version %s: %s",
                current,
                " | ".join(line.strip() for line in str(err).splitlines() if line.strip()),
                extra={"routes_file": str(self.path)},
            )
            return False
        async with lock:
            self.router = router
        self._metrics.shadow_routes.info({"version": router.version})
        self._metrics.shadow_reloads.labels("applied").inc()
        log.info("shadow routes reloaded: version %s -> %s", current, router.version)
        return True

    def compare(
        self,
        live: Decisions,
        embeddings: np.ndarray,
        texts: list[str],
        routed: list[Routed],
        topic: str,
        limit: int | None,
    ) -> dict[int, OutRecord]:
        """Decide the batch with the candidate (same embeddings) and return a shadow record
        for each message where it disagrees with the live decision: another route, or a
        fallback against a route (two fallbacks agree, whatever their names)."""
        router = self.router
        table = router.table
        candidate = router.decide(embeddings, texts)
        live_fallback = live.route < 0
        cand_fallback = candidate.route < 0
        names = np.array([*table.names, table.fallback], dtype=object)
        cand_names = names[candidate.route]  # -1 picks the fallback's name (the last)
        differs = live_fallback != cand_fallback
        for i in np.flatnonzero(~live_fallback & ~cand_fallback):
            differs[i] = cand_names[i] != routed[i].route
        out: dict[int, OutRecord] = {}
        for i in np.flatnonzero(differs):
            r = routed[int(i)]
            explained = candidate.explain(int(i), table)
            explained["routes_version"] = router.version
            explained["model"] = r.decision.get("model", router.encoder.model_name)
            out[int(i)] = shadow_record(
                topic, r.src, r.query, live=r.decision, candidate=explained, limit=limit
            )
        self._metrics.shadow_decided.inc(len(routed))
        self._metrics.shadow_agreed.inc(len(routed) - len(out))
        return out


@dataclass(frozen=True)
class Promoted:
    """What :func:`promote` did."""

    live: Path
    candidate: Path
    backup: Path | None
    old_version: str | None
    new_version: str


def promote(settings: Settings, *, backup: bool = True) -> Promoted:
    """Make the candidate (``shadow.routes``) the live routes file.

    The candidate is validated as a live routes file would be; the live file is copied to
    ``<routes>.before-promote`` (``backup``), then replaced atomically (temporary file +
    rename, its permissions kept) by the candidate's bytes. A running service picks the new
    file up at its next check (``reload.watch_interval_s``, or SIGHUP) and reloads it as any
    routes change: between two batches, rejected if it fails. The candidate file is left as
    it is (the shadow then agrees with the live routes until a new candidate is written).
    """
    candidate = settings.shadow.routes
    if candidate is None:
        raise ConfigError("shadow.routes is not set: there is no candidate to promote")
    live = settings.routes
    routes = validate_candidate(candidate, settings)
    data = candidate.read_bytes()
    old_version = None
    saved = None
    if live.exists():
        try:
            old_version = routes_version(load_routes(live))
        except ConfigError:
            old_version = None  # a broken live file is replaced all the same
        if backup:
            saved = live.with_name(live.name + ".before-promote")
            atomic_copy(live, saved)
    mode = live.stat().st_mode & 0o777 if live.exists() else 0o644
    atomic_write_bytes(live, data, durable=True, mode=mode)
    os.utime(live)  # a new mtime even when the copy kept the candidate's
    return Promoted(live, candidate, saved, old_version, routes_version(routes))
