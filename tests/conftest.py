"""Shared fixtures: a real Kafka broker, fresh topics on it, and a stand-in LLM endpoint.

``kafka_bootstrap`` (session) -> ``"host:port"`` of a real broker, chosen in this order:
    1. ``KAFKA_BOOTSTRAP_SERVERS`` if set (``tests/kafka_local.py run -- ...`` sets it);
    2. a testcontainers ``KafkaContainer`` in KRaft mode if a Docker engine answers
       (image: ``KAFKA_TEST_IMAGE``, default confluentinc/cp-kafka:7.6.0);
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


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """Bootstrap servers (``"host:port"``) of a real Kafka broker for the whole session."""
    env = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if env:
        yield env
        return
    if _docker_engine_answers():
        try:
            from testcontainers.community.kafka import KafkaContainer

            image = os.environ.get("KAFKA_TEST_IMAGE", "confluentinc/cp-kafka:7.6.0")
            container = (
                KafkaContainer(image)
                .with_kraft()
                .with_env("KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", "1")
                .with_env("KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "1")
                .with_env("KAFKA_AUTO_CREATE_TOPICS_ENABLE", "true")
            )
            container.start(timeout=120)
        except Exception as exc:  # pull or start failed: use the local broker instead
            warnings.warn(
                f"Kafka container failed ({exc}); using tests/kafka_local.py", stacklevel=1
            )
        else:
            try:
                yield container.get_bootstrap_server()
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
