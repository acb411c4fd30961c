"""Service config: YAML + SEMROUTE_* environment overrides, fail-fast errors, secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from semroute_stream._errors import ConfigError
from semroute_stream._service.settings import load_settings

REPO = Path(__file__).resolve().parents[1]

MINIMAL = """
routes: routes.yaml
input: {topic: in}
output: {responses_topic: out, dlq_topic: dlq}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "service.yaml"
    path.write_text(text)
    return path


def test_example_configs_load() -> None:
    for name in ("service.example.yaml", "service.docker.yaml"):
        s = load_settings(REPO / "config" / name)
        assert s.routes == REPO / "config" / "routes.example.yaml"
        assert s.routes.exists()
        assert set(s.endpoints) >= {"support-llm", "general-llm"}


def test_defaults_and_relative_routes_path(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, MINIMAL))
    assert s.routes == tmp_path / "routes.yaml"
    assert s.input.auto_offset_reset == "earliest"
    assert s.batching.max_size == 256
    assert s.mode == "llm"


def test_environment_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEMROUTE_KAFKA__BOOTSTRAP_SERVERS", "broker:1234")
    monkeypatch.setenv("SEMROUTE_BATCHING__MAX_SIZE", "8")
    monkeypatch.setenv("SEMROUTE_MODE", "route_only")
    s = load_settings(write(tmp_path, MINIMAL + "batching: {max_size: 32, linger_ms: 7}\n"))
    assert s.kafka.bootstrap_servers == "broker:1234"
    assert s.batching.max_size == 8
    assert s.batching.linger_ms == 7  # untouched fields of the section survive
    assert s.mode == "route_only"


def test_errors_name_file_field_and_reason(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        MINIMAL + "batching: {max_size: 0}\nflow: {max_in_flght: 3}\nmode: fast\n",
    )
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "batching.max_size" in msg and "greater than or equal to 1" in msg
    assert "flow.max_in_flght" in msg  # typo'd field rejected, not ignored
    assert "mode" in msg


def test_missing_sections_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="input: Field required"):
        load_settings(write(tmp_path, "routes: r.yaml\noutput: {responses_topic: a, dlq_topic: b}"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(write(tmp_path, "routes: [unclosed"))
    with pytest.raises(ConfigError, match="cannot read config"):
        load_settings(tmp_path / "nope.yaml")


def test_sasl_password_is_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEMROUTE_KAFKA__SASL_PASSWORD", "hunter2")
    text = MINIMAL + (
        "kafka: {security_protocol: SASL_SSL, sasl_mechanism: SCRAM-SHA-512, sasl_username: u}\n"
    )
    s = load_settings(write(tmp_path, text))
    assert s.kafka.sasl_password is not None
    assert s.kafka.sasl_password.get_secret_value() == "hunter2"
    assert "hunter2" not in repr(s) and "hunter2" not in str(s.model_dump())


def test_sasl_without_password_fails(tmp_path: Path) -> None:
    text = MINIMAL + "kafka: {security_protocol: SASL_PLAINTEXT, sasl_mechanism: PLAIN}\n"
    with pytest.raises(ConfigError, match="SASL needs"):
        load_settings(write(tmp_path, text))


def _run(config: Path) -> tuple[int, str]:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "semroute_stream", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc.returncode, proc.stderr


def test_run_fails_fast_on_bad_config(tmp_path: Path) -> None:
    code, err = _run(write(tmp_path, MINIMAL + "batching: {linger_ms: -1}\n"))
    assert code == 2
    assert "service.yaml" in err and "batching.linger_ms" in err
    assert "Traceback" not in err


def test_run_fails_fast_on_unknown_endpoint(tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(
        "fallback: {name: other, endpoint: nowhere}\n"
        "routes:\n  - {name: a, utterances: [hello], endpoint: nowhere}\n"
    )
    code, err = _run(write(tmp_path, MINIMAL))
    assert code == 2
    assert "routes.yaml" in err and "'nowhere' is not defined" in err
