"""The routes file (semroute_stream._routing.schema): schema, validation messages, round trips."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from semroute_stream._errors import ConfigError
from semroute_stream._routing.schema import (
    HeadConfig,
    RoutesConfig,
    load_routes,
    routes_version,
    save_routes,
)

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"
EXAMPLE = REPO / "config" / "routes.example.yaml"


def base() -> dict[str, Any]:
    return {
        "default_threshold": 0.5,
        "method": "max",
        "top_k": 3,
        "fallback": {"name": "fallback", "endpoint": "general-llm"},
        "routes": [
            {"name": "billing", "utterances": ["i was charged twice"], "threshold": 0.45},
            {"name": "shipping", "utterances": ["where is my parcel", "late delivery"]},
        ],
    }


def write(tmp_path: Path, data: Any, name: str = "routes.yaml") -> Path:
    path = tmp_path / name
    if name.endswith(".json"):
        path.write_text(json.dumps(data))
    else:
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def load_error(tmp_path: Path, data: Any, name: str = "routes.yaml") -> str:
    path = write(tmp_path, data, name)
    with pytest.raises(ConfigError) as info:
        load_routes(path)
    message = str(info.value)
    assert info.value.file == str(path)
    for line in message.splitlines():
        assert line.startswith(f"{path}: "), message
    return message


def test_loads_a_valid_file_with_defaults(tmp_path: Path) -> None:
    data = base()
    del data["default_threshold"], data["method"], data["top_k"], data["fallback"]
    cfg = load_routes(write(tmp_path, data))
    # No method: auto (resolved when the routes load); no default threshold: the method's.
    assert cfg.default_threshold is None and cfg.method == "auto" and cfg.top_k == 3
    assert cfg.head == HeadConfig()
    assert cfg.fallback.name == "fallback" and cfg.fallback.endpoint is None
    assert cfg.names == ("billing", "shipping")
    assert cfg.thresholds() == [0.45, 0.5]
    assert cfg.routes[1].metadata == {} and cfg.routes[1].endpoint is None


def test_threshold_out_of_range_names_file_route_and_field(tmp_path: Path) -> None:
    data = base()
    data["routes"].append({"name": "x", "utterances": ["a"]})
    data["routes"].append({"name": "refunds", "utterances": ["money back"], "threshold": 1.5})
    message = load_error(tmp_path, data)
    assert "routes[3] (name 'refunds'): threshold: Input should be less than or equal to 1" in (
        message
    )


def test_duplicate_route_names(tmp_path: Path) -> None:
    data = base()
    data["routes"].append({"name": "billing", "utterances": ["refund please"]})
    message = load_error(tmp_path, data)
    assert "routes[2] (name 'billing'): name: duplicate route name (first at routes[0])" in message


def test_empty_and_blank_utterances(tmp_path: Path) -> None:
    data = base()
    data["routes"][0]["utterances"] = []
    data["routes"][1]["utterances"] = ["fine", "   "]
    message = load_error(tmp_path, data)
    lines = message.splitlines()
    assert len(lines) == 2
    assert "routes[0] (name 'billing'): utterances: List should have at least 1 item" in lines[0]
    assert "routes[1] (name 'shipping'): utterances[1]: must not be blank" in lines[1]


def test_unknown_method(tmp_path: Path) -> None:
    data = base()
    data["method"] = "mean_of_everything"
    message = load_error(tmp_path, data)
    assert (
        "method: unknown method 'mean_of_everything' (known: auto, max, top5_mean, head)" in message
    )


def test_fallback_name_must_not_be_a_route_name(tmp_path: Path) -> None:
    data = base()
    data["fallback"]["name"] = "shipping"
    message = load_error(tmp_path, data)
    assert "fallback: name: 'shipping' is also the name of routes[1]" in message


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"routes": []}, "routes: List should have at least 1 item"),
        ({"top_k": 0}, "top_k: Input should be greater than or equal to 1"),
        ({"default_threshold": -2}, "default_threshold: Input should be greater than or equal"),
        ({"default_treshold": 0.3}, "unknown field 'default_treshold' (did you mean"),
        ({"treshold_default": 0.3}, "unknown field 'treshold_default' (known: default_threshold,"),
        ({"notes": "x"}, "unknown field 'notes' (known: default_threshold, description,"),
        ({"fallback": {"name": "x", "endpont": "y"}}, "fallback: endpont: Extra inputs"),
    ],
)
def test_other_top_level_problems(tmp_path: Path, change: dict[str, Any], expected: str) -> None:
    assert expected in load_error(tmp_path, {**base(), **change})


def test_route_level_problems(tmp_path: Path) -> None:
    data = base()
    data["routes"][1]["treshold"] = 0.3
    data["routes"][0]["name"] = " "
    message = load_error(tmp_path, data)
    assert "routes[1] (name 'shipping'): unknown field 'treshold' (did you mean 'threshold'?)" in (
        message
    )
    assert "routes[0] (name ' '): name: route name must not be blank" in message


def test_broken_files(tmp_path: Path) -> None:
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("routes: [\n  - name: a\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: line \d+: invalid YAML"):
        load_routes(bad_yaml)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"routes": [}')
    with pytest.raises(ConfigError, match=r"bad\.json: line 1: invalid JSON"):
        load_routes(bad_json)
    with pytest.raises(ConfigError, match="expected a mapping at the top, got list"):
        load_routes(write(tmp_path, ["a"]))
    with pytest.raises(ConfigError, match="cannot read routes file"):
        load_routes(tmp_path / "missing.yaml")


def test_route_extras_go_into_metadata_and_top_level_extras_are_ignored(tmp_path: Path) -> None:
    data = base()
    data["source"] = "somewhere"
    data["routes"][0]["domain"] = "banking"
    data["routes"][0]["metadata"] = {"team": "billing"}
    cfg = load_routes(write(tmp_path, data, "r.json"))
    assert cfg.routes[0].metadata == {"domain": "banking", "team": "billing"}
    assert not hasattr(cfg, "source")


@pytest.mark.parametrize(
    ("path", "n_routes", "meta_key"),
    [
        ("clinc150/routes.json", 150, "domain"),
        ("clinc150/domain_routes.json", 10, "intents"),
        ("banking77/routes.json", 77, "domain"),
    ],
)
def test_loads_the_shared_datasets_as_they_are(path: str, n_routes: int, meta_key: str) -> None:
    file = DATASETS / path
    if not file.exists():
        pytest.skip(f"{file} is not here")
    cfg = load_routes(file)
    assert len(cfg.routes) == n_routes
    assert all(meta_key in route.metadata for route in cfg.routes)
    assert all(route.utterances for route in cfg.routes)


@pytest.mark.parametrize("name", ["out.yaml", "out.yml", "out.json"])
def test_save_load_round_trip(tmp_path: Path, name: str) -> None:
    data = base()
    data["routes"][0].update(
        {"metadata": {"team": "billing", "tags": ["a", "b"]}, "system_prompt": "Be brief."}
    )
    data["routes"][1]["utterances"].append("où est mon colis ? ünïcödé")
    cfg = RoutesConfig.model_validate(data)
    out = tmp_path / "sub" / name
    save_routes(cfg, out)
    text = out.read_text(encoding="utf-8")
    if name.endswith(".json"):
        json.loads(text)
    else:
        assert text.lstrip().startswith("default_threshold")
    again = load_routes(out)
    assert again == cfg
    assert routes_version(again) == routes_version(cfg)
    assert list(tmp_path.joinpath("sub").iterdir()) == [out]  # no temp file left behind


def test_routes_version_follows_the_content() -> None:
    cfg = RoutesConfig.model_validate(base())
    version = routes_version(cfg)
    assert len(version) == 12 and int(version, 16) >= 0
    assert routes_version(RoutesConfig.model_validate(base())) == version

    changed_utterance = base()
    changed_utterance["routes"][1]["utterances"][0] = "where is my package"
    changed_threshold = base()
    changed_threshold["routes"][0]["threshold"] = 0.46
    changed_method = {**base(), "method": "top5_mean"}
    changed_default = {**base(), "default_threshold": 0.4}
    changed_order = base()
    changed_order["routes"].reverse()
    versions = {
        routes_version(RoutesConfig.model_validate(d))
        for d in (changed_utterance, changed_threshold, changed_method, changed_default)
    }
    versions.add(routes_version(RoutesConfig.model_validate(changed_order)))
    assert version not in versions and len(versions) == 5


def test_the_bundled_example_is_valid() -> None:
    cfg = load_routes(EXAMPLE)
    assert len(cfg.routes) >= 6
    assert all(8 <= len(route.utterances) <= 15 for route in cfg.routes)
    endpoints = {route.endpoint for route in cfg.routes} | {cfg.fallback.endpoint}
    assert endpoints <= {"support-llm", "billing-llm", "general-llm"}


def test_head_settings_and_per_route_confidence_round_trip(tmp_path: Path) -> None:
    data = base()
    data["method"] = "head"
    data["head"] = {"blend": 5, "temperature": 0.5, "min_confidence": 0.3, "min_margin": 0.1}
    data["routes"][0]["min_confidence"] = 0.6
    cfg = load_routes(write(tmp_path, data))
    assert cfg.method == "head" and cfg.head.blend == 5 and cfg.head.l2 == 1e-4
    assert cfg.routes[0].min_confidence == 0.6 and cfg.routes[1].min_confidence is None
    out = tmp_path / "again.yaml"
    save_routes(cfg, out)
    written = yaml.safe_load(out.read_text())
    # Only what differs from the defaults is written.
    assert written["head"] == {
        "blend": 5.0,
        "temperature": 0.5,
        "min_confidence": 0.3,
        "min_margin": 0.1,
    }
    assert load_routes(out) == cfg


def test_no_default_threshold_and_default_head_are_left_out_when_saved(tmp_path: Path) -> None:
    data = base()
    del data["default_threshold"], data["method"]
    cfg = RoutesConfig.model_validate(data)
    out = tmp_path / "r.json"
    save_routes(cfg, out)
    written = json.loads(out.read_text())
    assert "default_threshold" not in written and "head" not in written
    assert written["method"] == "auto"
    assert load_routes(out) == cfg
    # The effective thresholds: the file's default, else the given default, else 0.5.
    assert cfg.thresholds() == [0.45, 0.5]
    assert cfg.thresholds(0.2) == [0.45, 0.2]
    assert cfg.model_copy(update={"default_threshold": 0.3}).thresholds(0.2) == [0.45, 0.3]


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        ({"blend": -1}, "head: blend: Input should be greater than or equal to 0"),
        ({"temperature": 0}, "head: temperature: Input should be greater than 0"),
        ({"min_confidence": 1.5}, "head: min_confidence: Input should be less than or equal"),
        ({"blnd": 2}, "head: blnd: Extra inputs are not permitted"),
    ],
)
def test_bad_head_settings(tmp_path: Path, head: dict[str, Any], expected: str) -> None:
    assert expected in load_error(tmp_path, {**base(), "head": head})
