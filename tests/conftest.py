"""Shared fixtures: a real Kafka broker, fresh topics on it, and a stand-in LLM endpoint.

``kafka_bootstrap`` (session) -> ``"host:port"`` of a real broker, chosen in this order:
    1. ``KAFKA_BOOTSTRAP_SERVERS`` if set (``tests/kafka_local.py run -- ...`` sets it);
    2. a testcontainers container if a Docker engine answers (``DOCKER_HOST``; podman's
       Docker-compatible socket too, see docker/image_test.sh), image ``KAFKA_TEST_IMAGE``:
       an image built from docker/kafka/Containerfile (a name containing ``semroute-kafka``)
       runs as a generic ``DockerContainer`` with the same host and container port, waited
       for with a real Metadata request; any other image (default confluentinc/cp-kafka:7.6.0)
       as testcontainers' ``KafkaContainer`` in KRaft mode. If the container fails the local
       broker is used instead, unless ``SEMROUTE_REQUIRE_TESTCONTAINERS=1`` (then it fails);
    3. the local Maven-jar broker of ``tests/kafka_local.py``, stopped at session end only if
       this fixture started it.
``local_kafka`` (session) -> the ``kafka_local.LocalKafka`` behind ``kafka_bootstrap``, for
    tests that stop/restart the broker; skips the test when the broker is not that one.
``new_topic`` (function) -> async factory ``await new_topic(partitions=3) -> str``.
``llm_stub`` (function) -> a started ``llm_stub.LLMStub``.

Tests that need Kafka are marked ``@pytest.mark.kafka``.
"""

from __future__ import annotations

import os
import re
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from kafka_local import LocalKafka
from llm_stub import LLMStub

NewTopicFactory = Callable[..., Awaitable[str]]


def _docker_engine_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def _free_port() -> int:
    """A free TCP port below the ephemeral range (see tests/kafka_local.py on self-connects)."""
    import random
    import socket

    for _ in range(200):
        port = random.randrange(20000, 30000, 2)
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return port
    raise RuntimeError("no free port in 20000-30000")


def _start_kafka_container(image: str) -> tuple[Any, str]:
    """A started Kafka container of ``image`` and its bootstrap address (see kafka_bootstrap)."""
    if "semroute-kafka" not in image:
        from testcontainers.community.kafka import KafkaContainer

        kafka = (
            KafkaContainer(image)
            .with_kraft()
            .with_env("KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", "1")
            .with_env("KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "1")
            .with_env("KAFKA_AUTO_CREATE_TOPICS_ENABLE", "true")
        )
        kafka.start(timeout=120)
        return kafka, kafka.get_bootstrap_server()

    import time

    from kafka_local import KafkaLocalError, probe_metadata
    from testcontainers.core.container import DockerContainer

    # docker/kafka/kafka-start.sh takes KAFKA_* properties; the port is the same inside and
    # outside, so the advertised listener is right for clients on this host.
    port = _free_port()
    container = (
        DockerContainer(image)
        .with_env("KAFKA_LISTENERS", f"PLAINTEXT://:{port},CONTROLLER://localhost:9093")
        .with_env("KAFKA_ADVERTISED_LISTENERS", f"PLAINTEXT://127.0.0.1:{port}")
        .with_env("KAFKA_HEAP_OPTS", "-Xms256m -Xmx1g")
        .with_bind_ports(port, port)
        .with_kwargs(labels={"semroute-stream.tests": "kafka"})
    )
    container.start()
    deadline = time.monotonic() + 120
    last: Exception = RuntimeError("no answer yet")
    while True:
        try:
            brokers = probe_metadata("127.0.0.1", port)["brokers"]
            if isinstance(brokers, list) and any(b[2] == port for b in brokers):
                return container, f"127.0.0.1:{port}"
            last = RuntimeError(f"metadata lists no broker on port {port}: {brokers}")
        except (OSError, KafkaLocalError, ValueError) as exc:
            last = exc
        wrapped = container.get_wrapped_container()
        wrapped.reload()
        if wrapped.status == "exited" or time.monotonic() > deadline:
            logs = b"".join(container.get_logs()).decode(errors="replace")[-3000:]
            container.stop()
            raise RuntimeError(f"{image} not ready ({wrapped.status}, {last}):\n{logs}")
        time.sleep(0.5)


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """Bootstrap servers (``"host:port"``) of a real Kafka broker for the whole session."""
    env = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if env:
        yield env
        return
    required = os.environ.get("SEMROUTE_REQUIRE_TESTCONTAINERS") == "1"
    if required and not _docker_engine_answers():
        raise RuntimeError("SEMROUTE_REQUIRE_TESTCONTAINERS=1 but no Docker engine answers")
    if _docker_engine_answers():
        image = os.environ.get("KAFKA_TEST_IMAGE", "confluentinc/cp-kafka:7.6.0")
        try:
            container, bootstrap = _start_kafka_container(image)
        except Exception as exc:  # pull or start failed: use the local broker instead
            if required:
                raise
            warnings.warn(
                f"Kafka container failed ({exc}); using tests/kafka_local.py", stacklevel=1
            )
        else:
            try:
                yield bootstrap
            finally:
                container.stop()
            return
    kafka = LocalKafka()
    started = kafka.start()
    try:
        yield kafka.bootstrap
    finally:
        if started:
            kafka.stop()


@pytest.fixture(scope="session")
def local_kafka(kafka_bootstrap: str) -> LocalKafka:
    """The local broker behind ``kafka_bootstrap``, to stop/kill/restart it in a test.

    ``local_kafka.restart()`` keeps the data dir and port; call ``local_kafka.wait()`` or
    ``start()`` again before leaving a test that stopped it. Skips on any other broker."""
    kafka = LocalKafka()
    if not kafka.is_running() or kafka.bootstrap != kafka_bootstrap:
        pytest.skip("the broker is not tests/kafka_local.py's, so it cannot be restarted")
    return kafka


def _slug(text: str, limit: int = 60) -> str:
    return re.sub(r"[^a-zA-Z0-9-]+", "-", text).strip("-")[:limit] or "t"


@pytest.fixture
async def new_topic(
    kafka_bootstrap: str, request: pytest.FixtureRequest
) -> AsyncIterator[NewTopicFactory]:
    """Async factory of fresh, uniquely named topics (deleted after the test)::

        topic = await new_topic(partitions=3)                    # -> "t-test_name-1a2b3c4d"
        topic = await new_topic(1, config={"cleanup.policy": "compact"})

    Returns once every partition has a leader in the broker's metadata."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import for_code

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap, request_timeout_ms=30000)
    await admin.start()
    created: list[str] = []

    async def make(partitions: int = 3, *, config: dict[str, str] | None = None) -> str:
        name = f"t-{_slug(request.node.name)}-{uuid.uuid4().hex[:8]}"
        resp = await admin.create_topics([NewTopic(name, partitions, 1, topic_configs=config)])
        for topic, code, *rest in resp.topic_errors:
            if code:
                raise for_code(code)(f"create topic {topic}: {rest[0] if rest else code}")
        created.append(name)
        await _wait_topic_ready(admin, name, partitions)
        return name

    try:
        yield make
    finally:
        try:
            if created:
                await admin.delete_topics(created)
        except Exception:  # the broker may be down on purpose; the topic names are unique
            pass
        await admin.close()


async def _wait_topic_ready(admin: object, topic: str, partitions: int) -> None:
    import asyncio

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while True:
        (desc,) = await admin.describe_topics([topic])  # type: ignore[attr-defined]
        parts = desc.get("partitions", [])
        if (
            desc.get("error_code") == 0
            and len(parts) == partitions
            and all(p["error_code"] == 0 and p["leader"] >= 0 for p in parts)
        ):
            return
        if loop.time() > deadline:
            raise TimeoutError(f"topic {topic} not ready after 30s: {desc}")
        await asyncio.sleep(0.1)


@pytest.fixture
def llm_stub() -> Iterator[LLMStub]:
    """A started OpenAI-compatible stub on 127.0.0.1 (``llm_stub.url`` ends in ``/v1``)."""
    with LLMStub() as stub:
        yield stub
