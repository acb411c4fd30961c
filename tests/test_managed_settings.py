"""Managed Kafka settings without a broker: client options, OAUTHBEARER token providers,
GSSAPI, TLS files, and the .env / secrets-directory sources with their precedence."""

from __future__ import annotations

import importlib.util
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from aiokafka.abc import AbstractTokenProvider
from aiokafka.codec import has_lz4
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.coordinator.assignors.sticky.sticky_assignor import StickyPartitionAssignor

from semroute_stream._errors import ConfigError
from semroute_stream._service.kafka import (
    connection_kwargs,
    make_admin,
    make_consumer,
    make_producer,
    token_provider,
)
from semroute_stream._service.settings import KafkaConfig, load_settings

MINIMAL = """
routes: routes.yaml
input: {topic: in}
output: {responses_topic: out, dlq_topic: dlq}
"""


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SEMROUTE_ENV_FILE", "SEMROUTE_SECRETS_DIR", "SEMROUTE_KAFKA__CLIENT_ID"):
        monkeypatch.delenv(name, raising=False)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "service.yaml"
    path.write_text(MINIMAL + text)
    return path


# ---- client options ------------------------------------------------------------------------


async def test_client_options_reach_each_client(tmp_path: Path) -> None:
    s = load_settings(
        write(
            tmp_path,
            "kafka:\n  client_options:\n"
            "    consumer: {fetch_max_bytes: 1234567, max_partition_fetch_bytes: 65536,\n"
            "               client_rack: eu-west-1a,\n"
            "               partition_assignment_strategy: [sticky, range],\n"
            "               request_timeout_ms: 41000}\n"
            "    producer: {compression_type: gzip, linger_ms: 50, request_timeout_ms: 42000}\n"
            "    admin: {request_timeout_ms: 43000}\n",
        )
    )
    consumer, producer, admin = make_consumer(s), make_producer(s), make_admin(s)
    try:
        assert consumer._fetch_max_bytes == 1234567
        assert consumer._max_partition_fetch_bytes == 65536
        assert consumer._client_rack == "eu-west-1a"
        assert consumer._partition_assignment_strategy == (
            StickyPartitionAssignor,
            RangePartitionAssignor,
        )
        assert consumer._client._request_timeout_ms == 41000
        assert consumer._isolation_level == "read_committed"  # the router's own, untouched
        assert producer._compression_type == "gzip"
        assert producer._request_timeout_ms == 42000
        assert producer._max_request_size == 4 * 1024 * 1024  # the router's default kept
        assert admin._client._request_timeout_ms == 43000
    finally:
        await consumer.stop()
        await producer.stop()
        await admin.close()


def test_one_strategy_by_name(tmp_path: Path) -> None:
    text = "kafka: {client_options: {consumer: {partition_assignment_strategy: range}}}\n"
    s = load_settings(write(tmp_path, text))
    assert s.kafka.client_options.consumer.kwargs()["partition_assignment_strategy"] == (
        RangePartitionAssignor,
    )


def test_unknown_option_is_named_with_the_allowed_ones(tmp_path: Path) -> None:
    path = write(tmp_path, "kafka: {client_options: {consumer: {fetch_max_byte: 1}}}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert message.startswith(f"{path}: kafka.client_options.consumer: ")
    assert "unknown consumer option 'fetch_max_byte'; allowed: check_crcs, client_rack, " in (
        message
    )
    assert "fetch_max_bytes" in message and "max_partition_fetch_bytes" in message


@pytest.mark.parametrize(
    ("client", "option", "reason"),
    [
        ("consumer", "enable_auto_commit: true", "commits an offset only once its outcome"),
        ("consumer", "isolation_level: read_uncommitted", "read_committed"),
        ("producer", "acks: 1", "every in-sync replica"),
        ("producer", "enable_idempotence: false", "must not duplicate outcomes"),
        ("admin", "security_protocol: SSL", "kafka.security_protocol"),
    ],
)
def test_options_the_router_sets_are_refused_with_the_reason(
    tmp_path: Path, client: str, option: str, reason: str
) -> None:
    key = option.split(":")[0]
    path = write(tmp_path, f"kafka: {{client_options: {{{client}: {{{option}}}}}}}\n")
    with pytest.raises(ConfigError, match=f"'{key}' cannot be set for the {client}: ") as info:
        load_settings(path)
    assert reason in str(info.value)


@pytest.mark.parametrize(
    ("option", "problem"),
    [
        ("partition_assignment_strategy: cooperative-sticky", "'range', 'roundrobin' or 'sticky'"),
        ("fetch_max_wait_ms: -1", "greater than or equal to 0"),
        ("client_rack: ''", "at least 1 character"),
    ],
)
def test_bad_option_values(tmp_path: Path, option: str, problem: str) -> None:
    path = write(tmp_path, f"kafka: {{client_options: {{consumer: {{{option}}}}}}}\n")
    with pytest.raises(ConfigError, match=problem):
        load_settings(path)


def test_compression_codec_needs_its_library(tmp_path: Path) -> None:
    path = write(tmp_path, "kafka: {client_options: {producer: {compression_type: lz4}}}\n")
    if has_lz4():
        assert load_settings(path).kafka.client_options.producer.compression_type == "lz4"
    else:
        with pytest.raises(ConfigError, match="needs the cramjam package"):
            load_settings(path)


# ---- SASL ------------------------------------------------------------------------------------

PROVIDERS = """
import asyncio
from aiokafka.abc import AbstractTokenProvider

class Provider(AbstractTokenProvider):
    async def token(self):
        return "from-class"

instance = Provider()

def factory():
    return Provider()

calls = []

def sync_token():
    calls.append(1)
    return f"sync-{len(calls)}"

async def async_token():
    await asyncio.sleep(0)
    return "async-token"

def not_a_token():
    return 42

namespace = type("N", (), {"token": staticmethod(sync_token)})
"""


@pytest.fixture
def providers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"tokens_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(PROVIDERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


@pytest.mark.parametrize(
    ("attr", "tokens"),
    [
        ("instance", ["from-class"]),
        ("Provider", ["from-class"]),
        ("factory", ["from-class"]),
        ("sync_token", ["sync-1", "sync-2"]),  # called once to learn what it is, then again
        ("async_token", ["async-token", "async-token"]),
        ("namespace.token", ["sync-1"]),
    ],
)
async def test_token_provider_forms(providers: str, attr: str, tokens: list[str]) -> None:
    provider = token_provider(f"{providers}:{attr}")
    assert isinstance(provider, AbstractTokenProvider)
    assert [await provider.token() for _ in tokens] == tokens
    assert token_provider(f"{providers}:{attr}") is provider  # shared by every client


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
        ("{mod}:missing", "has no 'missing'"),
        ("{mod}:not_a_token", "returned int; expected an aiokafka.abc.AbstractTokenProvider"),
        ("{mod}:calls", "is a list, not a callable"),
    ],
)
def test_bad_token_providers_fail_at_start_up(providers: str, spec: str, problem: str) -> None:
    cfg = KafkaConfig(
        security_protocol="SASL_SSL",
        sasl_mechanism="OAUTHBEARER",
        sasl_oauth_token_provider=spec.format(mod=providers),
    )
    with pytest.raises(ConfigError, match=f"kafka.sasl_oauth_token_provider: .*{problem}"):
        connection_kwargs(cfg)


def test_oauthbearer_kwargs(providers: str) -> None:
    cfg = KafkaConfig(
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="OAUTHBEARER",
        sasl_oauth_token_provider=f"{providers}:factory",
    )
    kwargs = connection_kwargs(cfg)
    assert kwargs["sasl_mechanism"] == "OAUTHBEARER"
    assert isinstance(kwargs["sasl_oauth_token_provider"], AbstractTokenProvider)
    assert "sasl_plain_password" not in kwargs


@pytest.mark.parametrize(
    ("kafka", "problem"),
    [
        ("{security_protocol: SASL_SSL, sasl_mechanism: OAUTHBEARER}", "needs sasl_oauth_token"),
        (
            "{security_protocol: SASL_SSL, sasl_mechanism: OAUTHBEARER, "
            "sasl_oauth_token_provider: 'not a spec'}",
            "expected module:callable",
        ),
        ("{security_protocol: SASL_SSL}", "needs sasl_mechanism"),
        ("{sasl_mechanism: PLAIN}", "needs security_protocol SASL_SSL or SASL_PLAINTEXT"),
        ("{security_protocol: SSL, ssl_keyfile: k.pem}", "ssl_keyfile needs ssl_certfile"),
    ],
)
def test_incomplete_security_settings(tmp_path: Path, kafka: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        load_settings(write(tmp_path, f"kafka: {kafka}\n"))


def test_gssapi(tmp_path: Path) -> None:
    s = load_settings(
        write(
            tmp_path,
            "kafka: {security_protocol: SASL_PLAINTEXT, sasl_mechanism: GSSAPI,\n"
            "        sasl_kerberos_service_name: kafka-svc, sasl_kerberos_domain_name: corp}\n",
        )
    )
    if importlib.util.find_spec("gssapi") is None:
        with pytest.raises(ConfigError, match="GSSAPI needs the gssapi package"):
            connection_kwargs(s.kafka)
    else:
        kwargs = connection_kwargs(s.kafka)
        assert kwargs["sasl_kerberos_service_name"] == "kafka-svc"
        assert kwargs["sasl_kerberos_domain_name"] == "corp"


# ---- TLS -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client_cert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A self-signed client certificate with a key encrypted by 'key-pass'."""
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-days", "1", "-subj", "/CN=client",
         "-keyout", "key.pem", "-out", "cert.pem", "-passout", "pass:key-pass"],
        cwd=d, check=True, capture_output=True,
    )  # fmt: skip
    return d


def test_tls_files_with_a_key_password(client_cert: Path, tmp_path: Path) -> None:
    text = (
        f"kafka: {{security_protocol: SSL, ssl_cafile: {client_cert / 'cert.pem'},\n"
        f"        ssl_certfile: {client_cert / 'cert.pem'},\n"
        f"        ssl_keyfile: {client_cert / 'key.pem'},\n"
        "        ssl_key_password: key-pass}\n"
    )
    s = load_settings(write(tmp_path, text))
    assert "key-pass" not in repr(s) and "key-pass" not in str(s.model_dump())
    context = connection_kwargs(s.kafka)["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.check_hostname is True and context.verify_mode == ssl.CERT_REQUIRED

    no_check = s.kafka.model_copy(update={"ssl_check_hostname": False})
    context = connection_kwargs(no_check)["ssl_context"]
    assert context.check_hostname is False
    assert context.verify_mode == ssl.CERT_REQUIRED  # the chain is still verified


def test_wrong_key_password_names_the_setting(client_cert: Path, tmp_path: Path) -> None:
    cfg = KafkaConfig(
        security_protocol="SSL",
        ssl_certfile=client_cert / "cert.pem",
        ssl_keyfile=client_cert / "key.pem",
        ssl_key_password="not-the-pass",  # type: ignore[arg-type]
    )
    with pytest.raises(ConfigError) as info:
        connection_kwargs(cfg)
    message = str(info.value)
    assert "kafka TLS files cannot be used" in message
    assert "kafka.ssl_keyfile=" in message and "kafka.ssl_key_password" in message
    assert "not-the-pass" not in message


def test_missing_ca_file(tmp_path: Path) -> None:
    cfg = KafkaConfig(security_protocol="SSL", ssl_cafile=tmp_path / "nope.pem")
    with pytest.raises(ConfigError, match=r"check kafka.ssl_cafile=.*nope.pem"):
        connection_kwargs(cfg)


# ---- .env and secret files -------------------------------------------------------------------


def test_precedence_env_over_dotenv_over_secrets_over_yaml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(
        tmp_path,
        "secrets_dir: run-secrets\n"
        "kafka: {client_id: from-yaml, bootstrap_servers: yaml:9092, metadata_max_age_ms: 5000}\n"
        "batching: {linger_ms: 1}\n",
    )
    secrets = tmp_path / "run-secrets"
    secrets.mkdir()
    (secrets / "kafka__client_id").write_text("from-secret\n")
    (secrets / "KAFKA__BOOTSTRAP_SERVERS").write_text("secret:9092")  # any case
    (secrets / "batching__linger_ms").write_text("2")
    (secrets / "unrelated_key").write_text("other apps' secrets are skipped")
    (secrets / "..data").mkdir()  # Kubernetes' own entries
    dotenv = tmp_path / ".env"
    dotenv.write_text(
        "SEMROUTE_KAFKA__CLIENT_ID=from-dotenv\nSEMROUTE_BATCHING__LINGER_MS=3\nOTHER_TOOL=1\n"
    )
    monkeypatch.setenv("SEMROUTE_KAFKA__CLIENT_ID", "from-env")

    s = load_settings(path)
    assert s.kafka.client_id == "from-env"  # environment > .env
    assert s.batching.linger_ms == 3  # .env > secret file
    assert s.kafka.bootstrap_servers == "secret:9092"  # secret file > YAML
    assert s.kafka.metadata_max_age_ms == 5000  # the YAML's other fields survive
    assert s.secrets_dir == secrets

    monkeypatch.delenv("SEMROUTE_KAFKA__CLIENT_ID")
    assert load_settings(path).kafka.client_id == "from-dotenv"
    dotenv.unlink()
    s = load_settings(path)
    assert s.kafka.client_id == "from-secret" and s.batching.linger_ms == 2
    (secrets / "kafka__client_id").unlink()
    assert load_settings(path).kafka.client_id == "from-yaml"


def test_secret_password_file_and_named_env_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets = tmp_path / "k8s"
    secrets.mkdir()
    (secrets / "kafka__sasl_password").write_text("s3cret\n")
    envfile = tmp_path / "elsewhere.env"
    envfile.write_text("SEMROUTE_KAFKA__SASL_USERNAME=router\n")
    monkeypatch.setenv("SEMROUTE_SECRETS_DIR", str(secrets))
    monkeypatch.setenv("SEMROUTE_ENV_FILE", str(envfile))
    path = write(tmp_path, "kafka: {security_protocol: SASL_SSL, sasl_mechanism: SCRAM-SHA-256}\n")
    s = load_settings(path)
    assert s.kafka.sasl_username == "router"
    assert s.kafka.sasl_password is not None
    assert s.kafka.sasl_password.get_secret_value() == "s3cret"  # stripped of its newline
    assert "s3cret" not in repr(s)


def test_bad_env_file_and_secrets_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "")
    monkeypatch.setenv("SEMROUTE_ENV_FILE", str(tmp_path / "missing.env"))
    with pytest.raises(ConfigError, match=r"SEMROUTE_ENV_FILE=.*missing\.env: no such file"):
        load_settings(path)
    monkeypatch.delenv("SEMROUTE_ENV_FILE")
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("SEMROUTE_SECRETS_DIR", str(tmp_path / "file"))
    with pytest.raises(ConfigError, match=f"{path}: secrets_dir: .*file is not a directory"):
        load_settings(path)


def test_typo_in_dotenv_is_reported(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("SEMROUTE_KAFKA__CLIENT_IDD=x\n")
    with pytest.raises(ConfigError, match=r"kafka\.client_idd: Extra inputs are not permitted"):
        load_settings(write(tmp_path, ""))


def test_check_exits_2_on_a_bad_option(tmp_path: Path) -> None:
    path = write(tmp_path, "kafka: {client_options: {producer: {acks: 0}}}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "semroute_stream", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "'acks' cannot be set for the producer" in proc.stdout
