"""Kafka and HTTP chores for docker/compose.yaml and docker/image_test.sh, run inside the router
image (it has aiokafka): ``python stack_client.py COMMAND ...``.

    topics BOOTSTRAP TOPIC...          wait for the broker (120 s), create the topics (3 partitions)
    produce BOOTSTRAP TOPIC TEXT...    one JSON ticket {"id", "text"} per TEXT
    readyz URL [TIMEOUT_S]             wait until GET URL answers 200
    roundtrip BOOTSTRAP IN OUT         produce a billing ticket to IN; assert its outcome on OUT:
                                       status "ok", route "billing", the stand-in LLM's echo
Exit code 0 when the check held, 1 (with the reason) otherwise.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
import urllib.error
import urllib.request
import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

BILLING_TEXT = "I was charged twice for my subscription this month"


def say(msg: str) -> None:
    print(f"stack_client {time.strftime('%H:%M:%S')}: {msg}", file=sys.stderr, flush=True)


async def topics(bootstrap: str, names: list[str]) -> None:
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # "Unable connect" while it starts
    deadline = time.monotonic() + 120
    while True:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
        try:
            await admin.start()
            break
        except (KafkaError, OSError) as exc:
            await admin.close()
            if time.monotonic() > deadline:
                msg = f"stack_client: broker {bootstrap} not up after 120 s: {exc}"
                raise SystemExit(msg) from exc
            await asyncio.sleep(1)
    try:
        for name in names:
            try:
                resp = await admin.create_topics([NewTopic(name, 3, 1)])
                code = resp.topic_errors[0][1]
                if code and code != TopicAlreadyExistsError.errno:
                    raise SystemExit(f"stack_client: create {name}: error code {code}")
            except TopicAlreadyExistsError:
                pass
            say(f"topic {name} ready")
    finally:
        await admin.close()


async def produce(bootstrap: str, topic: str, texts: list[str]) -> list[str]:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    ids = []
    try:
        for text in texts:
            ticket_id = f"smoke-{uuid.uuid4().hex[:12]}"
            value = json.dumps({"id": ticket_id, "text": text}).encode()
            meta = await producer.send_and_wait(topic, value, key=ticket_id.encode())
            ids.append(ticket_id)
            say(f"produced {ticket_id} to {topic}[{meta.partition}]@{meta.offset} {meta.timestamp}")
    finally:
        await producer.stop()
    return ids


async def roundtrip(bootstrap: str, in_topic: str, out_topic: str, timeout: float = 120) -> None:
    (ticket_id,) = await produce(bootstrap, in_topic, [BILLING_TEXT])
    consumer = AIOKafkaConsumer(
        out_topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None
    )
    await consumer.start()
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=1000)
            for records in batch.values():
                for record in records:
                    outcome = json.loads(record.value)
                    if outcome.get("id") != ticket_id:
                        continue
                    content = (outcome.get("response") or {}).get("content", "")
                    shown = ("id", "status", "route", "timings_ms", "processed_at_ms")
                    print(json.dumps({k: outcome.get(k) for k in shown}))
                    say(f"LLM attempts: {(outcome.get('response') or {}).get('attempts')}")
                    problems = []
                    if outcome.get("status") != "ok":
                        problems.append(f"status {outcome.get('status')!r}, expected 'ok'")
                    if outcome.get("route") != "billing":
                        problems.append(f"route {outcome.get('route')!r}, expected 'billing'")
                    if f"echo: {BILLING_TEXT}" not in content:
                        problems.append(f"response {content!r} is not the stand-in's echo")
                    if problems:
                        raise SystemExit("stack_client: " + "; ".join(problems))
                    say(f"{ticket_id} routed to {outcome['route']!r}: {content!r}")
                    return
        raise SystemExit(f"stack_client: no outcome for {ticket_id} on {out_topic} in {timeout}s")
    finally:
        await consumer.stop()


def readyz(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    say(f"GET {url}: 200 {resp.read(200).decode(errors='replace')}")
                    return
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except OSError as exc:
            last = str(exc)
        time.sleep(1)
    raise SystemExit(f"stack_client: GET {url} not 200 after {timeout:g}s ({last})")


def main(argv: list[str]) -> int:
    if not argv:
        raise SystemExit(__doc__)
    cmd, args = argv[0], argv[1:]
    if cmd == "topics" and len(args) >= 2:
        asyncio.run(topics(args[0], args[1:]))
    elif cmd == "produce" and len(args) >= 3:
        asyncio.run(produce(args[0], args[1], args[2:]))
    elif cmd == "readyz" and args:
        readyz(args[0], float(args[1]) if len(args) > 1 else 120)
    elif cmd == "roundtrip" and len(args) == 3:
        asyncio.run(roundtrip(*args))
    else:
        raise SystemExit(__doc__)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
