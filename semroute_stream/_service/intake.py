"""What comes in: a consumed record's query (the input limits), a decided query ready for its
worker, a parked message back from its retry topic, and the retry partitions held while their
endpoint is down.

Pure functions over the settings and plain values; the pipeline calls them as it parses a batch.
"""

from __future__ import annotations

import time

from aiokafka import AIOKafkaConsumer, TopicPartition

from .._errors import InputError
from .._input import Query, check_envelope, parse_input
from .._routing.decision import Decisions
from .._routing.router import Router
from .health import Activity
from .llm import LLMPool
from .records import Source, read_parked
from .reload import LiveRoutes
from .settings import InputConfig, Settings
from .worker import Routed, Target

__all__ = ["check_source", "decided", "hold_retries", "read_query", "unparked"]


def check_source(inp: InputConfig, src: Source) -> None:
    """A consumed record's key and headers within the input limits (``InputError`` if not)."""
    check_envelope(
        src.key,
        src.headers,
        max_key_bytes=inp.max_key_bytes,
        max_headers=inp.max_headers,
        max_header_bytes=inp.max_header_bytes,
    )


def read_query(inp: InputConfig, src: Source, value: bytes | None) -> Query:
    """The query of one consumed record, within the input limits (``InputError`` if not)."""
    check_source(inp, src)
    return parse_input(
        value,
        format=inp.format,
        text_field=inp.text_field,
        id_field=inp.id_field,
        max_bytes=inp.max_message_bytes,
        max_chars=inp.max_text_chars,
        max_depth=inp.max_json_depth,
    )


def decided(
    router: Router,
    decisions: Decisions,
    i: int,
    targets: dict[str, Target],
    src: Source,
    query: Query,
    raw: bytes | None,
    received: float,
) -> Routed:
    """Query ``i`` of a decided batch, with its explanation (routes version and model added)
    and its target; ``timings`` holds its time in the topic (``queue``, ms)."""
    explanation = decisions.explain(i, router.table)
    explanation["routes_version"] = router.version
    explanation["model"] = router.encoder.model_name
    route = str(explanation["route"])
    stamp = src.timestamp_ms
    queue_ms = max(0.0, received * 1000 - stamp) if stamp else 0.0
    return Routed(
        src=src,
        query=query,
        raw=raw,
        decision=explanation,
        route=route,
        is_fallback=bool(explanation["is_fallback"]),
        target=targets.get(route),
        timings={"queue": queue_ms},
        received=received,
    )


def unparked(
    settings: Settings, routes: LiveRoutes, at: Source, value: bytes | None, received: float
) -> Routed:
    """A parked message (``at``: the retry-topic record) ready for its worker again, with the
    decision it was parked with: no encoding, no deciding again. ``InputError`` when the record
    cannot be read back."""
    try:
        parked = read_parked(value)
    except ValueError as err:
        raise InputError("invalid_json", str(err)) from err
    query = read_query(settings.input, parked.src, parked.raw)
    targets = routes.targets
    fallback = routes.router.routes.fallback.name
    return Routed(
        src=parked.src,
        query=query,
        raw=parked.raw,
        decision=parked.decision,
        route=parked.route,
        is_fallback=bool(parked.decision.get("is_fallback")),
        target=targets.get(parked.route) or targets.get(fallback),  # a route since removed
        timings={"parked": received * 1000 - parked.parked_at_ms},
        received=received,
        consumed=at,
        parked_at_ms=parked.parked_at_ms,
        times_parked=parked.times,
    )


def hold_retries(
    settings: Settings,
    llm: LLMPool | None,
    consumer: AIOKafkaConsumer,
    assigned: set[TopicPartition],
    activity: Activity,
) -> None:
    """Keep a retry topic's partitions paused while its endpoint is down: its parked messages
    would only be parked again. They are released for a trial when the breaker is half-open,
    at most once per backoff interval (the breaker's reset time, doubling to 30 s), so a long
    outage does not cycle the whole retry backlog every few seconds."""
    retries = settings.retry_topics()
    if not retries or llm is None:
        return
    now = time.monotonic()
    held_now = {retries[tp.topic] for tp in activity.held if tp.topic in retries}
    release: dict[str, bool] = {}
    for endpoint in set(retries.values()):
        state = llm.breaker_state(endpoint)
        if state == "closed":
            activity.retry_backoff.pop(endpoint, None)
            release[endpoint] = True
        elif state == "open":  # down, or a trial round just failed
            release[endpoint] = False
        elif endpoint not in held_now:  # half-open, released: until the trial round ends
            release[endpoint] = True
        else:  # half-open and held: one trial round now if it is due, the next one later
            due, interval = activity.retry_backoff.get(endpoint, (0.0, 0.0))
            release[endpoint] = now >= due
            if release[endpoint]:
                reset = settings.endpoints[endpoint].circuit_reset_s
                step = min(max(2 * interval, reset, 1.0), 30.0)
                activity.retry_backoff[endpoint] = (now + step, step)
    for tp in assigned:
        name = retries.get(tp.topic)
        if name is None:
            continue
        if not release[name] and tp not in activity.held:
            activity.held.add(tp)
            consumer.pause(tp)
        elif release[name] and tp in activity.held:
            activity.held.discard(tp)
            if not activity.paused and tp not in activity.stalled:
                consumer.resume(tp)
