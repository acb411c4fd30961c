"""Managed Kafka end to end: a second, SASL_SSL broker (SCRAM-SHA-512, certificates made here,
StandardAuthorizer with ACLs) and the router as a client of it.

The module fixture starts the broker from ``tests/kafka_local.py`` with its own home, data dir
and ports (``KAFKA_SECURE_PORT``, default 19492, plus 19493 for its controller and 19494 for a
PLAINTEXT internal listener whose ANONYMOUS principal is a super user: the tests produce, read
and create ACLs through it) and stops it at the end. The router connects as ``router`` over
SASL_SSL with ``ssl_cafile``; its password comes from a secret file (``secrets_dir``).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from kafka_local import Acl, LocalKafka, SaslSsl, create_acls
from service_helpers import (
    QUERIES,
    committed_offsets,
    produce,
    query_message,
    read_topic,
    write_routes,
)

from semroute_stream._cli.app import main
from semroute_stream._service.app import open_service, run_service
from semroute_stream._service.check import Finding, check
from semroute_stream._service.kafka import BrokerConnectError
from semroute_stream._service.settings import load_settings

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

USERS = {"admin": "admin-secret", "router": "router-secret"}
ROUTER = "User:router"


class SecureBroker:
    def __init__(self, kafka: LocalKafka, tls: SaslSsl) -> None:
        self.kafka, self.tls = kafka, tls

    @property
    def bootstrap(self) -> str:
        """The SASL_SSL listener (what the router uses)."""
        return self.kafka.bootstrap

    @property
    def internal(self) -> str:
        """The PLAINTEXT listener of the tests (a super user)."""
        return f"127.0.0.1:{self.kafka.probe_port}"


@pytest.fixture(scope="module")
def secure_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    home = tmp_path_factory.mktemp("secure-kafka")
    tls = SaslSsl(home / "tls", USERS)
    port = int(os.environ.get("KAFKA_SECURE_PORT", "19492"))
    t0 = time.monotonic()
    tls.make_certs()
    kafka = LocalKafka(home, port=port, secure=tls)
    kafka.start(timeout=120)
    print(f"SASL_SSL broker ready in {time.monotonic() - t0:.1f}s (certs included)")
    try:
        yield SecureBroker(kafka, tls)
    finally:
        kafka.stop()


async def _topics(broker: SecureBroker, names: list[str], partitions: int = 2) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.internal)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(t, partitions, 1) for t in names])
    finally:
        await admin.close()


def _acls(topic: str, *, out_denied: bool) -> list[Acl]:
    """The router may read the input with its group, describe everything of this test,
    write the dead letters and (unless ``out_denied``) the responses."""
    acls = [
        Acl("topic", topic, ROUTER, "describe", pattern="prefixed"),
        Acl("topic", topic, ROUTER, "describe_configs", pattern="prefixed"),
        Acl("topic", topic, ROUTER, "read"),
        Acl("group", f"g-{topic}", ROUTER, "read"),
        Acl("topic", f"{topic}.dlq", ROUTER, "write"),
        Acl("topic", f"{topic}.out", ROUTER, "write", "deny" if out_denied else "allow"),
    ]
    if out_denied:  # a broad allow that the deny on the output topic overrides
        acls.append(Acl("topic", topic, ROUTER, "write", pattern="prefixed"))
    return acls


def _config(
    tmp_path: Path, broker: SecureBroker, topic: str, *, user: str = "router", **extra: Any
) -> Path:
    """A config file as a user writes it: the password in a secret file, not in the YAML."""
    secrets = tmp_path / "secrets"
    secrets.mkdir(parents=True, exist_ok=True)
    (secrets / "kafka__sasl_password").write_text(USERS.get(user, "wrong-password") + "\n")
    data: dict[str, Any] = {
        "routes": str(write_routes(tmp_path)),
        "mode": "route_only",
        "secrets_dir": "secrets",
        "kafka": {
            "bootstrap_servers": broker.bootstrap,
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_username": "router" if user == "wrong" else user,
            "ssl_cafile": str(broker.tls.ca_file),
        },
        "input": {"topic": topic, "group_id": f"g-{topic}", "session_timeout_ms": 10_000},
        "output": {
            "responses_topic": f"{topic}.out",
            "dlq_topic": f"{topic}.dlq",
            "create_topics": False,
        },
        "batching": {"max_size": 16, "linger_ms": 20},
        "flow": {"commit_interval_ms": 100, "drain_timeout_s": 2},
        "encoder": {"intra_op_threads": 1},
        **extra,
    }
    path = tmp_path / "service.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


async def _setup(broker: SecureBroker, *, out_denied: bool) -> str:
    topic = f"mk-{uuid.uuid4().hex[:8]}"
    await _topics(broker, [topic, f"{topic}.out", f"{topic}.dlq"])
    create_acls(broker.kafka.probe_port, _acls(topic, out_denied=out_denied))
    values: list[bytes | None] = [query_message(t, f"q{i}") for i, (t, _) in enumerate(QUERIES)]
    await produce(broker.internal, topic, values)
    return topic


async def test_routes_end_to_end_over_sasl_ssl(secure_kafka: SecureBroker, tmp_path: Path) -> None:
    topic = await _setup(secure_kafka, out_denied=False)
    settings = load_settings(_config(tmp_path, secure_kafka, topic))
    assert settings.kafka.sasl_password is not None  # from the secret file
    assert settings.kafka.sasl_password.get_secret_value() == USERS["router"]

    stats = await asyncio.wait_for(
        run_service(settings, max_messages=len(QUERIES), handle_signals=False), 120
    )

    assert stats.consumed == len(QUERIES)
    out = await read_topic(secure_kafka.internal, f"{topic}.out", expect=len(QUERIES))
    assert {r["id"]: r["route"] for r in out} == {
        f"q{i}": route for i, (_, route) in enumerate(QUERIES)
    }
    committed = await committed_offsets(secure_kafka.internal, f"g-{topic}", topic)
    assert sum(committed.values()) == len(QUERIES)


async def test_denied_output_topic_is_named_and_nothing_is_committed(
    secure_kafka: SecureBroker, tmp_path: Path
) -> None:
    topic = await _setup(secure_kafka, out_denied=True)
    config = _config(tmp_path, secure_kafka, topic)

    found: list[Finding] = []
    assert await check(config, say=found.append) == 1
    failed = [f.detail for f in found if f.status == "FAIL" and f.what == "topic"]
    assert failed == [
        f"{topic}.out (responses): topic authorization failed: this principal may not write "
        "it (check the topic's ACLs)"
    ]

    settings = load_settings(config)
    async with open_service(settings) as pipeline:
        task = asyncio.create_task(pipeline.run())
        deadline = time.monotonic() + 60
        while pipeline.observer.platform_failure is None and time.monotonic() < deadline:
            assert not task.done(), task
            await asyncio.sleep(0.1)
        await asyncio.sleep(2)  # it keeps retrying: no crash, no restart
        assert not task.done()
        ready, why = await pipeline.readiness()
        assert not ready
        assert why.startswith(f"platform failure: topic authorization failed for {topic}.out")
        committed = await committed_offsets(secure_kafka.internal, f"g-{topic}", topic)
        assert set(committed.values()) == {-1}
        pipeline.request_stop("test")
        await asyncio.wait_for(task, 60)
    committed = await committed_offsets(secure_kafka.internal, f"g-{topic}", topic)
    assert set(committed.values()) == {-1}  # nothing committed: every message comes back

    # Nothing lost: a principal that may write (the admin) takes over the group from offset 0.
    admin = load_settings(_config(tmp_path / "admin", secure_kafka, topic, user="admin"))
    stats = await asyncio.wait_for(
        run_service(admin, max_messages=len(QUERIES), handle_signals=False), 120
    )
    assert stats.consumed == len(QUERIES)
    out = await read_topic(secure_kafka.internal, f"{topic}.out", expect=len(QUERIES))
    assert sorted(r["id"] for r in out) == sorted(f"q{i}" for i in range(len(QUERIES)))


async def test_wrong_password_fails_start_up_clearly(
    secure_kafka: SecureBroker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    topic = f"mk-{uuid.uuid4().hex[:8]}"
    config = _config(tmp_path, secure_kafka, topic, user="wrong")

    code = await asyncio.to_thread(main, ["check", "--config", str(config)])
    assert code == 1
    out = capsys.readouterr().out
    assert "FAIL  broker" in out and "SaslAuthenticationFailed" in out
    assert "check kafka.sasl_username 'router' and kafka.sasl_password" in out
    assert "wrong-password" not in out

    with pytest.raises(BrokerConnectError) as info:
        await asyncio.wait_for(run_service(load_settings(config), handle_signals=False), 120)
    message = str(info.value)
    assert "invalid credentials with SASL mechanism SCRAM-SHA-512" in message
    assert message.startswith(
        f"the admin client cannot connect to the brokers at {secure_kafka.bootstrap}"
    )
