"""Route files from elsewhere: aurelio ``semantic-router`` and LiteLLM's router config.

``import_routes(path, format)`` returns a ``RoutesConfig`` and the list of warnings (one per
key that was dropped or value that may not mean the same here); a conflict (two routes with
one name, an empty utterance list, a threshold outside [-1, 1], two semantic auto routers) is
a ``ConfigError`` naming the file and the route.

* ``aurelio``: semantic-router's ``RouterConfig``/``LayerConfig`` export (``to_json`` /
  ``to_yaml``): ``{encoder_type, encoder_name, routes: [{name, utterances, description,
  function_schemas, llm, score_threshold, metadata}]}`` (a bare list of routes works too).
  ``score_threshold`` -> the route's ``threshold``, ``llm.model`` -> ``model``,
  ``description`` -> ``metadata.description``; ``function_schemas`` are dropped (warned).
* ``litellm``: a LiteLLM proxy/Router config whose ``model_list`` has a semantic auto router
  (``litellm_params.model: auto_router/...`` with ``auto_router_config_path`` or an inline
  ``auto_router_config``, in the semantic-router format above). Each route's ``model`` is its
  name (the LiteLLM model group it targets; a LiteLLM proxy answers to it), the target's
  ``litellm_params.model`` and ``api_base`` go to metadata, ``auto_router_default_model``
  becomes the fallback's ``model``. Secrets, ``router_settings`` and other settings are
  dropped (warned).

Both keep semantic-router's scoring rule (``method: top5_mean``) so imported thresholds mean
what they meant there; ``semroute-stream fit`` compares the methods on labelled data.
Thresholds tuned for another encoder than all-MiniLM-L6-v2 are warned about.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, get_args

from .._errors import ConfigError
from .schema import RoutesConfig, _config_error, parse_routes, read_data_file

__all__ = ["IMPORT_FORMATS", "ImportFormat", "detect_format", "import_routes"]

ImportFormat = Literal["auto", "aurelio", "litellm"]
IMPORT_FORMATS: tuple[ImportFormat, ...] = get_args(ImportFormat)

_AURELIO_ROUTE_KEYS = {
    "name",
    "utterances",
    "description",
    "function_schemas",
    "llm",
    "score_threshold",
    "metadata",
}
_MINILM = "all-minilm-l6-v2"
# semantic-router's default encoder name per encoder_type, when encoder_name is not given.
_DEFAULT_ENCODERS = {"huggingface": "sentence-transformers/all-MiniLM-L6-v2"}


class _Import:
    """What one import collects: warnings, and the problems that make it fail."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.warnings: list[str] = []
        self.problems: list[str] = []

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def fail(self, message: str) -> None:
        self.problems.append(message)

    def check(self) -> None:
        if self.problems:
            raise _config_error(self.source, self.problems)


def detect_format(raw: Any) -> Literal["aurelio", "litellm"] | None:
    """``litellm`` for a ``model_list``, ``aurelio`` for ``routes`` or a list, else None."""
    if isinstance(raw, dict) and "model_list" in raw:
        return "litellm"
    if isinstance(raw, list) or (isinstance(raw, dict) and "routes" in raw):
        return "aurelio"
    return None


def import_routes(
    path: str | Path, format: ImportFormat = "auto"
) -> tuple[RoutesConfig, list[str]]:
    """Read a semantic-router or LiteLLM routes file: the routes and the warnings."""
    path = Path(path)
    if format not in IMPORT_FORMATS:
        raise ConfigError(f"unknown format {format!r} (known: {', '.join(IMPORT_FORMATS)})")
    raw = read_data_file(path, "file")
    job = _Import(str(path))
    kind = detect_format(raw) if format == "auto" else format
    if kind is None:
        raise ConfigError(
            "cannot tell the format: expected semantic-router routes (a 'routes' list) or a "
            "LiteLLM config (a 'model_list'); name it with --from",
            file=str(path),
        )
    data = _from_aurelio(raw, job, "") if kind == "aurelio" else _from_litellm(raw, job, path)
    job.check()
    return parse_routes(data, job.source), job.warnings


# --- semantic-router -----------------------------------------------------------------------


def _encoder_check(job: _Import, where: str, encoder_type: Any, encoder_name: Any) -> None:
    """Warn when thresholds were tuned for an encoder other than all-MiniLM-L6-v2."""
    name = encoder_name or _DEFAULT_ENCODERS.get(str(encoder_type or "").lower())
    if name is None and not encoder_type:
        return
    if name is not None and _MINILM in str(name).lower():
        return
    named = f"{encoder_name!r}" if encoder_name else f"type {encoder_type!r}'s default"
    job.warn(
        f"{where}encoder {named}: the score thresholds were tuned for another encoder than "
        "all-MiniLM-L6-v2 (which semroute-stream uses): re-tune them (semroute-stream fit)"
    )


def _from_aurelio(raw: Any, job: _Import, where: str) -> dict[str, Any]:
    if isinstance(raw, list):
        raw = {"routes": raw}
    if not isinstance(raw, dict) or not isinstance(raw.get("routes"), list):
        job.fail(f"{where}expected a 'routes' list")
        return {}
    for key in sorted(set(raw) - {"routes", "encoder_type", "encoder_name"}):
        job.warn(f"{where}{key}: dropped (not a semroute-stream setting)")
    routes = [
        _aurelio_route(item, job, f"{where}routes[{i}]") for i, item in enumerate(raw["routes"])
    ]
    first: dict[str, int] = {}
    for i, route in enumerate(routes):
        name = route.get("name")
        if isinstance(name, str) and name in first:
            job.fail(
                f"{where}routes[{i}] (name {name!r}): duplicate route name "
                f"(first at routes[{first[name]}])"
            )
        elif isinstance(name, str):
            first[name] = i
    if not routes:
        job.fail(f"{where}routes: no routes")
    if any("threshold" in route for route in routes):
        _encoder_check(job, where, raw.get("encoder_type"), raw.get("encoder_name"))
    return {"method": "top5_mean", "routes": routes}


def _aurelio_route(item: Any, job: _Import, where: str) -> dict[str, Any]:
    if not isinstance(item, dict):
        job.fail(f"{where}: expected a mapping, got {type(item).__name__}")
        return {}
    name = item.get("name")
    if not isinstance(name, str) or not name.strip():
        job.fail(f"{where}: name: missing or blank")
    else:
        where = f"{where} (name {name!r})"
    out: dict[str, Any] = {"name": name}
    utterances = item.get("utterances")
    if not isinstance(utterances, list) or not utterances:
        job.fail(f"{where}: utterances: an empty list (a route needs at least one)")
    else:
        for j, text in enumerate(utterances):
            if not isinstance(text, str) or not text.strip():
                job.fail(f"{where}: utterances[{j}]: not a non-blank string (got {text!r:.40})")
        out["utterances"] = utterances
    threshold = item.get("score_threshold")
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, int | float):
            job.fail(f"{where}: score_threshold: not a number ({threshold!r})")
        elif not -1.0 <= threshold <= 1.0:
            job.fail(f"{where}: score_threshold: {threshold} is outside [-1, 1]")
        else:
            out["threshold"] = float(threshold)
    metadata = item.get("metadata") or {}
    if not isinstance(metadata, dict):
        job.fail(f"{where}: metadata: expected a mapping, got {type(metadata).__name__}")
        metadata = {}
    description = item.get("description")
    if description is not None and "description" in metadata:
        job.warn(f"{where}: description: dropped (metadata has its own 'description')")
    elif description is not None:
        metadata = {"description": description, **metadata}
    if metadata:
        out["metadata"] = metadata
    _aurelio_llm(item.get("llm"), out, job, where)
    if item.get("function_schemas"):
        count = len(item["function_schemas"]) if isinstance(item["function_schemas"], list) else 1
        job.warn(
            f"{where}: function_schemas: dropped ({count}; semroute-stream calls no functions)"
        )
    for key in sorted(set(item) - _AURELIO_ROUTE_KEYS):
        job.warn(f"{where}: {key}: dropped (not a semantic-router route field)")
    return out


def _aurelio_llm(llm: Any, out: dict[str, Any], job: _Import, where: str) -> None:
    if llm is None:
        return
    model = llm.get("model") if isinstance(llm, dict) else llm if isinstance(llm, str) else None
    if isinstance(model, str) and model.strip():
        out["model"] = model
        if isinstance(llm, dict) and llm.get("class"):
            job.warn(
                f"{where}: llm: the client class {llm['class']!r} is dropped (model {model!r} "
                "kept: set the route's endpoint to an OpenAI-compatible one that serves it)"
            )
    else:
        job.warn(f"{where}: llm: dropped (no model name in {llm!r:.60})")


# --- LiteLLM -------------------------------------------------------------------------------


def _params(entry: Any) -> dict[str, Any]:
    params = entry.get("litellm_params") if isinstance(entry, dict) else None
    return params if isinstance(params, dict) else {}


def _from_litellm(raw: Any, job: _Import, path: Path) -> dict[str, Any]:
    if not isinstance(raw, dict) or not isinstance(raw.get("model_list"), list):
        job.fail("expected a 'model_list' list (a LiteLLM config)")
        return {}
    entries: list[Any] = raw["model_list"]
    by_name = {e.get("model_name"): e for e in entries if isinstance(e, dict)}
    routers = []
    for i, entry in enumerate(entries):
        model = str(_params(entry).get("model", ""))
        if not model.startswith("auto_router/"):
            continue
        if "auto_router_config" in _params(entry) or "auto_router_config_path" in _params(entry):
            routers.append(i)
        else:
            job.warn(f"model_list[{i}] ({model}): dropped (not a semantic auto router)")
    if len(routers) != 1:
        names = ", ".join(repr(_name_of(entries[i])) for i in routers)
        job.fail(
            f"model_list: {len(routers)} semantic auto routers ({names or 'none'}): "
            "exactly one is needed (a routes file is one router)"
        )
        return {}
    index = routers[0]
    params = _params(entries[index])
    where = f"model_list[{index}] ({_name_of(entries[index])})"
    config = _litellm_routes(_router_config(params, job, where, path), job, where, params)
    data = _from_aurelio(config, job, f"{where}: auto router config: ") if config else {}
    embedding = params.get("auto_router_embedding_model")
    if embedding is not None and any("threshold" in r for r in data.get("routes", [])):
        target = _params(by_name.get(embedding)).get("model", embedding)
        _encoder_check(job, f"{where}: auto_router_embedding_model: ", None, target)
    used = {_name_of(entries[index]), embedding}
    for route in data.get("routes", []):
        _litellm_target(route, by_name, job)
        used.add(route.get("name"))
    default = params.get("auto_router_default_model")
    if default is not None:
        data["fallback"] = {"name": "fallback", "model": str(default)}
        used.add(default)
    for i, entry in enumerate(entries):
        if _name_of(entry) not in used:
            job.warn(f"model_list[{i}] ({_name_of(entry)}): dropped (no route targets it)")
    for key, value in raw.items():
        if key == "router_settings" and isinstance(value, dict):
            for setting in value:
                job.warn(f"router_settings.{setting}: dropped (no semroute-stream equivalent)")
        elif key != "model_list":
            job.warn(f"{key}: dropped (not a routing setting)")
    return data


def _name_of(entry: Any) -> str:
    return str(entry.get("model_name")) if isinstance(entry, dict) else "?"


def _router_config(params: dict[str, Any], job: _Import, where: str, path: Path) -> Any:
    """The auto router's semantic-router config: inline, or the file it names (relative to
    the LiteLLM config's folder, else to the working directory)."""
    inline, named = params.get("auto_router_config"), params.get("auto_router_config_path")
    if inline is not None and named is not None:
        job.fail(f"{where}: both auto_router_config and auto_router_config_path are set")
        return None
    if inline is not None:
        try:
            return json.loads(inline) if isinstance(inline, str) else inline
        except json.JSONDecodeError as err:
            job.fail(f"{where}: auto_router_config: invalid JSON: {err.msg}")
            return None
    candidates = [path.parent / str(named), Path(str(named))]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        job.fail(f"{where}: auto_router_config_path: {named} not found (next to {path} or here)")
        return None
    return read_data_file(found, "file")


def _litellm_routes(config: Any, job: _Import, where: str, params: dict[str, Any]) -> Any:
    """LiteLLM's reading of a semantic-router config: a route goes to the model group of its
    name (``llm`` is not used), and the embeddings come from ``auto_router_embedding_model``
    when it is set (``encoder_type``/``encoder_name`` are then not used)."""
    if not isinstance(config, dict) or not isinstance(config.get("routes"), list):
        return config
    config = dict(config)
    if params.get("auto_router_embedding_model") is not None:
        config.pop("encoder_type", None)
        config.pop("encoder_name", None)
    routes = []
    for i, route in enumerate(config["routes"]):
        if isinstance(route, dict) and route.get("llm") is not None:
            job.warn(
                f"{where}: auto router config: routes[{i}]: llm: dropped (LiteLLM sends a "
                "route to the model group of its name)"
            )
            route = {**route, "llm": None}
        routes.append(route)
    config["routes"] = routes
    return config


def _litellm_target(route: dict[str, Any], by_name: dict[Any, Any], job: _Import) -> None:
    """A route's target model group: its LiteLLM model name, with the deployment's model and
    api_base as metadata; secrets and other parameters are dropped (warned)."""
    name = route.get("name")
    route["model"] = name
    entry = by_name.get(name)
    if entry is None:
        job.warn(f"route {name!r}: no model_list entry of that name (model set to {name!r})")
        return
    params = _params(entry)
    metadata = dict(route.get("metadata") or {})
    for key in ("model", "api_base"):
        if key in params:
            metadata.setdefault(f"litellm_{key}" if key == "model" else key, params[key])
    route["metadata"] = metadata
    dropped = sorted(set(params) - {"model", "api_base"})
    dropped += sorted(f"{key} (entry)" for key in set(entry) - {"model_name", "litellm_params"})
    if dropped:
        job.warn(f"route {name!r}: model_list entry keys dropped: {', '.join(dropped)}")
