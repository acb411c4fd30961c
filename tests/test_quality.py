"""Decision-quality metrics and the drift signal: the distances, the incremental windows
(against a direct computation), the alert rules in docs/alerts.md, and ``/metrics`` after a
known run on a real broker."""

from __future__ import annotations

import asyncio
import math
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from ops_helpers import http_get, samples, value, wait_until
from service_helpers import QUERIES, make_settings, produce, query_message

from semroute_stream._service.app import open_service
from semroute_stream._service.quality import Drift, js_distance, total_variation
from semroute_stream._service.settings import DriftConfig

ROOT = Path(__file__).resolve().parents[1]


def test_distances() -> None:
    a, b = Counter({"x": 3, "y": 1}), Counter({"x": 6, "y": 2})
    assert total_variation(a, b) == 0 and js_distance(a, b) == 0  # the same shares
    assert total_variation(Counter(x=1), Counter(y=5)) == 1
    assert js_distance(Counter(x=1), Counter(y=5)) == pytest.approx(1.0)
    p, q = Counter(x=1, y=1), Counter(x=3, y=1)
    assert total_variation(p, q) == pytest.approx(0.25)
    m = (0.625, 0.375)
    expected = 0.5 * (0.5 * math.log2(0.5 / m[0]) + 0.5 * math.log2(0.5 / m[1]))
    expected += 0.5 * (0.75 * math.log2(0.75 / m[0]) + 0.25 * math.log2(0.25 / m[1]))
    assert js_distance(p, q) == pytest.approx(math.sqrt(expected))
    assert total_variation(Counter(), q) == 0  # an empty window has no shares yet


def test_drift_windows_are_incremental_and_match_a_direct_computation() -> None:
    rng = random.Random(3)
    size, recent_n, baseline_n = 5, 20, 40  # whole batches: the windows are exact here
    cfg = DriftConfig(enabled=True, recent_messages=recent_n, baseline_messages=baseline_n)
    drift = Drift(cfg)
    history: list[str] = []
    for step in range(60):
        # the fallback share and a route's share move after step 30
        weights = [1, 1, 1, 1] if step < 30 else [1, 3, 1, 3]
        batch = rng.choices(["a", "b", "c", "fallback"], weights, k=size)
        history += batch
        reading = drift.add(Counter(batch), batch.count("fallback"))
        recent = Counter(history[-recent_n:])
        baseline = Counter(history[-recent_n - baseline_n : -recent_n])
        assert reading.ready == (len(history) >= recent_n + baseline_n)
        assert reading.tvd == pytest.approx(total_variation(recent, baseline))
        assert reading.jsd == pytest.approx(js_distance(recent, baseline))
        n_base = sum(baseline.values())
        n_recent = min(len(history), recent_n)
        assert reading.fallback_recent == pytest.approx(recent["fallback"] / n_recent)
        rate = baseline["fallback"] / n_base if n_base else 0
        assert reading.fallback_baseline == pytest.approx(rate)
        # bounded state: never more batches than the two windows hold
        held = len(drift.recent.batches) + len(drift.baseline.batches)
        assert held <= (recent_n + baseline_n) // size
    assert reading.fallback_delta > 0.1 and reading.tvd > 0.1


def test_drift_windows_hold_whole_batches_of_any_size() -> None:
    drift = Drift(DriftConfig(enabled=True, recent_messages=10, baseline_messages=10))
    reading = drift.add(Counter(a=25), 0)  # one batch larger than both windows: all recent
    assert not reading.ready and drift.recent.n == 25
    reading = drift.add(Counter(fallback=3), 3)  # without the 25, recent would hold < 10
    assert drift.recent.n == 28 and not reading.ready
    reading = drift.add(Counter(fallback=9), 9)
    assert drift.baseline.n == 25 and drift.recent.n == 12 and reading.ready
    assert reading.fallback_recent == 1.0 and reading.fallback_baseline == 0.0
    assert reading.tvd == 1.0


def test_alert_rules_parse_and_name_real_metrics() -> None:
    from semroute_stream._service.observe import Metrics

    text = (ROOT / "docs" / "alerts.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    assert blocks
    exported = {m.name for m in Metrics().registry.collect()}
    exported |= {f"{name}_total" for name in exported} | {
        f"{name}_{s}" for name in exported for s in ("bucket", "count", "sum", "info")
    }
    rules = 0
    for block in blocks:
        doc = yaml.safe_load(block)
        for group in doc["groups"]:
            assert group["name"] and group["rules"]
            for rule in group["rules"]:
                assert set(rule) >= {"alert", "expr", "labels", "annotations"}
                assert rule["labels"]["severity"] in ("warning", "critical", "info")
                for name in re.findall(r"\bsemroute_[a-z_]+", rule["expr"]):
                    assert name in exported, (rule["alert"], name)
                assert rule["expr"].count("(") == rule["expr"].count(")")
                rules += 1
    assert rules >= 4


@pytest.mark.kafka
async def test_quality_metrics_on_metrics_after_a_known_run(
    kafka_bootstrap: str, new_topic: Any, tmp_path: Path
) -> None:
    topic = await new_topic(partitions=1)
    cycles = 6
    texts = [t for t, _ in QUERIES] * cycles
    settings = make_settings(
        tmp_path,
        kafka_bootstrap,
        topic,
        mode="route_only",
        observability={"metrics_port": 0},
        drift={"enabled": True, "recent_messages": 10, "baseline_messages": 10},
    )
    await produce(kafka_bootstrap, topic, [query_message(t, f"q{i}") for i, t in enumerate(texts)])
    async with open_service(settings) as pipeline:
        assert pipeline.http is not None
        run = asyncio.create_task(pipeline.run())
        await wait_until(lambda: pipeline.stats.outcomes == len(texts))
        status, text = await http_get(pipeline.http.port, "/metrics")
        pipeline.request_stop()
        await run
    assert status == 200
    found = samples(text)
    per_route = Counter(route for _, route in QUERIES)
    for route, n in per_route.items():
        for name in ("score", "confidence", "margin"):
            count = value(found, f"semroute_decision_{name}_count", route=route)
            assert count == n * cycles, (name, route)
        top = value(found, "semroute_decision_score_bucket", route=route, le="+Inf")
        assert top == n * cycles
    fallbacks = per_route["fallback"] * cycles
    assert value(found, "semroute_fallback_reasons_total", reason="below_threshold") == fallbacks
    assert value(found, "semroute_fallback_reasons_total", reason="low_margin") == 0
    assert value(found, "semroute_drift_ready") == 1
    for name in ("semroute_drift_route_share_tvd", "semroute_drift_route_share_jsd"):
        assert 0 <= value(found, name) <= 1
    recent = value(found, "semroute_drift_fallback_rate", window="recent")
    baseline = value(found, "semroute_drift_fallback_rate", window="baseline")
    assert 0 < baseline < 1 and 0 <= recent <= 1
    assert value(found, "semroute_drift_fallback_rate_delta") == pytest.approx(recent - baseline)


def test_batch_histogram_exports_what_a_prometheus_histogram_would() -> None:
    import numpy as np
    from prometheus_client import CollectorRegistry, Histogram

    from semroute_stream._service.observe import BatchHistogram

    buckets = (0.1, 0.5, 0.9, 1.0)
    ours_registry, theirs_registry = CollectorRegistry(), CollectorRegistry()
    ours = BatchHistogram("h", "doc", "route", buckets, ours_registry)
    theirs = Histogram("h", "doc", ["route"], buckets=buckets, registry=theirs_registry)
    rng = np.random.default_rng(1)
    for route in ("a", "b", "a"):
        values = rng.uniform(-0.2, 1.3, 50).astype(np.float32)
        values[[3, 7]] = [0.5, np.nan]  # a value on a bound counts in it; NaN is skipped
        ours.observe_many(route, values)
        for v in values[~np.isnan(values)]:
            theirs.labels(route).observe(float(v))
    from ops_helpers import samples as parse
    from prometheus_client.exposition import generate_latest

    mine = parse(generate_latest(ours_registry).decode())
    expected = parse(generate_latest(theirs_registry).decode())
    expected = {k: v for k, v in expected.items() if not k[0].endswith("_created")}
    assert mine.keys() == expected.keys()
    for key, v in expected.items():
        assert mine[key] == pytest.approx(v, rel=1e-6), key


def _src(offset: int) -> Any:
    from semroute_stream._service.records import Source

    return Source("q", 0, offset, None, None, ())


def test_audit_time_is_observed() -> None:
    from fakes import FakeEncoder
    from service_helpers import ROUTES

    from semroute_stream._input import Query
    from semroute_stream._routing.router import Router
    from semroute_stream._routing.schema import RoutesConfig
    from semroute_stream._service.audit import Audit
    from semroute_stream._service.intake import decided
    from semroute_stream._service.observe import Metrics
    from semroute_stream._service.records import Source
    from semroute_stream._service.settings import Settings

    settings = Settings.model_validate(
        {
            "routes": "r.yaml",
            "input": {"topic": "q"},
            "output": {"responses_topic": "q.out", "dlq_topic": "q.dlq"},
            "review": {"enabled": True, "reasons": ["fallback"]},
        }
    )
    router = Router(RoutesConfig.model_validate(ROUTES), FakeEncoder(), cache=False)
    texts = [t for t, _ in QUERIES]
    embeddings = router.encoder.encode(texts)
    decisions = router.decide(embeddings, texts)
    routed = [
        decided(
            router, decisions, i, {}, Source("q", 0, i, None, None, ()), Query(t, None, t), None, 0
        )
        for i, t in enumerate(texts)
    ]
    metrics = Metrics()
    out = Audit(settings, metrics).batch(router, decisions, embeddings, texts, routed, None)
    assert [bool(r.extras) for r in out] == [r.is_fallback for r in routed]
    assert all(r.extras[0].topic == "q.out.review" for r in out if r.extras)
    assert "semroute_audit_seconds_count 1.0" in metrics.render().decode()
