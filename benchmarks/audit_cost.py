"""What review, shadow routes and the decision-quality metrics add to the routing loop.

    .venv/bin/python benchmarks/audit_cost.py            # banking77 routes, method head
    .venv/bin/python benchmarks/audit_cost.py --method max --batch-size 64

Per micro-batch of ``--batch-size`` texts (the banking77 dev texts of ``../shared``), on the
same embeddings, the pipeline's routing loop (``Pipeline._decide`` after the encode) is timed
three ways, each ``--repeat`` times, median per batch:

* ``bare``: ``Router.decide`` + one ``intake.decided`` per message (the loop before ``Audit``);
* ``default``: + ``Audit.batch`` with review, shadow and drift off (the quality histograms only);
* ``review``, ``shadow``, ``drift``: + ``Audit.batch`` with that one on (and the histograms);
* ``all_on``: + ``Audit.batch`` with review (every reason, sample 1.0, no effective cap),
  shadow routes (the live routes minus one route, with their own head) and drift.

The encode of the same batch (``Encoder.encode``, the product's encoder settings) is timed too;
the JSON printed has each variant's ms per batch and its extra cost as a share of the encode.
No Kafka: the records are built (as the outbox would receive them) but not sent.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from semroute_stream._encoder import Encoder, EncoderConfig
from semroute_stream._input import Query
from semroute_stream._routing.router import Router
from semroute_stream._routing.schema import RoutesConfig
from semroute_stream._service.audit import Audit
from semroute_stream._service.intake import decided
from semroute_stream._service.observe import Metrics
from semroute_stream._service.records import Source
from semroute_stream._service.settings import Settings
from semroute_stream._service.shadow import ShadowRoutes

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "banking77"


def _routes(method: str, drop: int = 0) -> dict[str, Any]:
    data = json.loads((SHARED / "routes.json").read_text(encoding="utf-8"))
    routes = [{"name": r["name"], "utterances": r["utterances"]} for r in data["routes"]]
    return {
        "method": method,
        "default_threshold": 0.3,
        "fallback": {"name": "other"},
        "routes": routes[drop:],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="head", choices=["head", "max", "top5_mean"])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args(argv)

    with (SHARED / "dev.jsonl").open(encoding="utf-8") as fh:
        texts = [json.loads(line)["text"] for line in fh if line.strip()]
    encoder = Encoder(EncoderConfig(intra_op_threads=1))
    tmp = Path(tempfile.mkdtemp(prefix="audit-cost-"))
    live_path, cand_path = tmp / "routes.yaml", tmp / "candidate.yaml"
    live_path.write_text(yaml.safe_dump(_routes(args.method)))
    cand_path.write_text(yaml.safe_dump(_routes(args.method, drop=1)))
    t0 = time.perf_counter()
    live = Router(RoutesConfig.model_validate(_routes(args.method)), encoder)
    candidate = Router(RoutesConfig.model_validate(_routes(args.method, drop=1)), encoder)
    compile_s = time.perf_counter() - t0

    base: dict[str, Any] = {
        "routes": live_path,
        "mode": "route_only",
        "input": {"topic": "q"},
        "output": {"responses_topic": "q.out", "dlq_topic": "q.dlq"},
    }
    off = Settings.model_validate(base)
    on = Settings.model_validate(
        {
            **base,
            "review": {"enabled": True, "margin_below": 0.1, "max_per_minute": 10**9},
            "shadow": {"routes": cand_path},
            "drift": {"enabled": True, "recent_messages": 1000, "baseline_messages": 10000},
        }
    )
    review_only = off.model_copy(update={"review": on.review})
    drift_only = off.model_copy(update={"drift": on.drift})
    shadow_only = off.model_copy(update={"shadow": on.shadow})
    audits = {
        "default": Audit(off, Metrics()),
        "review": Audit(review_only, Metrics()),
        "shadow": Audit(shadow_only, Metrics(), shadow=ShadowRoutes(on, candidate, Metrics())),
        "drift": Audit(drift_only, Metrics()),
        "all_on": Audit(on, Metrics(), shadow=ShadowRoutes(on, candidate, Metrics())),
    }

    def loop(batch: list[str], embeddings: Any, audit: Audit | None) -> int:
        decisions = live.decide(embeddings, batch)
        routed = [
            decided(
                live,
                decisions,
                i,
                {},
                Source("q", 0, offset, None, None, ()),
                Query(text, None, {"text": text}),
                None,
                0.0,
            )
            for i, (offset, text) in enumerate(enumerate(batch))
        ]
        if audit is not None:
            routed = audit.batch(live, decisions, embeddings, batch, routed, 1_000_000)
        return sum(len(r.extras) for r in routed)

    timings: dict[str, list[float]] = {"encode": [], "bare": []}
    timings.update({name: [] for name in audits})
    extras = 0
    size = args.batch_size
    for b in range(args.batches):
        batch = texts[b * size : (b + 1) * size]
        t = time.perf_counter()
        embeddings = encoder.encode(batch)
        timings["encode"].append(time.perf_counter() - t)
        for _ in range(args.repeat):
            for name, audit in (("bare", None), *audits.items()):
                t = time.perf_counter()
                n = loop(batch, embeddings, audit)
                timings[name].append(time.perf_counter() - t)
                if name == "all_on":
                    extras += n
    ms = {name: statistics.median(v) * 1000 for name, v in timings.items()}
    result = {
        "method": args.method,
        "routes": len(live.table.names),
        "batch_size": size,
        "batches": args.batches,
        "repeat": args.repeat,
        "compile_s": round(compile_s, 2),
        "ms_per_batch": {k: round(v, 3) for k, v in ms.items()},
        "extra_vs_bare_ms": {k: round(ms[k] - ms["bare"], 3) for k in audits},
        "extra_share_of_encode": {k: round((ms[k] - ms["bare"]) / ms["encode"], 4) for k in audits},
        "records_per_batch_all_on": round(extras / (args.batches * args.repeat), 1),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
