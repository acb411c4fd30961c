"""JSON Schemas (draft 2020-12) of the routes file, the service config and the records the
service publishes: ``semroute-stream schema NAME`` prints them, ``docs/schema/`` has them.

The routes file and the service config come from their pydantic models; the outcome and
dead-letter records are written out here, field by field, after what ``_service/records.py``
builds (tests validate records made by its functions against them).
"""

from __future__ import annotations

import json
from typing import Any, Literal, get_args

from ._errors import ERROR_KINDS
from ._routing.decision import FALLBACK_REASONS
from ._routing.schema import DECISION_METHODS, INFO_KEYS, RoutesConfig
from ._service.records import DEAD_LETTER_SCHEMA, OUTCOME_SCHEMA, REVIEW_SCHEMA, SHADOW_SCHEMA
from ._service.settings import REVIEW_REASONS

__all__ = ["SCHEMA_NAMES", "SchemaName", "json_schema", "schema_text"]

SchemaName = Literal["routes", "config", "outcome", "dead-letter", "review", "shadow"]
SCHEMA_NAMES: tuple[SchemaName, ...] = get_args(SchemaName)
DRAFT = "https://json-schema.org/draft/2020-12/schema"

_NULL: dict[str, Any] = {"type": "null"}
_INT: dict[str, Any] = {"type": "integer"}
_STR: dict[str, Any] = {"type": "string"}
_NUM: dict[str, Any] = {"type": "number"}


def _obj(required: dict[str, Any], optional: dict[str, Any] | None = None) -> dict[str, Any]:
    """A closed object: ``required`` keys always present, ``optional`` ones sometimes."""
    return {
        "type": "object",
        "properties": {**required, **(optional or {})},
        "required": list(required),
        "additionalProperties": False,
    }


def _either(*options: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": list(options)}


_CUT = _obj(
    {"cut": {"const": True}, "bytes": _INT, "sha256": {**_STR, "pattern": "^[0-9a-f]{64}$"}},
    {"count": _INT},
)
_CUT["description"] = "A copy that did not fit the record: its size and sha256 (and count)."
_BYTES = _either(_obj({"text": _STR}), _obj({"base64": _STR}))
_BYTES["description"] = "Bytes: as text when they are UTF-8, else base64."
_HEADER = _either(
    _obj({"key": _STR}, {"text": _STR, "base64": _STR}),
    _obj({"key_base64": _STR}, {"text": _STR, "base64": _STR}),
)
_SOURCE = _obj(
    {"topic": _STR, "partition": _INT, "offset": _INT, "timestamp_ms": _either(_INT, _NULL)}
)
_REASONS = [reason for reason in FALLBACK_REASONS if reason is not None]
_SCORED = _obj({"route": _STR, "score": _NUM})


def _decision() -> dict[str, Any]:
    """The routing explanation (``Decisions.explain`` plus model and routes version)."""
    schema = _obj(
        {
            "route": _STR,
            "is_fallback": {"type": "boolean"},
            "best": _STR,
            "method": {"enum": list(DECISION_METHODS)},
            "score": _NUM,
            "threshold": _NUM,
            "runner_up": _either(_SCORED, _NULL),
            "margin": _either(_NUM, _NULL),
            "nearest_utterance": _obj({"text": _STR, "score": _NUM}),
            "top": {"type": "array", "items": _obj(_SCORED["properties"], {"similarity": _NUM})},
            "fallback_reason": _either({"enum": _REASONS}, _NULL),
            "model": _STR,
            "routes_version": {**_STR, "pattern": "^[0-9a-f]{12}(\\+[0-9a-f]{12})?$"},
        },
        {"similarity": _NUM, "min_similarity": _NUM, "auto": {"const": True}},
    )
    schema["description"] = (
        "Why the query went where it went: the method, the best route's score and threshold, "
        "the runner-up and margin, the top routes, the nearest example utterance and, for a "
        "fallback, the reason. 'similarity'/'min_similarity': method head only; 'auto': the "
        "method was chosen by method: auto."
    )
    return schema


def _envelope() -> dict[str, Any]:
    """The fields every record copies from its input message."""
    return {
        "id": _either(_STR, _NULL),
        "idempotency_key": {**_STR, "description": "topic/partition/offset of the input"},
        "key": _either(_BYTES, _CUT, _NULL),
        "headers": _either({"type": "array", "items": _HEADER}, _CUT),
        "source": _SOURCE,
    }


def _truncated(*names: str) -> dict[str, Any]:
    return {
        "type": "array",
        "items": {"enum": list(names)},
        "description": "What was cut to fit the output topic's record limit.",
    }


def outcome_schema() -> dict[str, Any]:
    response = _obj(
        {
            "content": _STR,
            "finish_reason": _either(_STR, _NULL),
            "usage": {"type": "object"},
            "attempts": _INT,
        },
        {"content_cut": _CUT},
    )
    schema = _obj(
        {
            "schema": {"const": OUTCOME_SCHEMA},
            "status": {"const": "ok"},
            **_envelope(),
            "input": {
                "type": ["object", "string"],
                "description": "The input message (JSON object, text, or a cut marker).",
            },
            "route": _STR,
            "is_fallback": {"type": "boolean"},
            "decision": _decision(),
            "endpoint": _either(_STR, _NULL),
            "llm_model": _either(_STR, _NULL),
            "response": _either(response, _NULL),
            "timings_ms": {"type": "object", "additionalProperties": _NUM},
            "processed_at_ms": _INT,
        },
        {"truncated": _truncated("headers", "key", "input", "response.content")},
    )
    return {"$schema": DRAFT, "title": OUTCOME_SCHEMA, **schema}


def dead_letter_schema() -> dict[str, Any]:
    error = _obj(
        {
            "kind": {"enum": list(ERROR_KINDS)},
            "reason": _STR,
            "stage": {"enum": ["parse", "handle", "llm", "publish"]},
            "attempts": _either(_INT, _NULL),
        }
    )
    schema = _obj(
        {
            "schema": {"const": DEAD_LETTER_SCHEMA},
            "status": {"const": "error"},
            "error": error,
            **_envelope(),
            "value": _either(_BYTES, _CUT, _NULL),
            "route": _either(_STR, _NULL),
            "decision": _either(_decision(), _NULL),
            "endpoint": _either(_STR, _NULL),
            "processed_at_ms": _INT,
        },
        {"truncated": _truncated("headers", "key", "value")},
    )
    return {"$schema": DRAFT, "title": DEAD_LETTER_SCHEMA, **schema}


def _side(schema: str, fields: dict[str, Any]) -> dict[str, Any]:
    """A review or shadow record: the input's coordinates and text, then ``fields``."""
    body = _obj(
        {
            "schema": {"const": schema},
            "id": _either(_STR, _NULL),
            "idempotency_key": {**_STR, "description": "topic/partition/offset of the input"},
            "key": _either(_BYTES, _CUT, _NULL),
            "source": _SOURCE,
            "input": _either({**_STR, "description": "The query's text."}, _CUT),
            **fields,
            "processed_at_ms": _INT,
        },
        {"truncated": _truncated("key", "input")},
    )
    return {"$schema": DRAFT, "title": schema, **body}


def review_schema() -> dict[str, Any]:
    reasons = {"type": "array", "items": {"enum": list(REVIEW_REASONS)}, "minItems": 1}
    return _side(REVIEW_SCHEMA, {"reasons": reasons, "route": _STR, "decision": _decision()})


def shadow_schema() -> dict[str, Any]:
    fields = {
        "live_route": _STR,
        "candidate_route": _STR,
        "live": _decision(),
        "candidate": _decision(),
    }
    return _side(SHADOW_SCHEMA, fields)


def routes_schema() -> dict[str, Any]:
    schema = RoutesConfig.model_json_schema()
    route = schema["$defs"]["Route"]
    # Unknown route keys are kept in the route's metadata (see _routing/schema.py).
    route.pop("additionalProperties", None)
    route["description"] = (
        f"{route.get('description', '')} Other keys are kept in the route's metadata."
    ).strip()
    # Top-level keys for people, read and dropped (see INFO_KEYS).
    for key in INFO_KEYS:
        schema["properties"][key] = {"type": "string", "description": "for people; ignored"}
    schema["description"] = (
        f"A whole routes file; {', '.join(INFO_KEYS)} are for people and ignored, any other "
        "key is refused."
    )
    return {"$schema": DRAFT, **schema}


def config_schema() -> dict[str, Any]:
    from ._service.settings import Settings

    return {"$schema": DRAFT, **Settings.model_json_schema()}


def json_schema(name: SchemaName) -> dict[str, Any]:
    """The JSON Schema called ``name`` (one of ``SCHEMA_NAMES``)."""
    makers = {
        "routes": routes_schema,
        "config": config_schema,
        "outcome": outcome_schema,
        "dead-letter": dead_letter_schema,
        "review": review_schema,
        "shadow": shadow_schema,
    }
    if name not in makers:
        raise ValueError(f"unknown schema {name!r} (known: {', '.join(SCHEMA_NAMES)})")
    return makers[name]()


def schema_text(name: SchemaName) -> str:
    """``json_schema(name)`` as ``semroute-stream schema`` prints it (and docs/schema has it)."""
    return json.dumps(json_schema(name), indent=2, ensure_ascii=False) + "\n"
