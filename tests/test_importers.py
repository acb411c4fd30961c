"""Importing semantic-router and LiteLLM route files (``import_routes`` and
``semroute-stream import-routes``): what is mapped, what is warned about, what fails."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from fakes import FakeEncoder

from semroute_stream import ConfigError, Router, import_routes, load_routes
from semroute_stream._cli import main


def aurelio_route(name: str, utterances: list[Any], **extra: Any) -> dict[str, Any]:
    route: dict[str, Any] = {
        "name": name,
        "utterances": utterances,
        "description": None,
        "function_schemas": None,
        "llm": None,
        "score_threshold": None,
        "metadata": {},
    }
    return {**route, **extra}


def aurelio_export(**overrides: Any) -> dict[str, Any]:
    """What semantic-router's ``RouterConfig.to_json`` writes."""
    config = {
        "encoder_type": "openai",
        "encoder_name": "text-embedding-3-small",
        "routes": [
            aurelio_route(
                "billing",
                ["charged twice on my invoice", "refund my payment"],
                description="billing questions",
                score_threshold=0.42,
                metadata={"team": "billing"},
                llm={
                    "module": "semantic_router.llms.openai",
                    "class": "OpenAILLM",
                    "model": "gpt-4o-mini",
                },
                function_schemas=[{"name": "get_invoice", "parameters": {}}],
            ),
            aurelio_route("shipping", ["where is my parcel", "track my delivery"]),
        ],
    }
    return {**config, **overrides}


def write(path: Path, data: Any) -> Path:
    text = json.dumps(data) if path.suffix == ".json" else yaml.safe_dump(data)
    path.write_text(text, encoding="utf-8")
    return path


# --- semantic-router -----------------------------------------------------------------------


def test_aurelio_maps_threshold_model_and_description(tmp_path: Path) -> None:
    routes, warnings = import_routes(write(tmp_path / "layer.json", aurelio_export()), "aurelio")
    billing, shipping = routes.routes
    assert billing.threshold == 0.42 and shipping.threshold is None
    assert billing.model == "gpt-4o-mini"
    assert billing.metadata == {"description": "billing questions", "team": "billing"}
    assert routes.method == "top5_mean"
    assert any("function_schemas: dropped" in w and "billing" in w for w in warnings)
    assert any("OpenAILLM" in w for w in warnings)
    assert any("text-embedding-3-small" in w and "thresholds" in w for w in warnings)
    # The imported threshold is the one the router uses (not the default).
    table = Router(routes, FakeEncoder(), cache=False).table
    assert table.thresholds.tolist() == pytest.approx([0.42, 0.5])


def test_aurelio_yaml_list_with_minilm_has_no_encoder_warning(tmp_path: Path) -> None:
    data = {
        "encoder_type": "huggingface",
        "encoder_name": None,
        "routes": [aurelio_route("a", ["hello there"], score_threshold=0.6, colour="red")],
    }
    routes, warnings = import_routes(write(tmp_path / "layer.yaml", data))
    assert routes.routes[0].threshold == 0.6
    assert "colour" not in routes.routes[0].metadata
    assert warnings == ["routes[0] (name 'a'): colour: dropped (not a semantic-router route field)"]
    bare, bare_warnings = import_routes(write(tmp_path / "list.yaml", [aurelio_route("b", ["x"])]))
    assert bare.names == ("b",) and bare_warnings == []


@pytest.mark.parametrize(
    ("routes", "message"),
    [
        ([aurelio_route("a", ["x"]), aurelio_route("a", ["y"])], "duplicate route name"),
        ([aurelio_route("a", [])], "utterances: an empty list"),
        ([aurelio_route("a", ["x"], score_threshold=1.5)], "1.5 is outside [-1, 1]"),
        ([aurelio_route("a", ["x", {"image": 1}])], "utterances[1]: not a non-blank string"),
        ([aurelio_route("", ["x"])], "name: missing or blank"),
    ],
)
def test_aurelio_conflicts_fail(tmp_path: Path, routes: list[Any], message: str) -> None:
    path = write(tmp_path / "bad.json", {"encoder_type": "huggingface", "routes": routes})
    with pytest.raises(ConfigError) as caught:
        import_routes(path, "aurelio")
    assert message in str(caught.value) and "bad.json" in str(caught.value)


def test_unknown_format_fails(tmp_path: Path) -> None:
    path = write(tmp_path / "what.yaml", {"something": 1})
    with pytest.raises(ConfigError, match="cannot tell the format"):
        import_routes(path)


# --- LiteLLM -------------------------------------------------------------------------------


def litellm_config(router_params: dict[str, Any]) -> dict[str, Any]:
    return {
        "model_list": [
            {
                "model_name": "embedder",
                "litellm_params": {"model": "openai/text-embedding-3-large", "api_key": "k"},
            },
            {
                "model_name": "billing",
                "litellm_params": {
                    "model": "openai/gpt-4.1",
                    "api_base": "https://llm.example/v1",
                    "api_key": "os.environ/OPENAI_API_KEY",
                    "rpm": 10,
                },
                "model_info": {"id": "b1"},
            },
            {"model_name": "shipping", "litellm_params": {"model": "anthropic/claude"}},
            {"model_name": "cheap", "litellm_params": {"model": "openai/gpt-4o-mini"}},
            {"model_name": "unused", "litellm_params": {"model": "openai/o3"}},
            {
                "model_name": "auto1",
                "litellm_params": {"model": "auto_router/auto1", **router_params},
            },
        ],
        "router_settings": {"routing_strategy": "simple-shuffle", "num_retries": 2},
        "litellm_settings": {"drop_params": True},
    }


def test_litellm_auto_router_from_its_config_path(tmp_path: Path) -> None:
    write(tmp_path / "router.json", aurelio_export(encoder_name="text-embedding-3-large"))
    params = {
        "auto_router_config_path": "router.json",
        "auto_router_default_model": "cheap",
        "auto_router_embedding_model": "embedder",
    }
    routes, warnings = import_routes(write(tmp_path / "config.yaml", litellm_config(params)))
    billing, shipping = routes.routes
    assert (billing.model, shipping.model) == ("billing", "shipping")
    assert billing.threshold == 0.42
    assert billing.metadata["litellm_model"] == "openai/gpt-4.1"
    assert billing.metadata["api_base"] == "https://llm.example/v1"
    assert shipping.metadata == {"litellm_model": "anthropic/claude"}
    assert routes.fallback.model == "cheap"
    text = "\n".join(warnings)
    assert "api_key" in text and "rpm" in text and "model_info (entry)" in text
    assert "'os.environ/OPENAI_API_KEY'" not in text  # secrets are never echoed
    assert "router_settings.routing_strategy: dropped" in text
    assert "router_settings.num_retries: dropped" in text
    assert "litellm_settings: dropped" in text
    assert "model_list[4] (unused): dropped" in text
    assert "'openai/text-embedding-3-large'" in text  # the embedding model's thresholds
    assert "routes[0]: llm: dropped" in text
    assert "text-embedding-3-small" not in text  # LiteLLM embeds with the embedding model


def test_litellm_inline_config(tmp_path: Path) -> None:
    inline = json.dumps({"routes": [aurelio_route("shipping", ["where is my parcel"])]})
    routes, _ = import_routes(
        write(tmp_path / "c.yaml", litellm_config({"auto_router_config": inline})), "litellm"
    )
    assert routes.names == ("shipping",) and routes.routes[0].model == "shipping"
    assert routes.fallback.model is None


def test_litellm_without_a_semantic_router_fails(tmp_path: Path) -> None:
    config = litellm_config({})
    config["model_list"] = config["model_list"][:-1]
    with pytest.raises(ConfigError, match="0 semantic auto routers"):
        import_routes(write(tmp_path / "c.yaml", config))
    missing = litellm_config({"auto_router_config_path": "nowhere.json"})
    with pytest.raises(ConfigError, match=r"nowhere\.json not found"):
        import_routes(write(tmp_path / "d.yaml", missing))


# --- the command ---------------------------------------------------------------------------


def test_import_routes_command_writes_a_loadable_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write(tmp_path / "layer.json", aurelio_export())
    out = tmp_path / "routes.yaml"
    assert main(["import-routes", "--from", "aurelio", str(source), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "imported 2 routes (1 with their own threshold" in captured.out
    assert captured.err.count("warning: ") == 3
    loaded = load_routes(out)
    assert loaded.routes[0].threshold == 0.42 and loaded.method == "top5_mean"
    router = Router(loaded, FakeEncoder(), cache=False)
    assert np.isclose(router.table.thresholds[0], 0.42)


def test_import_routes_command_exits_2_on_a_conflict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = aurelio_export(routes=[aurelio_route("a", ["x"]), aurelio_route("a", ["y"])])
    out = tmp_path / "routes.yaml"
    assert main(["import-routes", str(write(tmp_path / "l.json", data)), "--out", str(out)]) == 2
    assert "duplicate route name" in capsys.readouterr().err
    assert not out.exists()
