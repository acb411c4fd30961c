"""The JSON Schemas (``semroute-stream schema``, ``docs/schema/``): the checked-in files are
what the command prints, and real records built by ``_service/records.py`` validate against
the outcome / dead-letter schemas (and broken ones do not)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from fakes import FakeEncoder
from jsonschema import Draft202012Validator

from semroute_stream import Router, RoutesConfig
from semroute_stream._cli import main
from semroute_stream._errors import ERROR_KINDS
from semroute_stream._input import Query
from semroute_stream._schemas import SCHEMA_NAMES, SchemaName, json_schema, schema_text
from semroute_stream._service.records import Source, dead_letter_record, outcome_record

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "schema"


def validator(name: SchemaName) -> Draft202012Validator:
    return Draft202012Validator(json_schema(name))


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_checked_in_schema_is_what_the_command_prints(
    name: SchemaName, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["schema", name]) == 0
    printed = capsys.readouterr().out
    assert printed == schema_text(name)
    checked_in = (DOCS / f"{name}.json").read_text(encoding="utf-8")
    assert checked_in == printed, (
        f"docs/schema/{name}.json is stale: semroute-stream schema {name} > docs/schema/{name}.json"
    )
    Draft202012Validator.check_schema(json.loads(printed))


def test_example_files_validate() -> None:
    routes = yaml.safe_load((ROOT / "config" / "routes.example.yaml").read_text("utf-8"))
    validator("routes").validate(routes)
    service = yaml.safe_load((ROOT / "config" / "service.example.yaml").read_text("utf-8"))
    validator("config").validate(service)
    bad = {**routes, "top_k": 0}
    assert not validator("routes").is_valid(bad)
    extra_route_key = {**routes, "routes": [{**routes["routes"][0], "domain": "shop"}]}
    validator("routes").validate(extra_route_key)  # kept as metadata by the loader


def decisions(method: str) -> list[dict[str, Any]]:
    routes = RoutesConfig.model_validate(
        {
            "method": method,
            "default_threshold": 0.3,
            "routes": [
                {"name": "billing", "utterances": ["charged twice", "refund my payment"]},
                {"name": "shipping", "utterances": ["where is my parcel", "track my delivery"]},
            ],
        }
    )
    router = Router(routes, FakeEncoder(), cache=False)
    return router.route(["refund my payment please", "nothing in common zzz"])


SRC = Source("queries", 2, 41, 1_700_000_000_000, b"user-7", (("trace", b"abc"),))
ODD_SRC = Source("queries", 0, 5, None, b"\xff\xfe", (("k\udcff", b"\xff"), ("empty", None)))  # type: ignore[arg-type]
QUERY = Query(text="refund my payment please", id="q1", payload={"text": "refund", "id": "q1"})
RESPONSE = {"content": "Sure." * 400, "finish_reason": "stop", "usage": {"total": 3}, "attempts": 1}


def outcomes() -> list[bytes]:
    ok, fallback = decisions("max")
    timings = {"queue": 1.5, "total": 9.0}
    common: dict[str, Any] = {"timings_ms": timings, "raw": b'{"text": "refund", "id": "q1"}'}
    return [
        outcome_record(
            SRC,
            QUERY,
            decision=ok,
            endpoint="billing-llm",
            llm_model="m",
            response=RESPONSE,
            **common,
        ),
        outcome_record(
            ODD_SRC,
            Query("zzz", None, "zzz"),
            decision=fallback,
            endpoint=None,
            llm_model=None,
            response=None,
            **common,
        ),
        # too large: the copies are cut, then the answer
        outcome_record(
            SRC,
            QUERY,
            decision=ok,
            endpoint="e",
            llm_model="m",
            response=RESPONSE,
            limit=1800,
            **common,
        ),
    ]


def dead_letters() -> list[bytes]:
    ok, _ = decisions("max")
    return [
        dead_letter_record(SRC, b"not json", kind="invalid_json", reason="bad", stage="parse"),
        dead_letter_record(ODD_SRC, b"\xff", kind="invalid_utf8", reason="x", stage="parse"),
        dead_letter_record(
            SRC, b"{}", kind="too_many_headers", reason="many", stage="parse", copy_envelope=False
        ),
        dead_letter_record(
            SRC,
            b"{}",
            kind="llm_retries_exhausted",
            reason="503",
            stage="llm",
            query=QUERY,
            decision=ok,
            endpoint="billing-llm",
            attempts=4,
        ),
        dead_letter_record(SRC, None, kind="unpublishable", reason="r" * 5000, stage="publish"),
        dead_letter_record(
            SRC, b"v" * 3000, kind="oversized", reason="big", stage="parse", limit=1200
        ),
    ]


def test_real_outcome_records_validate() -> None:
    records = [orjson.loads(value) for value in outcomes()]
    for record in records:
        validator("outcome").validate(record)
    assert records[1]["key"] == {"base64": "//4="} and records[1]["input"] == "zzz"
    assert records[0]["decision"]["is_fallback"] is False and records[1]["is_fallback"] is True
    assert "response.content" in records[2]["truncated"]


def test_real_dead_letters_validate() -> None:
    records = [orjson.loads(value) for value in dead_letters()]
    for record in records:
        validator("dead-letter").validate(record)
    assert records[2]["headers"]["cut"] is True and records[5]["truncated"] == ["value"]
    kinds = json_schema("dead-letter")["properties"]["error"]["properties"]["kind"]["enum"]
    assert kinds == list(ERROR_KINDS)


def test_head_decisions_validate() -> None:
    for decision in decisions("head"):
        assert "min_similarity" in decision
        record = outcome_record(
            SRC,
            QUERY,
            decision=decision,
            endpoint=None,
            llm_model=None,
            response=None,
            timings_ms={},
        )
        validator("outcome").validate(orjson.loads(record))


@pytest.mark.parametrize(
    ("name", "change"),
    [
        ("outcome", lambda r: r.pop("decision")),
        ("outcome", lambda r: r.update(surprise=1)),
        ("outcome", lambda r: r["decision"].update(method="nearest")),
        ("outcome", lambda r: r["source"].update(offset="41")),
        ("dead-letter", lambda r: r["error"].update(kind="no_such_kind")),
        ("dead-letter", lambda r: r.update(status="ok")),
        ("dead-letter", lambda r: r.update(key={"text": "k", "base64": "aw=="})),
    ],
)
def test_broken_records_do_not_validate(name: SchemaName, change: Any) -> None:
    value = outcomes()[0] if name == "outcome" else dead_letters()[3]
    record = orjson.loads(value)
    validator(name).validate(record)
    change(record)
    assert not validator(name).is_valid(record)


def test_real_review_and_shadow_records_validate() -> None:
    from semroute_stream._service.records import review_record, shadow_record

    ok, fallback = decisions("max")
    for decision in (ok, fallback):
        decision.update(model="m", routes_version="0123456789ab")
    review = review_record("r", SRC, QUERY, decision=fallback, reasons=("fallback",))
    validator("review").validate(orjson.loads(review.value))
    long = Query("refund " * 300, "q2", {"text": "refund"})
    cut = review_record("r", ODD_SRC, long, decision=ok, reasons=("low_margin",), limit=1200)
    assert orjson.loads(cut.value)["truncated"]
    validator("review").validate(orjson.loads(cut.value))
    shadow = shadow_record("s", SRC, QUERY, live=ok, candidate=fallback)
    record = orjson.loads(shadow.value)
    validator("shadow").validate(record)
    assert record["live_route"] == "billing" and record["candidate_route"] == "fallback"
    record["reasons"] = ["fallback"]
    assert not validator("shadow").is_valid(record)
    bad = orjson.loads(review.value)
    bad["reasons"] = ["whim"]
    assert not validator("review").is_valid(bad)
