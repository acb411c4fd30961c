"""The overlay's pure parts: records, the contradiction rule, versions, merge, rollback diffs,
the correction checks and the retrain guard."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from fakes import FakeEncoder
from service_helpers import ROUTES, make_settings

from semroute_stream._errors import ERROR_KINDS, InputError
from semroute_stream._routing.router import Router
from semroute_stream._routing.schema import parse_routes, routes_version
from semroute_stream._service.corrections import read_correction
from semroute_stream._service.guard import judge
from semroute_stream._service.learning import CachingEncoder, Learner, composed_version
from semroute_stream._service.observe import Metrics
from semroute_stream._service.overlay import (
    EMPTY_VERSION,
    Entry,
    Overlay,
    diff,
    entry_key,
    merge,
    next_entry,
    normalise,
    replay_versions,
)
from semroute_stream._service.records import Source
from semroute_stream._service.reload import LiveRoutes

BASE = parse_routes(ROUTES)
LABELS = BASE.names


def _entry(text: str, label: str | None, ts: int = 1000, **kw: Any) -> Entry:
    return Entry(text=text, label=label, id=f"c-{ts}", ts_ms=ts, source=f"c/0/{ts}", **kw)


def _rule(current: Entry | None, new: Entry) -> Entry:
    return next_entry(current, new, flip_limit=2, flip_window_ms=10_000)


def test_normalised_texts_share_a_key() -> None:
    assert normalise("  Where IS\tmy   parcel ") == "where is my parcel"
    assert entry_key("Where is my parcel") == entry_key("where  is my PARCEL ")
    assert entry_key("where is my parcel") != entry_key("where is my package")


def test_apply_put_replace_tombstone_and_ignore_garbage() -> None:
    ov = Overlay()
    e = _entry("where is my parcel", "shipping")
    key = entry_key(e.text)
    assert ov.apply(key, e.to_bytes()) and ov.version != EMPTY_VERSION
    assert not ov.apply(key, e.to_bytes())  # the same record again: no change
    v1 = ov.version
    assert ov.apply(key, _entry("where is my parcel", "billing", 2000).to_bytes())
    assert ov.version != v1
    for bad_key, bad_value in [
        (None, e.to_bytes()),
        (b"x:1", e.to_bytes()),
        (key, b"{not json"),
        (key, b"[1]"),
        (key, orjson.dumps({"text": "", "label": None})),
        (key, orjson.dumps({**orjson.loads(e.to_bytes()), "ts_ms": "soon"})),
        (entry_key("other text"), e.to_bytes()),  # key and text disagree
    ]:
        before = ov.version
        assert not ov.apply(bad_key, bad_value)
        assert ov.version == before
    assert ov.ignored == 7
    assert ov.apply(key, None) and ov.version == EMPTY_VERSION
    assert not ov.apply(key, None)


def test_version_is_a_function_of_content_not_of_history() -> None:
    entries = [_entry(f"text number {i}", LABELS[i % 3], 1000 + i) for i in range(30)]
    records = [(entry_key(e.text), e.to_bytes()) for e in entries]
    a, b = Overlay(), Overlay()
    for key, value in records:
        a.apply(key, value)
    shuffled = records[:]
    random.Random(7).shuffle(shuffled)
    # b also sees superseded and removed records first, as an uncompacted log shows them
    b.apply(records[0][0], _entry("text number 0", None, 5).to_bytes())
    b.apply(entry_key("gone"), _entry("gone", "tech").to_bytes())
    b.apply(entry_key("gone"), None)
    for key, value in shuffled:
        b.apply(key, value)
    assert a.version == b.version and a.entries == b.entries


def test_contradictions_latest_wins_and_flip_flops_are_quarantined() -> None:
    text = "my package never came"
    first = _rule(None, _entry(text, "shipping", 1000))
    assert (first.flips, first.since_ms, first.quarantined) == (0, 1000, False)
    same = _rule(first, _entry(text, "shipping", 2000))
    assert same.flips == 0 and same.label == "shipping"
    flip = _rule(same, _entry(text, "billing", 3000))
    assert (flip.label, flip.flips, flip.quarantined) == ("billing", 1, False)  # latest wins
    flip2 = _rule(flip, _entry(text, "shipping", 4000))
    assert flip2.flips == 2 and not flip2.quarantined
    flip3 = _rule(flip2, _entry(text, "billing", 5000))
    assert flip3.flips == 3 and flip3.quarantined  # more than flip_limit=2 within the window
    still = _rule(flip3, _entry(text, "billing", 6000))
    assert still.quarantined  # stays quarantined for the rest of the window
    later = _rule(still, _entry(text, "tech", 20_000))  # past the window: a new count
    assert (later.label, later.flips, later.quarantined) == ("tech", 0, False)


def test_merge_adds_moves_removes_and_skips() -> None:
    entries = [
        _entry("is there a cheaper plan for students", "billing"),
        _entry("Where is my package", "tech"),  # a base utterance of shipping, moved
        _entry("the website shows a 500 error", None),  # label null: a fallback example
        _entry("a flip flopping text", "billing", quarantined=True),
        _entry("book me a table", "restaurants"),  # a route the base lacks
    ]
    merged, skipped = merge(BASE, entries)
    by_name = {r.name: r.utterances for r in merged.routes}
    assert "is there a cheaper plan for students" in by_name["billing"]
    assert "Where is my package" in by_name["tech"]
    assert "where is my package" not in by_name["shipping"]
    assert all("500 error" not in u for r in merged.routes for u in r.utterances)
    assert all("flip flopping" not in u for r in merged.routes for u in r.utterances)
    assert [e.text for e in skipped] == ["book me a table"]
    assert merge(BASE, reversed(entries))[0] == merged  # order-independent
    assert merge(BASE, [])[0] is BASE
    # a route never loses its last utterance
    only = parse_routes(
        {**ROUTES, "routes": [{"name": "a", "utterances": ["x y"]}, ROUTES["routes"][0]]}
    )
    kept, _ = merge(only, [_entry("x y", None)])
    assert kept.routes[0].utterances == ["x y"]


def test_replay_versions_and_rollback_diff() -> None:
    e1, e2 = _entry("first text", "billing", 1), _entry("second text", "tech", 2)
    records = [
        (0, entry_key(e1.text), e1.to_bytes()),
        (1, entry_key(e2.text), e2.to_bytes()),
        (2, entry_key(e1.text), None),
    ]
    history = replay_versions(records)
    assert [h[0] for h in history] == [-1, 0, 1, 2]
    assert history[0][1] == EMPTY_VERSION
    current = history[-1][2]
    target = history[2][2]  # both entries
    ops = diff(current, target)
    assert ops == [(entry_key(e1.text), e1.to_bytes())]
    ov = Overlay(current)
    for key, value in ops:
        ov.apply(key, value)
    assert ov.version == history[2][1]
    assert diff(target, {}) == sorted((k, None) for k in target)


def test_composed_version() -> None:
    assert composed_version(BASE, EMPTY_VERSION) == routes_version(BASE)
    assert composed_version(BASE, "abcdef012345") == f"{routes_version(BASE)}+abcdef012345"


def _src(offset: int = 5) -> Source:
    return Source("in.corrections", 0, offset, 1234, None, ())


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (None, "null_value"),
        (b"{nope", "invalid_json"),
        (b"[1]", "not_an_object"),
        (b'{"label": "billing"}', "missing_text"),
        (b'{"text": "   ", "label": "billing"}', "empty_text"),
        (b'{"text": "' + b"x" * 1200 + b'", "label": "billing"}', "oversized"),
        (b'{"text": "hello"}', "invalid_label"),
        (b'{"text": "hello", "label": 3}', "invalid_label"),
        (b'{"text": "hello", "label": "no-such-route"}', "unknown_route"),
    ],
)
def test_bad_corrections_are_refused_with_a_kind(
    tmp_path: Path, value: bytes | None, kind: str
) -> None:
    settings = make_settings(tmp_path, "127.0.0.1:1", "in")
    with pytest.raises(InputError) as err:
        read_correction(settings, _src(), value, LABELS)
    assert err.value.kind == kind and kind in ERROR_KINDS


def test_a_good_correction(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, "127.0.0.1:1", "in")
    e = read_correction(
        settings, _src(), b'{"id": "c1", "text": "hi there", "label": null}', LABELS
    )
    assert (e.text, e.label, e.id, e.ts_ms, e.source) == (
        "hi there",
        None,
        "c1",
        1234,
        "in.corrections/0/5",
    )
    e = read_correction(
        settings, _src(), b'{"idempotency_key": "k9", "text": "refund", "label": "billing"}', LABELS
    )
    assert (e.id, e.label) == ("k9", "billing")
    e = read_correction(settings, _src(7), b'{"text": "refund", "label": "billing"}', LABELS)
    assert e.id == "in.corrections/0/7"


def test_caching_encoder_encodes_each_text_once() -> None:
    inner = FakeEncoder()
    enc = CachingEncoder(inner)
    a = enc.encode(["one two", "three"])
    b = enc.encode(["three", "one two", "four"])
    assert inner.calls == [2, 1]
    assert (a[0] == b[1]).all() and (a[1] == b[0]).all()


def _auto_routes(extra: dict[str, list[str]] | None = None) -> Any:
    words = {
        "billing": "invoice refund charge payment bill card price",
        "tech": "crash error login password bug screen app",
        "shipping": "parcel package delivery courier address tracking order",
    }
    routes = []
    for name, vocab in words.items():
        w = vocab.split()
        utterances = [f"{w[i % 7]} {w[(i * 3 + 1) % 7]} {w[(i * 5 + 2) % 7]}" for i in range(10)]
        routes.append({"name": name, "utterances": utterances + (extra or {}).get(name, [])})
    return parse_routes({"method": "auto", "routes": routes})


def test_the_guard_holds_back_an_update_that_routes_the_known_utterances_worse() -> None:
    enc = FakeEncoder()
    live = Router(_auto_routes(), enc, cache=False)
    better = Router(_auto_routes({"billing": ["invoice price refund"]}), enc, cache=False)
    verdict = judge(live, better, 0.02)
    assert not verdict.hold_back and verdict.shared >= 20
    # a flood of wrong labels: billing words taught as tech
    flood = [f"invoice refund charge {i}" for i in range(40)]
    worse = Router(_auto_routes({"tech": flood}), enc, cache=False)
    verdict = judge(live, worse, 0.02)
    assert verdict.hold_back, verdict
    assert verdict.new is not None and verdict.live is not None and verdict.new < verdict.live
    plain = Router(BASE, enc, cache=False)  # method max: no cross-validation, not guarded
    assert not judge(plain, worse, 0.02).hold_back


# ---- the learner without a broker: swap, guard, reload --------------------------------------


def _learner(tmp_path: Path, routes: Any, *, process: bool = False) -> tuple[Learner, LiveRoutes]:
    learning = {"enabled": True, "retrain_process": process}
    settings = make_settings(tmp_path, "127.0.0.1:1", "in", mode="route_only", learning=learning)
    settings.routes.write_text(yaml.safe_dump(routes.model_dump(mode="json")))
    metrics = Metrics()
    live = LiveRoutes(
        settings, Router(routes, FakeEncoder(), cache=False), {}, llm=False, metrics=metrics
    )
    return Learner(settings, live, metrics), live


def _put(learner: Learner, *entries: Entry) -> None:
    for e in entries:
        learner.overlay.apply(entry_key(e.text), e.to_bytes())


async def test_a_retrain_swaps_in_and_a_file_reload_keeps_the_overlay(tmp_path: Path) -> None:
    routes = _auto_routes()
    learner, live = _learner(tmp_path, routes, process=True)
    _put(learner, _entry("refund my invoice price", "billing"))
    try:  # trained in the training process
        assert await learner.retrain()
    finally:
        learner.close()
    overlay = learner.overlay.version
    assert live.router.version == f"{routes_version(routes)}+{overlay}"
    assert learner.status.live == overlay and learner.status.held_back is None
    assert not await learner.retrain()  # nothing new
    # the routes file changes: the reload merges the overlay read so far
    changed = routes.model_copy(update={"top_k": 2})
    live.settings.routes.write_text(yaml.safe_dump(changed.model_dump(mode="json")))
    assert await live.reload()
    assert live.router.version == f"{routes_version(changed)}+{overlay}"
    assert "refund my invoice price" in live.router.routes.routes[0].utterances


async def test_a_flood_of_wrong_labels_is_held_back_and_reported(tmp_path: Path) -> None:
    learner, live = _learner(tmp_path, _auto_routes())
    before = live.router
    _put(learner, *(_entry(f"invoice refund charge {i}", "tech", 1000 + i) for i in range(40)))
    assert not await learner.retrain()
    assert live.router is before
    assert learner.status.held_back is not None
    assert learner.status.held_back.startswith(learner.overlay.version)
    text = learner._metrics.render().decode()
    assert 'semroute_overlay_retrains_total{result="held_back"} 1.0' in text
    status, _, body = await learner.http_status()
    assert status == 200 and orjson.loads(body)["held_back"] == learner.status.held_back


def test_the_caching_encoder_starts_with_the_live_routes_embeddings() -> None:
    inner = FakeEncoder()
    router = Router(_auto_routes(), inner, cache=False)
    enc = CachingEncoder(inner)
    enc.seed(router)
    calls = len(inner.calls)
    texts = [u for r in router.routes.routes for u in r.utterances]
    enc.encode([*texts, "a new text"])
    assert inner.calls[calls:] == [1]
