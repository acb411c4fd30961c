"""``semroute-stream check --config CONFIG``: can this config run, here, now?

Checks, in order, and prints one line each (``ok``, ``WARN`` or ``FAIL``): the config, the routes
file and its endpoints, the API key variables, the shadow (candidate) routes file when set, the
encoder model, the broker (a metadata request), the input and output topics (review and shadow
included; that they exist, and with ACLs that this principal may read the input and write the
outputs: Metadata v8's authorized operations, nothing is written), and each LLM endpoint
(``GET {base_url}/models``).
Exit status: 0 when nothing failed, 1 when something did, 2 when the config file itself cannot
be loaded (then nothing else can be checked).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import httpx

from .._errors import ConfigError, SemrouteError
from .._routing.schema import RoutesConfig, load_routes, routes_version
from .._stub_llm import STUB_OWNER
from .kafka import topic_operations, topic_partitions
from .llm import resolve_api_keys
from .settings import Settings, load_settings
from .topics import audit_topics
from .worker import route_targets

__all__ = ["Finding", "check"]

_BROKER_TIMEOUT_S = 15.0
_HTTP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Finding:
    status: Literal["ok", "WARN", "FAIL"]
    what: str
    detail: str

    def line(self) -> str:
        return f"{self.status:<5} {self.what:<9} {self.detail}"


async def check(config: str | Path, say: Callable[[Finding], None] = print) -> int:
    """Run every check, ``say`` each finding as it comes; return the exit status."""
    found: list[Finding] = []

    def note(status: Literal["ok", "WARN", "FAIL"], what: str, detail: str) -> None:
        finding = Finding(status, what, detail)
        found.append(finding)
        say(finding)

    try:
        settings = load_settings(config)
    except ConfigError as err:
        note("FAIL", "config", str(err))
        return 2
    note(
        "ok",
        "config",
        f"{config}: mode {settings.mode}, input {settings.input.topic}, "
        f"group {settings.input.group_id}",
    )
    routes = _check_routes(settings, note)
    _check_candidate(settings, note)
    await _check_encoder(settings, note)
    await _check_broker(settings, routes, note)
    if settings.mode == "llm":
        await _check_endpoints(settings, note)
    failures = sum(f.status == "FAIL" for f in found)
    say(Finding("ok" if not failures else "FAIL", "summary", f"{failures} problem(s)"))
    return 1 if failures else 0


Note = Callable[[Literal["ok", "WARN", "FAIL"], str, str], None]


def _check_routes(settings: Settings, note: Note) -> RoutesConfig | None:
    try:
        routes = load_routes(settings.routes)
    except ConfigError as err:
        note("FAIL", "routes", str(err))
        return None
    note(
        "ok",
        "routes",
        f"{settings.routes}: {len(routes.routes)} routes + fallback {routes.fallback.name!r}, "
        f"version {routes_version(routes)}",
    )
    if settings.mode == "llm":
        try:
            targets = route_targets(routes, settings)
        except ConfigError as err:
            note("FAIL", "routes", str(err))
        else:
            used = sorted({t.endpoint for t in targets.values()})
            note("ok", "routes", f"every route has a configured endpoint ({', '.join(used)})")
        try:
            resolve_api_keys(settings.endpoints)
        except ConfigError as err:
            note("FAIL", "api keys", str(err))
    return routes


def _check_candidate(settings: Settings, note: Note) -> None:
    """The shadow (candidate) routes file, when set: valid as live routes would be."""
    from .shadow import validate_candidate

    path = settings.shadow.routes
    if path is None:
        return
    try:
        routes = validate_candidate(path, settings)
    except ConfigError as err:
        note("FAIL", "shadow", str(err))
        return
    note("ok", "shadow", f"{path}: candidate routes, version {routes_version(routes)}")


async def _check_encoder(settings: Settings, note: Note) -> None:
    from .._encoder import Encoder

    try:
        encoder = await asyncio.to_thread(Encoder, settings.encoder)
    except SemrouteError as err:
        note("FAIL", "encoder", str(err))
        return
    note(
        "ok",
        "encoder",
        f"{encoder.model_name} loads (dimension {encoder.dim}, {encoder.backend} "
        f"{encoder.precision})",
    )


async def _check_broker(settings: Settings, routes: RoutesConfig | None, note: Note) -> None:
    out = settings.output
    wanted = [(settings.input.topic, "input")]
    if not out.per_route_topics:
        wanted.append((out.responses_topic, "responses"))
    elif routes is not None:
        names = [*routes.names, routes.fallback.name]
        wanted += [(out.topic_for(name), f"responses of route {name}") for name in names]
    wanted.append((out.dlq_topic, "dead letters"))
    wanted += [(t, f"parked messages of endpoint {e}") for t, e in settings.retry_topics().items()]
    audit = set(audit_topics(settings))
    wanted += [(t, "review / shadow records") for t in sorted(audit)]
    learning: dict[str, str] = {}
    if settings.learning.enabled:
        learning = {settings.corrections_topic: "corrections", settings.overlay_topic: "overlay"}
        wanted += list(learning.items())
    servers = settings.kafka.bootstrap_servers
    try:
        found = await asyncio.wait_for(
            topic_partitions(settings, [t for t, _ in wanted]), _BROKER_TIMEOUT_S
        )
    except ConfigError as err:  # TLS files, token provider, gssapi
        note("FAIL", "kafka", str(err))
        return
    except Exception as err:  # whatever keeps us from the broker is the finding
        note("FAIL", "broker", f"{servers}: unreachable ({type(err).__name__}: {err})")
        return
    note("ok", "broker", f"{servers}: metadata answered")
    ops = await _operations(settings, [t for t, _ in wanted if t in found], note)
    retries = settings.retry_topics()
    for topic, role in wanted:
        need = "read" if role in ("input", "corrections") else "write"
        if topic in found and ops is not None and topic in ops and need not in ops[topic]:
            note(
                "FAIL",
                "topic",
                f"{topic} ({role}): topic authorization failed: this principal may not "
                f"{need} it (check the topic's ACLs)",
            )
        elif role == "overlay" and topic in found and len(found[topic]) != 1:
            note("FAIL", "topic", f"{topic} (overlay): {len(found[topic])} partitions, needs 1")
        elif topic in found:
            note("ok", "topic", f"{topic} ({role}): {len(found[topic])} partition(s)")
        elif (
            topic in retries or topic in audit or topic in learning
        ) and out.create_topics:  # made at start-up
            note("ok", "topic", f"{topic} ({role}): created at start-up (output.create_topics)")
        else:
            note("FAIL", "topic", f"{topic} ({role}): does not exist")


async def _operations(
    settings: Settings, topics: list[str], note: Note
) -> dict[str, set[str]] | None:
    """This principal's permissions on ``topics`` (None: unknown, then not checked)."""
    if not topics:
        return None
    try:
        return await asyncio.wait_for(topic_operations(settings, topics), _BROKER_TIMEOUT_S)
    except Exception as err:
        note("WARN", "acl", f"topic permissions unknown ({type(err).__name__}: {err})")
        return None


async def _check_endpoints(settings: Settings, note: Note) -> None:
    try:
        keys = resolve_api_keys(settings.endpoints)
    except ConfigError:
        keys = {}  # already reported; check reachability without the missing keys
    async with httpx.AsyncClient(timeout=_HTTP_TIMEOUT_S) as client:
        for name, ep in settings.endpoints.items():
            url = f"{ep.base_url}/models"
            headers = dict(ep.extra_headers)
            if name in keys:
                headers["Authorization"] = f"Bearer {keys[name]}"
            try:
                response = await client.get(url, headers=headers)
            except httpx.HTTPError as err:
                note("FAIL", "endpoint", f"{name}: GET {url}: {type(err).__name__}: {err}")
                continue
            status = response.status_code
            if status != 200:
                hint = " (check the API key)" if status in (401, 403) else ""
                note("FAIL", "endpoint", f"{name}: GET {url} -> HTTP {status}{hint}")
                continue
            try:
                entries = response.json()["data"]
                listed = {m["id"] for m in entries}
                stand_in = bool(entries) and all(m.get("owned_by") == STUB_OWNER for m in entries)
            except (ValueError, LookupError, TypeError, AttributeError):
                listed, stand_in = set(), False
            if ep.model in listed:
                note("ok", "endpoint", f"{name}: GET {url} -> 200, model {ep.model!r} listed")
            elif stand_in:  # the package's stub-llm answers whatever model it is asked for
                note(
                    "ok", "endpoint", f"{name}: GET {url} -> 200, the stand-in stub-llm (any model)"
                )
            else:
                note("WARN", "endpoint", f"{name}: GET {url} -> 200, model {ep.model!r} not listed")
