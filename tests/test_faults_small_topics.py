"""Output topics with a small ``max.message.bytes`` and refused writes, with real router
processes on a real broker (run with the fault suite: ``-m faults``).

Every scenario reads the outputs back ``read_committed`` and compares them with the group's
committed offsets: each input below a committed offset has exactly one outcome, in both modes.
Figures go to ``out/faults.jsonl`` like the other scenarios'.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from fault_harness import REPO, Result, Router, config_for, message, read_all, tally, texts
from service_helpers import committed_offsets, produce
from test_faults import DELIVERY, PARTITIONS, _port_below_ephemeral_range, _send_all
from test_faults_hostile import _CLOCK_2H_AHEAD, _readyz_until

pytestmark = [pytest.mark.kafka, pytest.mark.faults]

N_SMALL = 480
SMALL = "8192"  # max.message.bytes of the responses topic: below aiokafka's 16 KiB batches


async def _small_responses_topic(bootstrap: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        config = {"max.message.bytes": SMALL}
        await admin.create_topics([NewTopic(f"{topic}.out", PARTITIONS, 1, topic_configs=config)])
    finally:
        await admin.close()


async def _check_commits(bootstrap: str, group: str, topic: str, result: Result) -> set[str]:
    """Inputs below a committed offset with no outcome (by source), into ``result.notes``;
    returns the ids of the inputs below the committed offsets."""
    committed = await committed_offsets(bootstrap, group, topic)
    records = await read_all(bootstrap, f"{topic}.out") + await read_all(bootstrap, f"{topic}.dlq")
    seen = Counter((r["source"]["partition"], r["source"]["offset"]) for r in records)
    below = [(p, o) for p, end in committed.items() for o in range(max(end, 0))]
    result.notes["committed"] = sum(max(end, 0) for end in committed.values())
    result.notes["below_committed_without_outcome"] = sum(1 for po in below if po not in seen)
    return {f"{p}/{o}" for p, o in below}


@DELIVERY
@pytest.mark.parametrize("batch", ["derived", "explicit 16 KiB"])
async def test_a_responses_topic_below_16_kib(
    kafka_bootstrap: str, new_topic: Any, tmp_path: Path, delivery: str, batch: str
) -> None:
    """Outcomes are cut to fit 8 KiB; batches must be too, and a refused write never commits
    an offset past it (exactly-once) nor poisons the idempotent producer (at-least-once).
    ``explicit 16 KiB``: ``client_options.producer.max_batch_size`` is kept, so the broker
    refuses whole batches; they are made again record by record."""
    topic = await new_topic(partitions=PARTITIONS)
    await _small_responses_topic(kafka_bootstrap, topic)
    ids = await _send_all(kafka_bootstrap, topic, N_SMALL)
    explicit = {"client_options": {"producer": {"max_batch_size": 16_384}}}
    config = config_for(
        tmp_path,
        kafka_bootstrap,
        topic,
        mode="route_only",
        llm_url=None,
        delivery=delivery,
        kafka=explicit if batch != "derived" else {},
    )
    router = Router(config, "--idle-timeout", "6", log=tmp_path / "r.log")
    code = await router.wait(timeout=240)
    refusals = router.log.read_text(errors="replace").count("refused a batch")
    result = await tally(
        kafka_bootstrap,
        topic,
        Result(f"responses topic max.message.bytes=8192, batches {batch}", delivery, N_SMALL),
        ids,
    )
    await _check_commits(kafka_bootstrap, f"g-{topic}", topic, result)
    result.notes["refusals_logged"] = refusals
    result.save()
    assert code == 0, router.output()
    assert result.notes["below_committed_without_outcome"] == 0, result
    assert result.duplicates == 0 and result.lost == 0, result
    assert result.ok + result.dead_letters == N_SMALL, result
    assert result.notes["committed"] == N_SMALL, result
    if batch == "derived":
        assert refusals == 0, router.output()  # batches fit: nothing refused
    else:  # what started it is logged, with its size
        assert refusals > 0, router.output()


async def test_exactly_once_with_a_clock_two_hours_ahead_commits_nothing(
    kafka_bootstrap: str, new_topic: Any, tmp_path: Path
) -> None:
    """``timestamps: now`` from a clock 2 h ahead: every write is refused (InvalidTimestamp).
    The transactions abort, the partitions stall visibly, no offset is committed; a router
    with a good clock then answers every input once."""
    topic = await new_topic(partitions=PARTITIONS)
    n = 64
    ids = await _send_all(kafka_bootstrap, topic, n)
    port = _port_below_ephemeral_range()
    config = config_for(
        tmp_path,
        kafka_bootstrap,
        topic,
        mode="route_only",
        llm_url=None,
        delivery="exactly_once",
        output={"timestamps": "now"},
        observability={"metrics_port": port},
    )
    skewed = Router(config, "--idle-timeout", "6", log=tmp_path / "skewed.log", env=_CLOCK_2H_AHEAD)
    status, why = await _readyz_until(port, "InvalidTimestamp", timeout=90)
    await asyncio.sleep(3)  # several commit rounds
    during = await committed_offsets(kafka_bootstrap, f"g-{topic}", topic)
    skewed.signal(signal.SIGTERM)
    assert await skewed.wait() == 0, skewed.output()
    after_skewed = await committed_offsets(kafka_bootstrap, f"g-{topic}", topic)
    fixed = Router(config, "--idle-timeout", "6", log=tmp_path / "fixed.log")
    assert await fixed.wait() == 0, fixed.output()
    result = await tally(
        kafka_bootstrap,
        topic,
        Result("router clock +2 h (timestamps: now)", "exactly_once", n),
        ids,
    )
    await _check_commits(kafka_bootstrap, f"g-{topic}", topic, result)
    result.notes["committed_while_skewed"] = sum(max(o, 0) for o in after_skewed.values())
    result.notes["readyz_while_refused"] = why.strip()[:200]
    result.save()
    assert status == 503 and "stalled" in why and "InvalidTimestamp" in why, skewed.output()
    assert all(o <= 0 for o in during.values()), during  # nothing committed past a refusal
    assert result.notes["committed_while_skewed"] == 0, result
    assert result.lost == 0 and result.duplicates == 0 and result.ok == n, result


async def test_exactly_once_replay_into_a_small_topic_ends_and_tells_the_truth(
    kafka_bootstrap: str, new_topic: Any, tmp_path: Path
) -> None:
    topic = await new_topic(partitions=PARTITIONS)
    await _small_responses_topic(kafka_bootstrap, topic)
    ids = await _send_all(kafka_bootstrap, topic, N_SMALL)
    config = config_for(
        tmp_path, kafka_bootstrap, topic, mode="route_only", llm_url=None, delivery="exactly_once"
    )
    log = (tmp_path / "replay.log").open("wb")
    command = ["replay", "--from-beginning", "--config", str(config)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "semroute_stream", *command],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=log,
    )
    try:
        out, _ = await asyncio.to_thread(proc.communicate, timeout=180)
        ended = True
    except subprocess.TimeoutExpired:  # it never ends by itself: stop it and see what it says
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.to_thread(proc.communicate, timeout=90)
        ended = False
    finally:
        log.close()
    stats = orjson.loads(out.splitlines()[-1]) if out.strip() else {}
    result = await tally(
        kafka_bootstrap,
        topic,
        Result("replay into max.message.bytes=8192", "exactly_once", N_SMALL),
        ids,
    )
    result.notes.update(ended_by_itself=ended, exit_code=proc.returncode, stats=stats)
    result.save()
    assert ended and proc.returncode == 0, (result, (tmp_path / "replay.log").read_text()[-3000:])
    assert result.lost == 0 and result.duplicates == 0, result
    assert result.ok + result.dead_letters == N_SMALL, result
    assert stats["outcomes"] + stats["dead_letters"] == N_SMALL, stats  # what it says it wrote


@DELIVERY
async def test_a_responses_topic_shrunk_while_running(
    kafka_bootstrap: str, new_topic: Any, tmp_path: Path, delivery: str
) -> None:
    """``max.message.bytes`` lowered to 1000 after start-up: every response is refused as a
    record, and becomes its minimal ``unpublishable`` dead letter; exactly-once aborts each
    transaction and makes it again, never committing one partially."""
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
    from test_faults_hostile import _wait_for_log

    topic = await new_topic(partitions=PARTITIONS)
    n = 64
    config = config_for(
        tmp_path, kafka_bootstrap, topic, mode="route_only", llm_url=None, delivery=delivery
    )
    router = Router(config, "--idle-timeout", "8", log=tmp_path / "r.log")
    await _wait_for_log(router, "partitions assigned", timeout=120)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        shrink = {"max.message.bytes": "1000"}
        await admin.alter_configs(
            [ConfigResource(ConfigResourceType.TOPIC, f"{topic}.out", shrink)]
        )
    finally:
        await admin.close()
    await asyncio.sleep(1)
    coords = await produce(kafka_bootstrap, topic, [message(i, t) for i, t in enumerate(texts(n))])
    assert await router.wait(timeout=240) == 0, router.output()
    keys = {f"{topic}/{p}/{o}" for p, o in coords}  # minimal dead letters carry no id
    result = await tally(
        kafka_bootstrap,
        topic,
        Result("responses topic shrunk to 1000 bytes", delivery, n),
        set(),
        bad_keys=keys,
    )
    await _check_commits(kafka_bootstrap, f"g-{topic}", topic, result)
    result.save()
    assert result.lost == 0 and result.duplicates == 0, result
    assert result.notes["below_committed_without_outcome"] == 0, result
    assert result.dead_letters == n and result.notes["dlq_kinds"] == {"unpublishable": n}, result
    assert result.notes["committed"] == n, result
