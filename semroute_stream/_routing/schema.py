"""The routes file: which routes exist, their example utterances, thresholds and LLM settings.

YAML or JSON with one schema (see ``config/routes.example.yaml``)::

    method: auto                # auto (default) | max | top5_mean | head
    default_threshold: null     # see below; null = the method's default
    top_k: 3                    # how many routes each explanation lists
    head:                       # the learned route head (method head, or auto choosing it)
      blend: null               # weight of the nearest-utterance cosine added to the head's
                                #   log-probabilities (0 = head alone); null = chosen by CV
      temperature: null         # calibration: softmax(score / T); null = fitted by CV
      min_confidence: null      # fall back below this calibrated probability; null = from CV
      min_margin: null          # fall back when the lead over the runner-up (probability) is
                                #   below this; null = no margin rule
      min_energy: null          # fall back when the query's energy score (logsumexp of the
                                #   calibrated scores) is below this: it looks like no route;
                                #   null = from CV
      l2: 0.0001                # L2 regularisation of the head
      use_names: true           # each route's name is one more training example
      lexical: 0.25             # weight of the head's lexical view (TF-IDF of words and word
                                #   pairs) added to its log-probabilities; 0 = embeddings only
    fallback: {name: fallback, endpoint: null, model: null, system_prompt: null}
    routes:
      - name: billing
        utterances: ["i was charged twice", ...]
        threshold: 0.45         # optional, in [-1, 1]: a cosine (see below)
        min_confidence: null    # optional, head only: this route's probability floor
        endpoint: billing-llm   # optional, an endpoint of the service config
        model: null             # optional per-route model override
        system_prompt: null     # optional per-route system prompt
        metadata: {team: billing}

Methods: ``max`` scores each route by its nearest utterance's cosine, ``top5_mean`` is
semantic-router's rule, ``head`` is a logistic-regression route head trained on the utterances
when the routes load (cached), blended with the nearest-utterance cosine. ``auto`` picks one of
them by cross-validation on the utterances when the routes load (deterministic, cached with
the head; too few utterances -> ``max``); ``semroute-stream fit`` picks on labelled data and
writes the choice.

Thresholds are always cosines: for ``max``/``top5_mean`` the score a route must reach (default
0.5; with ``auto`` the default is derived from the cross-validation), for ``head`` the floor on
the route's nearest-utterance cosine (default derived from the cross-validation). The head's
confidence floors are ``head.min_confidence`` and each route's ``min_confidence``.

Unknown top-level keys (``source``, ``license``) are ignored; unknown route keys (``domain``,
``intents``) are kept in the route's ``metadata``. A key that looks like a misspelt field
(``treshold``) is an error rather than silently ignored.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .._errors import ConfigError
from .._files import atomic_write_bytes

__all__ = [
    "DECISION_METHODS",
    "DEFAULT_SIMILARITY_THRESHOLD",
    "ROUTES_METHODS",
    "SIMILARITY_METHODS",
    "DecisionMethod",
    "Fallback",
    "HeadConfig",
    "Route",
    "RoutesConfig",
    "RoutesMethod",
    "SimilarityMethod",
    "dump_routes",
    "load_routes",
    "parse_routes",
    "read_data_file",
    "routes_version",
    "save_routes",
]


# --- the method vocabulary -----------------------------------------------------------------

SimilarityMethod = Literal["max", "top5_mean"]
"""Methods that score a route from its utterances' cosines alone (a threshold per route)."""
DecisionMethod = Literal[SimilarityMethod, "head"]
"""Every method a route table can decide with."""
RoutesMethod = Literal["auto", DecisionMethod]
"""What a routes file's ``method`` may say (``auto`` resolves to a decision method)."""

SIMILARITY_METHODS: tuple[SimilarityMethod, ...] = get_args(SimilarityMethod)
DECISION_METHODS: tuple[DecisionMethod, ...] = get_args(DecisionMethod)
ROUTES_METHODS: tuple[RoutesMethod, ...] = get_args(RoutesMethod)
DEFAULT_SIMILARITY_THRESHOLD = 0.5
"""The default threshold of ``max``/``top5_mean`` when the file sets none."""
MAX_ENERGY = 1000.0
"""``head.min_energy`` lies in ``[-MAX_ENERGY, MAX_ENERGY]`` (``-MAX_ENERGY``: no floor)."""


def _reject_misspelt(data: dict[str, Any], known: set[str], *, every: bool = False) -> None:
    """Refuse a key that looks like a known field (``every``: any key not known)."""
    for key in data:
        if key in known:
            continue
        close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.8)
        if close:
            raise ValueError(f"unknown field {key!r} (did you mean {close[0]!r}?)")
        if every:
            raise ValueError(f"unknown field {key!r} (known: {', '.join(sorted(known))})")


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be blank")
    return text


Utterance = Annotated[str, AfterValidator(_not_blank)]


class Route(BaseModel):
    """One route: a name, its example utterances and how to answer what lands on it."""

    model_config = ConfigDict(extra="forbid")

    name: str
    threshold: float | None = Field(default=None, ge=-1.0, le=1.0, allow_inf_nan=False)
    min_confidence: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)
    endpoint: str | None = None
    model: str | None = None
    system_prompt: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    utterances: list[Utterance] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _extras_into_metadata(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        known = set(cls.model_fields)
        _reject_misspelt(data, known)
        extras = {k: v for k, v in data.items() if k not in known}
        if not extras:
            return data
        kept = {k: v for k, v in data.items() if k in known}
        metadata = kept.get("metadata")
        if metadata is None:
            metadata = {}
        if isinstance(metadata, dict):
            kept["metadata"] = {**extras, **metadata}
        return kept

    @field_validator("name")
    @classmethod
    def _name_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("route name must not be blank")
        return value


class Fallback(BaseModel):
    """What a query that matches no route gets."""

    model_config = ConfigDict(extra="forbid")

    name: str = "fallback"
    endpoint: str | None = None
    model: str | None = None
    system_prompt: str | None = None

    @field_validator("name")
    @classmethod
    def _name_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("fallback name must not be blank")
        return value


class HeadConfig(BaseModel):
    """The learned route head's settings; ``None`` = chosen/derived when the routes load."""

    model_config = ConfigDict(extra="forbid")

    blend: float | None = Field(default=None, ge=0.0, le=1000.0, allow_inf_nan=False)
    temperature: float | None = Field(default=None, gt=0.0, le=1000.0, allow_inf_nan=False)
    min_confidence: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)
    min_margin: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)
    min_energy: float | None = Field(
        default=None, ge=-MAX_ENERGY, le=MAX_ENERGY, allow_inf_nan=False
    )
    l2: float = Field(default=1e-4, gt=0.0, le=10.0, allow_inf_nan=False)
    use_names: bool = True
    lexical: float = Field(default=0.25, ge=0.0, le=10.0, allow_inf_nan=False)


#: Top-level keys a routes file may carry for people (where the routes come from, their
#: licence): read and dropped, never part of the routes or their version.
INFO_KEYS = ("description", "license", "source")


class RoutesConfig(BaseModel):
    """A whole routes file. A top-level key that is not a field is refused, except
    :data:`INFO_KEYS` (strings, dropped)."""

    model_config = ConfigDict(extra="forbid")

    default_threshold: float | None = Field(default=None, ge=-1.0, le=1.0, allow_inf_nan=False)
    method: RoutesMethod = "auto"
    top_k: int = Field(default=3, ge=1)
    head: HeadConfig = Field(default_factory=HeadConfig)
    fallback: Fallback = Field(default_factory=Fallback)
    routes: list[Route] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _no_misspelt_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in INFO_KEYS:
                if key in data and not isinstance(data[key], str):
                    raise ValueError(f"{key}: must be a string (it is for people, and ignored)")
            data = {k: v for k, v in data.items() if k not in INFO_KEYS}
            _reject_misspelt(data, set(cls.model_fields) | set(INFO_KEYS), every=True)
        return data

    @field_validator("method", mode="before")
    @classmethod
    def _known_method(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in ROUTES_METHODS:
            raise ValueError(f"unknown method {value!r} (known: {', '.join(ROUTES_METHODS)})")
        return value

    @model_validator(mode="after")
    def _names_unique(self) -> RoutesConfig:
        problems: list[str] = []
        first: dict[str, int] = {}
        for i, route in enumerate(self.routes):
            if route.name in first:
                problems.append(
                    f"routes[{i}] (name {route.name!r}): name: duplicate route name "
                    f"(first at routes[{first[route.name]}])"
                )
            else:
                first[route.name] = i
        if self.fallback.name in first:
            i = first[self.fallback.name]
            problems.append(
                f"fallback: name: {self.fallback.name!r} is also the name of routes[{i}]"
            )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(route.name for route in self.routes)

    def thresholds(self, default: float | None = None) -> list[float]:
        """Each route's threshold, with the default filled in: the file's
        ``default_threshold``, else ``default``, else ``DEFAULT_SIMILARITY_THRESHOLD``."""
        fill = self.effective_default_threshold(default)
        return [fill if route.threshold is None else route.threshold for route in self.routes]

    def effective_default_threshold(self, default: float | None = None) -> float:
        if self.default_threshold is not None:
            return self.default_threshold
        return DEFAULT_SIMILARITY_THRESHOLD if default is None else default


# --- reading and writing -------------------------------------------------------------------


def _describe_loc(loc: tuple[int | str, ...], raw: Any) -> str:
    """``('routes', 3, 'threshold')`` -> ``routes[3] (name 'billing'): threshold``."""
    parts: list[str] = []
    i = 0
    while i < len(loc):
        key = loc[i]
        if key == "routes" and i + 1 < len(loc) and isinstance(loc[i + 1], int):
            index = loc[i + 1]
            label = f"routes[{index}]"
            name = _raw_route_name(raw, int(index))
            if name is not None:
                label += f" (name {name!r})"
            parts.append(label)
            i += 2
            continue
        if isinstance(key, int) and parts:
            parts[-1] += f"[{key}]"
        else:
            parts.append(str(key))
        i += 1
    return ": ".join(parts)


def _raw_route_name(raw: Any, index: int) -> str | None:
    if isinstance(raw, dict):
        routes = raw.get("routes")
        if isinstance(routes, list) and 0 <= index < len(routes):
            route = routes[index]
            if isinstance(route, dict) and isinstance(route.get("name"), str):
                return str(route["name"])
    return None


def _problems(err: ValidationError, raw: Any) -> list[str]:
    problems: list[str] = []
    for item in err.errors(include_url=False):
        message = str(item["msg"]).removeprefix("Value error, ")
        where = _describe_loc(tuple(item["loc"]), raw)
        for line in message.splitlines():
            # Cross-route problems already say where they are.
            problems.append(f"{where}: {line}" if where else line)
    return problems


def parse_routes(raw: Any, source: str = "<routes>") -> RoutesConfig:
    """Validate already-parsed routes data; errors name ``source``, the route and the field."""
    if not isinstance(raw, dict):
        raise _config_error(source, [f"expected a mapping at the top, got {type(raw).__name__}"])
    try:
        return RoutesConfig.model_validate(raw)
    except ValidationError as err:
        raise _config_error(source, _problems(err, raw)) from None


def _config_error(source: str, problems: list[str]) -> ConfigError:
    err = ConfigError("\n".join(f"{source}: {p}" for p in problems))
    err.file = source
    return err


def load_routes(path: str | Path) -> RoutesConfig:
    """Read and validate a routes file (JSON when it ends in ``.json``, YAML otherwise)."""
    return parse_routes(read_data_file(Path(path), "routes file"), str(path))


def read_data_file(path: Path, what: str) -> Any:
    """The data in a JSON (``.json``) or YAML file; ConfigError naming the file and line."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read {what}: {err}", file=source) from None
    try:
        return json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"line {err.lineno}: invalid JSON: {err.msg}", file=source) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise ConfigError(f"{where}invalid YAML: {err}", file=source) from None


def dump_routes(cfg: RoutesConfig) -> dict[str, Any]:
    """The routes as plain data, as ``save_routes`` writes them (empty route fields left out)."""
    routes = []
    for route in cfg.routes:
        entry = route.model_dump(mode="json", exclude_none=True)
        if not entry.get("metadata"):
            entry.pop("metadata", None)
        routes.append(entry)
    data: dict[str, Any] = {}
    if cfg.default_threshold is not None:
        data["default_threshold"] = cfg.default_threshold
    data["method"] = cfg.method
    data["top_k"] = cfg.top_k
    head = cfg.head.model_dump(mode="json", exclude_defaults=True)
    if head:
        data["head"] = head
    data["fallback"] = cfg.fallback.model_dump(mode="json")
    data["routes"] = routes
    return data


def save_routes(cfg: RoutesConfig, path: str | Path) -> None:
    """Write the routes (JSON when the name ends in ``.json``, YAML otherwise), atomically."""
    path = Path(path)
    data = dump_routes(cfg)
    if path.suffix.lower() == ".json":
        text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    else:
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)
    atomic_write_bytes(path, text.encode("utf-8"))


def routes_version(cfg: RoutesConfig) -> str:
    """A short hash of everything in the routes (12 hex chars); any change gives a new one."""
    canonical = json.dumps(
        cfg.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:12]
