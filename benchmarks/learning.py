"""Learning from corrections on a real broker: Banking77 accuracy as corrections stream in.

    .venv/bin/python benchmarks/learning.py --json          # one JSON object on stdout

The shared Banking77 dev file (77 routes, 1,000 labelled rows, sorted by label) is split per
label: the first half of each label's rows (file order) are the corrections, the rest the test
queries. (The file's literal first half holds 38 labels and its second half 40 others, with one
in common: corrections on the first half could not teach the second anything.)

The router runs in this process (``open_service``, ``route_only``, learning on, a real broker:
``--bootstrap``, ``KAFKA_BOOTSTRAP_SERVERS`` or a LocalKafka started here). The test queries are
routed once before any correction (``before``); then, per chunk of ``--chunk`` corrections, the
chunk is published and the test queries are routed *while* the head retrains (``during``) and
again once the chunk's overlay version is live (``after``). Each batch's dispatch (encode +
decide) is timed, and classed as overlapping a retrain or not: ``batch_ms``. The reference is
``fit --add-utterances all`` on the same corrections, offline, evaluated on the same test
queries; ``routes_as_shipped`` is the routes file alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
from _common import DATASETS, REPO, kafka_bootstrap, log, percentiles
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from semroute_stream._encoder import Encoder
from semroute_stream._routing.router import Router
from semroute_stream._routing.schema import load_routes
from semroute_stream._service.app import open_service
from semroute_stream._service.pipeline import Pipeline
from semroute_stream._service.settings import Settings

BANKING = DATASETS / "banking77"


def split(how: str = "label") -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(corrections, test): per label, the first half of its rows and the rest; ``file``: the
    file's first half and its second half."""
    rows = [json.loads(line) for line in (BANKING / "dev.jsonl").read_text().splitlines() if line]
    if how == "file":
        return rows[: len(rows) // 2], rows[len(rows) // 2 :]
    by_label: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_label[row["label"]].append(row)
    corrections, test = [], []
    for group in by_label.values():
        half = len(group) // 2
        corrections += group[:half]
        test += group[half:]
    return corrections, test


def accuracy(routes: list[str], test: list[dict[str, Any]]) -> float:
    hits = sum(r == str(t["label"]) for r, t in zip(routes, test, strict=True))
    return round(hits / len(test), 4)


def offline_reference(
    corrections: list[dict[str, Any]], test: list[dict[str, Any]], encoder: Encoder
) -> dict[str, Any]:
    """``fit --add-utterances all`` on the corrections, evaluated on the test queries."""
    with tempfile.TemporaryDirectory() as tmp:
        data, out = Path(tmp) / "corrections.jsonl", Path(tmp) / "fitted.json"
        data.write_text("".join(json.dumps(c) + "\n" for c in corrections))
        cmd = [
            str(REPO / ".venv" / "bin" / "semroute-stream"),
            "fit",
            "--routes",
            str(BANKING / "routes.json"),
            "--data",
            str(data),
            "--out",
            str(out),
            "--add-utterances",
            "all",
        ]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        seconds = time.perf_counter() - t0
        texts = [t["text"] for t in test]
        fitted = Router(load_routes(out), encoder)
        base = Router(load_routes(BANKING / "routes.json"), encoder)
        return {
            "routes_as_shipped": accuracy([d.route for d in base.route_batch(texts)], test),
            "fit_add_utterances_all": accuracy([d.route for d in fitted.route_batch(texts)], test),
            "fit_seconds": round(seconds, 1),
        }


class Timings:
    """Each batch's dispatch time, and the retrain windows."""

    def __init__(self) -> None:
        self.batches: list[tuple[float, float]] = []  # (start, end), monotonic
        self.retrains: list[tuple[float, float]] = []

    def instrument(self, pipeline: Pipeline) -> None:
        dispatch, learner = pipeline.dispatch, pipeline.learner
        assert learner is not None
        retrain = learner.retrain

        async def timed_dispatch(batch: list[Any]) -> None:
            t0 = time.monotonic()
            await dispatch(batch)
            self.batches.append((t0, time.monotonic()))

        async def timed_retrain() -> bool:
            t0 = time.monotonic()
            try:
                return await retrain()
            finally:
                self.retrains.append((t0, time.monotonic()))

        pipeline.dispatch = timed_dispatch  # type: ignore[method-assign]
        learner.retrain = timed_retrain  # type: ignore[method-assign]

    def split(self) -> dict[str, Any]:
        def overlaps(b: tuple[float, float]) -> bool:
            return any(b[0] < r[1] and r[0] < b[1] for r in self.retrains)

        during = [(e - s) * 1000 for s, e in self.batches if overlaps((s, e))]
        without = [(e - s) * 1000 for s, e in self.batches if not overlaps((s, e))]

        def since_retrain(s: float) -> str:
            starts = [r[0] for r in self.retrains if r[0] <= s]
            return f"retrain {len(starts)} +{s - starts[-1]:.1f}s" if starts else "-"

        slowest = sorted(self.batches, key=lambda b: b[0] - b[1])[:8]
        return {
            "slowest": [(round((e - s) * 1000), since_retrain(s)) for s, e in slowest],
            "while_retraining": percentiles(during),
            "without_retraining": percentiles(without),
            "retrain_s": percentiles([(e - s) for s, e in self.retrains]),
        }


class Collector:
    """Outcome records of the responses topic: id → (route, routes_version)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest"
        )
        self.seen: dict[str, tuple[str, str]] = {}
        self.changed = asyncio.Event()

    async def run(self) -> None:
        async for rec in self.consumer:
            out = orjson.loads(rec.value)
            self.seen[out["id"]] = (out["route"], out["decision"]["routes_version"])
            self.changed.set()

    async def wait(self, ids: list[str], timeout: float = 300) -> list[tuple[str, str]]:
        async with asyncio.timeout(timeout):
            while not all(i in self.seen for i in ids):
                self.changed.clear()
                await self.changed.wait()
        return [self.seen[i] for i in ids]


async def route_pass(
    producer: AIOKafkaProducer,
    collector: Collector,
    topic: str,
    test: list[dict[str, Any]],
    rate: float,
) -> tuple[float, set[str]]:
    """Publish the test queries at ``rate``/s; their accuracy and the routes versions used."""
    tag = uuid.uuid4().hex[:6]
    ids = [f"{tag}-{i}" for i in range(len(test))]
    for i, (ident, row) in enumerate(zip(ids, test, strict=True)):
        await producer.send(topic, orjson.dumps({"id": ident, "text": row["text"]}))
        if i % 10 == 9:
            await asyncio.sleep(10 / rate)
    await producer.flush()
    got = await collector.wait(ids)
    return accuracy([r for r, _ in got], test), {v for _, v in got}


@contextlib.asynccontextmanager
async def service(settings: Settings) -> AsyncIterator[Pipeline]:
    async with open_service(settings, serve_http=False) as pipeline:
        task = asyncio.create_task(pipeline.run())
        try:
            yield pipeline
        finally:
            pipeline.request_stop()
            await task


async def stream(
    bootstrap: str,
    args: argparse.Namespace,
    corrections: list[dict[str, Any]],
    test: list[dict[str, Any]],
) -> dict[str, Any]:
    topic = f"bench.learning.{time.strftime('%H%M%S')}.{uuid.uuid4().hex[:6]}"
    config: dict[str, Any] = dict(
        routes=BANKING / "routes.json",
        mode="route_only",
        kafka={"bootstrap_servers": bootstrap},
        input={"topic": topic, "group_id": f"g-{topic}"},
        output={"responses_topic": f"{topic}.out", "dlq_topic": f"{topic}.dlq"},
        batching={"max_size": args.batch, "linger_ms": 5},
        encoder={"intra_op_threads": 1},
        learning={"enabled": True, "retrain_debounce_s": 0.5, "retrain_min_interval_s": 1.0},
    )
    settings = Settings(**config)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    await producer.send_and_wait(topic, b'{"id": "warm-up", "text": "hello"}')  # the topic exists
    collector = Collector(bootstrap, f"{topic}.out")
    timings = Timings()
    rows: list[dict[str, Any]] = []
    try:
        async with service(settings) as pipeline:
            timings.instrument(pipeline)
            learner = pipeline.learner
            assert learner is not None
            await collector.consumer.start()
            collecting = asyncio.create_task(collector.run())
            try:
                acc, versions = await route_pass(producer, collector, topic, test, args.rate)
                rows.append(
                    {
                        "corrections": 0,
                        "phase": "before",
                        "accuracy": acc,
                        "versions": sorted(versions),
                    }
                )
                log(f"before: {acc}")
                for start in range(0, len(corrections), args.chunk):
                    chunk = corrections[start : start + args.chunk]
                    values = [
                        orjson.dumps(
                            {"id": f"c{start + i}", "text": c["text"], "label": c["label"]}
                        )
                        for i, c in enumerate(chunk)
                    ]
                    for v in values:
                        await producer.send(settings.corrections_topic, v)
                    await producer.flush()
                    done = start + len(chunk)
                    acc, versions = await route_pass(producer, collector, topic, test, args.rate)
                    rows.append(
                        {
                            "corrections": done,
                            "phase": "during",
                            "accuracy": acc,
                            "versions": sorted(versions),
                        }
                    )
                    # wait until the overlay holds the chunk and a retrain has judged it
                    async with asyncio.timeout(300):
                        while not (
                            (
                                len(learner.overlay.entries) >= done
                                and learner.status.live == learner.overlay.version
                            )
                            or (learner.status.held_back or "").startswith(learner.overlay.version)
                        ):
                            await asyncio.sleep(0.2)
                    acc, versions = await route_pass(producer, collector, topic, test, args.rate)
                    rows.append(
                        {
                            "corrections": done,
                            "phase": "after",
                            "accuracy": acc,
                            "versions": sorted(versions),
                            "held_back": learner.status.held_back,
                        }
                    )
                    log(f"{done} corrections: during {rows[-2]['accuracy']}, after {acc}")
                status = learner.status.as_dict()
            finally:
                collecting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await collecting
                await collector.consumer.stop()
    finally:
        await producer.stop()
    return {"passes": rows, "batch_ms": timings.split(), "learner": status}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", help="Kafka bootstrap servers (default: see _common)")
    parser.add_argument("--chunk", type=int, default=100, help="corrections per step (100)")
    parser.add_argument("--batch", type=int, default=32, help="batching.max_size (32)")
    parser.add_argument("--rate", type=float, default=250.0, help="test queries per second (250)")
    parser.add_argument(
        "--split",
        choices=["label", "file"],
        default="label",
        help="corrections: the first half of each label's rows (default), or of the file",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args()
    corrections, test = split(args.split)
    load_before = os.getloadavg()
    encoder = Encoder()
    log(f"{len(corrections)} corrections, {len(test)} test queries; offline reference first")
    reference = offline_reference(corrections, test, encoder)
    log(f"offline: {reference}")
    with kafka_bootstrap(args.bootstrap) as (bootstrap, how):
        figures = asyncio.run(stream(bootstrap, args, corrections, test))
    result = {
        "dataset": "banking77 dev",
        "split": args.split,
        "corrections": len(corrections),
        "test_queries": len(test),
        "broker": how,
        "offline": reference,
        **figures,
        "final_accuracy": figures["passes"][-1]["accuracy"],
        "loadavg": {
            "before": [round(x, 2) for x in load_before],
            "after": [round(x, 2) for x in os.getloadavg()],
        },
        "cpus": os.cpu_count(),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
