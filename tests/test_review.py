"""The review topic: which decisions are selected (a pure function of a batch's decisions),
the deterministic sample, the token bucket, and end to end on a real broker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from service_helpers import (
    BAD_INPUTS,
    QUERIES,
    committed_offsets,
    make_settings,
    outcome_counts,
    produce,
    query_message,
    read_topic,
)

from semroute_stream._routing.decision import Decisions
from semroute_stream._service.app import open_service, run_service
from semroute_stream._service.observe import Metrics
from semroute_stream._service.records import Source, review_record
from semroute_stream._service.review import Reviewer, TokenBucket, review_reasons, sampled
from semroute_stream._service.settings import ReviewConfig


def _decisions(
    route: list[int], score: list[float], margin: list[float], nearest: list[int]
) -> Any:
    n = len(route)
    zeros = np.zeros(n, np.float32)
    ints = np.zeros(n, np.intp)
    return Decisions(
        route=np.array(route, np.intp),
        best=np.maximum(np.array(route, np.intp), 0),
        score=np.array(score, np.float32),
        threshold=zeros,
        runner_up=ints,
        runner_up_score=zeros,
        margin=np.array(margin, np.float32),
        nearest_utterance=ints,
        nearest_score=zeros,
        top_routes=np.zeros((n, 1), np.intp),
        top_scores=np.zeros((n, 1), np.float32),
        reason=np.zeros(n, np.int8),
        top_similarity=np.zeros((n, 1), np.float32),
        floor=zeros,
        nearest_route=np.array(nearest, np.intp),
    )


BATCH = _decisions(
    route=[0, -1, 1, 1, 2],
    score=[0.9, 0.2, 0.4, 0.95, 0.9],
    margin=[0.5, 0.1, 0.3, 0.01, float("nan")],
    nearest=[0, 1, 1, 1, 0],
)


def test_review_reasons_are_a_function_of_the_decisions() -> None:
    cfg = ReviewConfig(enabled=True, margin_below=0.05, confidence_below=0.5)
    assert review_reasons(BATCH, "head", cfg) == {
        1: ("fallback",),
        2: ("low_confidence",),
        3: ("low_margin",),
        4: ("disagreement",),  # a NaN margin (no runner-up) is not a low one
    }
    # low_confidence is about a head's calibrated probability only
    assert 2 not in review_reasons(BATCH, "max", cfg)
    only = ReviewConfig(enabled=True, reasons=["fallback", "low_margin"], margin_below=0.4)
    assert review_reasons(BATCH, "head", only) == {
        1: ("fallback",),
        2: ("low_margin",),
        3: ("low_margin",),
    }


def test_sample_is_deterministic_and_near_its_rate() -> None:
    keys = [f"queries/0/{i}" for i in range(4000)]
    picked = [k for k in keys if sampled(k, 7, 0.25)]
    assert picked == [k for k in keys if sampled(k, 7, 0.25)]  # a replay picks the same
    assert 0.22 < len(picked) / len(keys) < 0.28
    assert picked != [k for k in keys if sampled(k, 8, 0.25)]  # the seed matters
    assert all(sampled(k, 0, 1.0) for k in keys[:50])
    assert not any(sampled(k, 0, 0.0) for k in keys[:50])


def test_token_bucket_caps_per_minute_without_a_timer() -> None:
    now = [0.0]
    bucket = TokenBucket(3, 3 / 60, clock=lambda: now[0])
    assert [bucket.take() for _ in range(5)] == [True, True, True, False, False]
    now[0] = 19.0  # 0.95 of a token
    assert not bucket.take()
    now[0] = 20.5
    assert bucket.take() and not bucket.take()
    now[0] = 1000.0  # refills to the capacity, never past it
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]


def test_reviewer_counts_sampled_out_and_capped() -> None:
    metrics = Metrics()
    cfg = ReviewConfig(enabled=True, max_per_minute=2, margin_below=0.05)
    reviewer = Reviewer(cfg, metrics, clock=lambda: 0.0)
    keys = [f"t/0/{i}" for i in range(5)]
    assert reviewer.select(BATCH, "head", keys) == {1: ("fallback",), 2: ("low_confidence",)}
    text = metrics.render().decode()
    assert 'semroute_review_skipped_total{why="rate_capped"} 2.0' in text
    assert 'semroute_review_candidates_total{reason="disagreement"} 1.0' in text


def test_review_record_is_cut_to_the_limit() -> None:
    from semroute_stream._input import Query

    src = Source("q", 0, 3, 1, b"k", (("h", b"v"),))
    decision = {"route": "billing", "score": 0.5}
    query = Query("x" * 5000, "id1", {"text": "x"})
    rec = review_record("q.review", src, query, decision=decision, reasons=("low_margin",))
    assert rec.key == b"k" and rec.headers == [("semroute-review", b"low_margin")]
    small = review_record(
        "q.review", src, query, decision=decision, reasons=("low_margin",), limit=1000
    )
    body = orjson.loads(small.value)
    assert len(small.value) <= 1000 and body["truncated"] == ["input"]
    assert body["decision"] == decision and body["idempotency_key"] == "q/0/3"


# ---- on a real broker ----------------------------------------------------------------------


@pytest.mark.kafka
@pytest.mark.parametrize("delivery", ["at_least_once", "exactly_once"])
async def test_fallbacks_and_low_margins_reach_the_review_topic(
    kafka_bootstrap: str, new_topic: Any, tmp_path: Path, delivery: str
) -> None:
    topic = await new_topic(partitions=2)
    values: list[bytes | None] = [query_message(t, f"q{i}") for i, (t, _) in enumerate(QUERIES)]
    values += [v for v, _ in BAD_INPUTS]
    await produce(kafka_bootstrap, topic, values, keys=[f"k{i}".encode() for i in range(16)])
    settings = make_settings(
        tmp_path,
        kafka_bootstrap,
        topic,
        mode="route_only",
        delivery=delivery,
        review={"enabled": True, "reasons": ["fallback", "low_margin"], "margin_below": 0.12},
    )
    stats = await run_service(settings, idle_timeout_s=2.0, handle_signals=False)
    assert stats.consumed == len(values)

    ok = await read_topic(kafka_bootstrap, f"{topic}.out", expect=len(QUERIES))
    dlq = await read_topic(kafka_bootstrap, f"{topic}.dlq", expect=len(BAD_INPUTS))
    assert set(outcome_counts(ok + dlq).values()) == {1} and len(ok + dlq) == len(values)
    wanted = {
        r["idempotency_key"]: r
        for r in ok
        if r["is_fallback"]
        or (r["decision"]["margin"] is not None and r["decision"]["margin"] < 0.12)
    }
    assert sum(r["is_fallback"] for r in wanted.values()) == 2
    review = await read_topic(
        kafka_bootstrap, f"{topic}.out.review", expect=len(wanted), timeout=15
    )
    assert sorted(r["idempotency_key"] for r in review) == sorted(wanted)  # once each
    for rec in review:
        outcome = wanted[rec["idempotency_key"]]
        assert rec["schema"] == "semroute.review/1"
        assert rec["decision"] == outcome["decision"]  # the full explanation
        assert rec["input"] == outcome["input"]["text"] and rec["id"] == outcome["id"]
        expect = ["fallback"] if outcome["is_fallback"] else ["low_margin"]
        assert rec["reasons"] == expect
        assert rec["_kafka"]["key"] == outcome["_kafka"]["key"]
    committed = await committed_offsets(kafka_bootstrap, settings.input.group_id, topic)
    assert sum(committed.values()) == len(values)


@pytest.mark.kafka
async def test_the_review_cap_holds(kafka_bootstrap: str, new_topic: Any, tmp_path: Path) -> None:
    topic = await new_topic(partitions=1)
    texts = [t for t, _ in QUERIES] * 3
    await produce(kafka_bootstrap, topic, [query_message(t, f"q{i}") for i, t in enumerate(texts)])
    settings = make_settings(
        tmp_path,
        kafka_bootstrap,
        topic,
        mode="route_only",
        # every decision is a candidate (a margin is always < 2); 3 a minute may be written
        review={"enabled": True, "margin_below": 2.0, "max_per_minute": 3},
    )
    async with open_service(settings) as pipeline:
        await pipeline.run(idle_timeout_s=2.0)
        metrics = pipeline.metrics.render().decode()
    ok = await read_topic(kafka_bootstrap, f"{topic}.out", expect=len(texts))
    assert len(ok) == len(texts) and set(outcome_counts(ok).values()) == {1}
    review = await read_topic(kafka_bootstrap, f"{topic}.out.review", expect=4, timeout=5)
    # the run took far less than the 20 s a fourth token needs
    assert len(review) == 3
    assert 'semroute_review_skipped_total{why="rate_capped"} 21.0' in metrics
    assert "semroute_review_selected_total 3.0" in metrics


def test_review_settings_are_validated_at_start_up(tmp_path: Path) -> None:
    import yaml

    from semroute_stream._errors import ConfigError
    from semroute_stream._service.settings import load_settings

    base = {
        "routes": "routes.yaml",
        "input": {"topic": "q"},
        "output": {"responses_topic": "q.out", "dlq_topic": "q.dlq"},
    }
    path = tmp_path / "service.yaml"
    for review, words in [
        ({"enabled": True, "reasons": ["whim"]}, ["review.reasons.0", "fallback"]),
        ({"enabled": True, "sample_rate": 2}, ["review.sample_rate"]),
        ({"enabled": True, "topic": "q.dlq"}, ["review.topic 'q.dlq'", "a topic of its own"]),
        ({"enabled": True, "topic": "bad topic"}, ["'bad topic'"]),
    ]:
        path.write_text(yaml.safe_dump({**base, "review": review}))
        with pytest.raises(ConfigError) as err:
            load_settings(path)
        assert str(path) in str(err.value)
        for word in words:
            assert word in str(err.value), (review, str(err.value))
    path.write_text(yaml.safe_dump({**base, "review": {"enabled": True}}))
    assert load_settings(path).review_topic() == "q.out.review"
    path.write_text(yaml.safe_dump(base))
    assert load_settings(path).review_topic() is None


async def test_a_refused_review_record_never_fails_its_outcome() -> None:
    from aiokafka import TopicPartition
    from aiokafka.errors import RecordTooLargeError

    from semroute_stream._service.delivery import AtLeastOnceOutbox
    from semroute_stream._service.records import Outcome, OutRecord

    sent: list[str] = []

    async def send(record: OutRecord) -> None:
        if record.topic.endswith(".review"):
            raise RecordTooLargeError("too large")
        sent.append(record.topic)

    async def commit(offsets: Any) -> None:
        return None

    outbox = AtLeastOnceOutbox(send, commit)
    src = Source("q", 0, 7, None, None, ())
    extra = OutRecord("q.out.review", b"{}", None, [])
    shadow = OutRecord("q.out.shadow", b"{}", None, [])
    outbox.assign({TopicPartition("q", 0)})
    outbox.track(TopicPartition("q", 0), 7)
    await outbox.publish(Outcome(src, "q.out", b"{}", 0.0, extras=(extra, shadow)))
    assert sorted(sent) == ["q.out", "q.out.shadow"]
    assert outbox.in_flight() == 0  # the outcome finished its offset
