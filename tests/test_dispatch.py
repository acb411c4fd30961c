"""The pipeline's dispatch path with no broker: an in-memory outbox, the fake encoder, and an
LLM answered through httpx's MockTransport. Every input ends as exactly one outcome, also when a
rebalance comes while a batch is being fetched."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
from aiokafka import TopicPartition
from fakes import FakeEncoder, MemoryOutbox, consumer_record
from ops_helpers import wait_until
from service_helpers import BAD_INPUTS, QUERIES, make_settings, query_message

from semroute_stream._routing.router import Router
from semroute_stream._routing.schema import load_routes
from semroute_stream._service.llm import LLMPool
from semroute_stream._service.pipeline import Pipeline
from semroute_stream._service.worker import Worker, route_targets

TP = TopicPartition("in", 0)
ENDPOINTS = {name: "http://llm.test/v1" for name in ("billing", "support", "general")}


def _pipeline(
    tmp_path: Path, handler: Any = None, consumer: Any = None, **sections: Any
) -> tuple[Pipeline, MemoryOutbox]:
    mode = "route_only" if handler is None else "llm"
    settings = make_settings(
        tmp_path, "127.0.0.1:1", "in", mode=mode, endpoints=ENDPOINTS, **sections
    )
    routes = load_routes(settings.routes)
    router = Router(routes, FakeEncoder())
    llm = None
    targets = {}
    if handler is not None:
        llm = LLMPool(settings.endpoints, transport=httpx.MockTransport(handler), api_keys={})
        targets = route_targets(routes, settings)
    outbox = MemoryOutbox()
    consumer = consumer or object()  # dispatch never touches the consumer
    pipeline = Pipeline(settings, router, consumer, outbox, Worker(settings, llm), targets=targets)
    pipeline.on_assigned({TP})
    return pipeline, outbox


async def _dispatch(pipeline: Pipeline, values: list[bytes | None]) -> None:
    await pipeline.dispatch(
        [consumer_record(i, v, key=b"k", headers=[("trace", b"t-1")]) for i, v in enumerate(values)]
    )
    await wait_until(lambda: pipeline.in_flight == 0, timeout=10)


async def test_every_input_gets_exactly_one_outcome(tmp_path: Path) -> None:
    pipeline, outbox = _pipeline(tmp_path)
    good: list[bytes | None] = [query_message(text, f"q{i}") for i, (text, _) in enumerate(QUERIES)]
    bad = [value for value, _ in BAD_INPUTS]
    await _dispatch(pipeline, good + bad)

    by_offset = {o.src.offset: o for o in outbox.outcomes}
    assert len(outbox.outcomes) == len(by_offset) == len(good) + len(bad)
    for i, (_, route) in enumerate(QUERIES):
        outcome = by_offset[i]
        assert outcome.kind is None and outcome.topic == "in.out"
        assert outcome.route == route and outcome.fallback == (route == "fallback")
        assert orjson.loads(outcome.value)["decision"]["route"] == route
    for j, (_, kind) in enumerate(BAD_INPUTS, start=len(good)):
        assert (by_offset[j].topic, by_offset[j].kind) == ("in.dlq", kind)
    # Key and headers are carried, plus the status and route headers.
    record = by_offset[0].record()
    assert record.key == b"k"
    assert record.headers == [
        ("trace", b"t-1"),
        ("semroute-status", b"ok"),
        ("semroute-route", b"billing"),
    ]
    assert by_offset[len(good)].record().headers[-1] == ("semroute-status", b"error")
    outbox.commit()
    assert outbox.committed == {TP: len(good) + len(bad)}
    assert pipeline.stats.consumed == len(good) + len(bad) and pipeline.stats.batches == 1


async def test_llm_answers_and_rejections_leave_by_the_same_path(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = orjson.loads(request.content)
        if "refund" in body["messages"][-1]["content"]:
            return httpx.Response(400, json={"error": {"message": "bad request"}})
        answer = {"role": "assistant", "content": f"answer from {body['model']}"}
        return httpx.Response(
            200,
            json={
                "model": body["model"],
                "choices": [{"message": answer, "finish_reason": "stop"}],
            },
        )

    pipeline, outbox = _pipeline(tmp_path, handler)
    charged, refund = QUERIES[0][0], QUERIES[1][0]
    await _dispatch(pipeline, [query_message(charged, "a"), query_message(refund, "b")])
    ok, rejected = sorted(outbox.outcomes, key=lambda o: o.src.offset)
    assert ok.kind is None and ok.topic == "in.out"
    assert orjson.loads(ok.value)["response"]["content"] == "answer from billing-model"
    assert (rejected.topic, rejected.kind, rejected.route) == ("in.dlq", "llm_rejected", "billing")
    letter = orjson.loads(rejected.value)
    assert letter["error"]["stage"] == "llm" and letter["decision"]["route"] == "billing"
    assert pipeline.worker.endpoint_load["billing"] == 0  # released after each message


class _RebalancingConsumer:
    """``getmany`` as aiokafka's behaves across a rebalance, one scripted call at a time.

    A step is ``(rebalance, offsets)``: with ``rebalance``, partition ``in``/0 is revoked and
    assigned again during the call (aiokafka waits for the new assignment, then returns only
    records of that assignment, fetched from the committed offset on). Afterwards ``getmany``
    returns nothing.
    """

    def __init__(self, steps: list[tuple[bool, list[int]]]) -> None:
        self.steps = steps
        self.on_rebalance: Callable[[], Awaitable[None]] | None = None

    def subscribe(self, topics: list[str], listener: Any) -> None:
        pass

    def pause(self, *tps: TopicPartition) -> None:
        pass

    def resume(self, *tps: TopicPartition) -> None:
        pass

    async def getmany(
        self, *tps: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[Any]]:
        if not self.steps:
            await asyncio.sleep(timeout_ms / 1000)
            return {}
        rebalance, offsets = self.steps.pop(0)
        assert max_records is None or len(offsets) <= max_records
        if rebalance and self.on_rebalance is not None:
            await self.on_rebalance()
        return {TP: [consumer_record(o, query_message(QUERIES[0][0], f"q{o}")) for o in offsets]}


async def _run_through(tmp_path: Path, steps: list[tuple[bool, list[int]]]) -> MemoryOutbox:
    consumer = _RebalancingConsumer(steps)
    # batches of up to 4 records, lingering long enough for every scripted step
    batching = {"max_size": 4, "linger_ms": 200}
    pipeline, outbox = _pipeline(tmp_path, consumer=consumer, batching=batching)

    async def rebalance() -> None:
        await pipeline.on_revoked({TP})
        outbox.commit()  # what an outbox commits on revoke: the finished prefix
        pipeline.on_assigned({TP})

    consumer.on_rebalance = rebalance
    await asyncio.wait_for(pipeline.run(idle_timeout_s=0.5), 30)
    return outbox


async def test_records_fetched_across_a_rebalance_are_not_skipped(tmp_path: Path) -> None:
    """A ``getmany`` that began before a revocation returns records of the new assignment
    (their positions have moved on): they must be processed, not dropped as stale, or the
    commit of a later offset passes them without an outcome (messages lost)."""
    for steps, n in (
        ([(True, [0, 1, 2, 3]), (False, [4, 5])], 6),  # was: committed at 6, outcomes of 4, 5
        ([(True, [0, 1, 2, 3])], 4),  # was: not processed (until a restart), nothing committed
    ):
        outbox = await _run_through(tmp_path, steps)
        offsets = sorted(o.src.offset for o in outbox.outcomes)
        assert (offsets, outbox.committed) == (list(range(n)), {TP: n})


async def test_records_fetched_before_a_revocation_come_again_once(tmp_path: Path) -> None:
    """Records fetched before a revocation (which resets the position to the committed offset)
    are dropped; the same offsets fetched again under the new assignment are processed once."""
    outbox = await _run_through(tmp_path, [(False, [0, 1]), (True, [0, 1])])
    offsets = sorted(o.src.offset for o in outbox.outcomes)
    assert (offsets, outbox.committed) == ([0, 1], {TP: 2})


class _ResumingConsumer:
    """Offset 0 at once; offset 1 only on the second ``getmany`` after a ``resume`` (a fetch
    round trip slower than one poll); nothing while paused."""

    def __init__(self) -> None:
        self.paused = False
        self.polls_since_resume = 0
        self.sent = 0

    def subscribe(self, topics: list[str], listener: Any) -> None:
        pass

    def pause(self, *tps: TopicPartition) -> None:
        self.paused = self.paused or TP in tps

    def resume(self, *tps: TopicPartition) -> None:
        if TP in tps:
            self.paused, self.polls_since_resume = False, 0

    async def getmany(
        self, *tps: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[Any]]:
        if not self.paused:
            self.polls_since_resume += 1
            if self.sent == 0 or (self.sent == 1 and self.polls_since_resume >= 2):
                self.sent += 1
                offset = self.sent - 1
                return {TP: [consumer_record(offset, query_message(QUERIES[0][0], f"q{offset}"))]}
        await asyncio.sleep(timeout_ms / 1000)
        return {}


async def test_a_backpressure_pause_longer_than_the_idle_timeout_does_not_end_the_run(
    tmp_path: Path,
) -> None:
    """While paused the input is not taken, not missing: the idle clock starts again when the
    partitions are resumed, so the records waiting are consumed before the run goes idle."""

    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(1.0)  # the one message in flight holds the pause for 1 s
        answer = {"role": "assistant", "content": "ok"}
        return httpx.Response(200, json={"choices": [{"message": answer}]})

    consumer = _ResumingConsumer()
    pipeline, outbox = _pipeline(tmp_path, slow, consumer=consumer, flow={"max_in_flight": 1})
    stats = await asyncio.wait_for(pipeline.run(idle_timeout_s=0.6), 30)
    assert stats.pauses >= 1
    assert sorted(o.src.offset for o in outbox.outcomes) == [0, 1]
    assert outbox.committed == {TP: 2}
