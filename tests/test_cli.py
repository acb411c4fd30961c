"""The command line (semroute_stream._cli: app, offline): embed, eval, fit, route.

Most tests run ``main()`` in-process with the bag-of-words FakeEncoder; the ``real_model``
ones run the installed command on the real all-MiniLM-L6-v2 encoder.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from fakes import FakeEncoder

from semroute_stream._cli import app as _cli
from semroute_stream._cli import offline as _cli_offline
from semroute_stream._routing.schema import load_routes

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_ROUTES = REPO / "config" / "routes.example.yaml"
EXAMPLE_TICKETS = REPO / "semroute_stream" / "examples" / "tickets.jsonl"

ROUTES = {
    "default_threshold": 0.3,
    "fallback": {"name": "other"},
    "routes": [
        {
            "name": "billing",
            "utterances": ["charged twice on my card", "invoice wrong amount", "refund payment"],
        },
        {
            "name": "shipping",
            "utterances": ["where is my parcel", "package delivery late", "tracking number"],
        },
        {
            "name": "login",
            "utterances": ["cannot log in", "reset my password", "account locked"],
        },
    ],
}

LABELLED: list[dict[str, str | None]] = [
    {"text": "my card was charged twice", "label": "billing"},
    {"text": "wrong amount on the invoice", "label": "billing"},
    {"text": "parcel delivery is late", "label": "shipping"},
    {"text": "no tracking number for my package", "label": "shipping"},
    {"text": "I forgot my password", "label": "login"},
    {"text": "my account is locked", "label": "login"},
    {"text": "weather in paris tomorrow", "label": None},
    {"text": "tell me a joke", "label": None},
]


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeEncoder:
    encoder = FakeEncoder()
    monkeypatch.setattr(_cli_offline, "make_encoder", lambda args: encoder)
    return encoder


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    routes = tmp_path / "routes.yaml"
    routes.write_text(yaml.safe_dump(ROUTES))
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in LABELLED))
    return {"routes": routes, "data": data, "dir": tmp_path}


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = _cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def last_json(out: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(out.rstrip("\n").splitlines()[-1])
    return data


def test_eval_json_last_line(
    fake: FakeEncoder, files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["eval", "--routes", str(files["routes"]), "--data", str(files["data"]), "--json"]
    code, out, _ = run(argv, capsys)
    assert code == 0
    assert "overall accuracy" in out
    figures = last_json(out)
    for key in (
        "overall_accuracy",
        "in_scope_accuracy",
        "fallback_precision",
        "fallback_recall",
        "n",
        "per_route",
        "confusions",
        "seconds",
    ):
        assert key in figures
    assert figures["n"] == len(LABELLED)
    assert figures["model"] == "fake-bow" and figures["method"] == "max"
    assert set(figures["per_route"]) == {"billing", "shipping", "login"}

    code, out, _ = run([*argv, "--method", "top5_mean"], capsys)
    assert code == 0 and last_json(out)["method"] == "top5_mean"


@pytest.mark.parametrize("out_name", ["fitted.yaml", "fitted.json"])
def test_fit_writes_a_loadable_file(
    fake: FakeEncoder, files: dict[str, Path], capsys: pytest.CaptureFixture[str], out_name: str
) -> None:
    out_path = files["dir"] / out_name
    argv = ["fit", "--routes", str(files["routes"]), "--data", str(files["data"])]
    code, out, _ = run([*argv, "--out", str(out_path), "--json"], capsys)
    assert code == 0
    assert "before" in out and "after" in out
    summary = last_json(out)
    assert summary["after"]["overall_accuracy"] >= summary["before"]["overall_accuracy"]
    fitted = load_routes(out_path)
    assert fitted.names == ("billing", "shipping", "login")
    assert fitted.fallback.name == "other"
    if out_name.endswith(".json"):
        json.loads(out_path.read_text())
    # What fit wrote is what eval reads.
    code, out, _ = run(
        ["eval", "--routes", str(out_path), "--data", str(files["data"]), "--json"], capsys
    )
    assert code == 0
    assert last_json(out)["overall_accuracy"] == summary["after"]["overall_accuracy"]


BAD_AND_GOOD_LINES = [
    b'{"id": "t1", "text": "my parcel is late"}',  # 1 good
    b"{oops",  # 2 invalid_json
    b'{"text": "reset my password please", "channel": "email"}',  # 3 good, no id
    b'{"id": 4, "text": 7}',  # 4 text_not_string
    b'{"id": 5}',  # 5 missing_text
    b'{"text": "   "}',  # 6 empty_text
    b'{"text": "caf\xe9"}',  # 7 invalid_utf8
    b"[1, 2]",  # 8 not_an_object
    b"",  # 9 blank line
    b'{"id": 10, "text": "tell a joke please"}',  # 10 good (fallback)
]


def test_route_writes_good_lines_and_rejects_bad_ones(
    fake: FakeEncoder, files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    src = files["dir"] / "in.jsonl"
    src.write_bytes(b"\n".join(BAD_AND_GOOD_LINES) + b"\n")
    out_path = files["dir"] / "out" / "routed.jsonl"
    out_path.parent.mkdir()  # route creates no folder (a typo in --output must not make one)
    argv = ["route", "--routes", str(files["routes"]), "--input", str(src)]
    code, out, err = run([*argv, "--output", str(out_path), "--batch-size", "2"], capsys)
    assert code == 0

    rows = [json.loads(line) for line in out_path.read_text().splitlines()]
    assert [row["line"] for row in rows] == [1, 3, 10]
    assert [row.get("id") for row in rows] == ["t1", None, "10"]
    assert [row["route"] for row in rows] == ["shipping", "login", "other"]
    assert rows[2]["is_fallback"] is True
    for row in rows:
        assert row["model"] == "fake-bow" and len(row["routes_version"]) == 12
        assert {"score", "threshold", "runner_up", "margin", "nearest_utterance", "top"} <= set(row)
    assert rows[1]["text"] == "reset my password please"

    rejects_path = files["dir"] / "out" / "routed.rejects.jsonl"
    rejects = [json.loads(line) for line in rejects_path.read_text().splitlines()]
    assert [(r["line"], r["kind"]) for r in rejects] == [
        (2, "invalid_json"),
        (4, "text_not_string"),
        (5, "missing_text"),
        (6, "empty_text"),
        (7, "invalid_utf8"),
        (8, "not_an_object"),
        (9, "invalid_json"),
    ]
    assert rejects[0]["raw"] == "{oops" and all(r["reason"] for r in rejects)
    for line, kind in ((2, "invalid_json"), (7, "invalid_utf8")):
        assert f"{src}:{line}: rejected: {kind}" in err
    assert "routed 3 of 10 lines" in out and "rejected 7 lines" in out
    # Batches of at most 2 queries (after the one call that encodes the 9 utterances).
    assert fake.calls[0] == 9 and max(fake.calls[1:]) <= 2

    custom = files["dir"] / "bad.jsonl"
    code, _, _ = run(
        [*argv, "--output", str(out_path), "--rejects", str(custom), "--text-field", "nope"],
        capsys,
    )
    # every line rejected: exit 1, saying so
    assert code == 1 and out_path.read_text() == ""
    assert len(custom.read_text().splitlines()) == len(BAD_AND_GOOD_LINES)


def test_route_text_lines_reject_rate_and_missing_folder(
    fake: FakeEncoder, files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    src = files["dir"] / "plain.txt"
    src.write_text("my parcel is late\nreset my password please\n\n")
    out_path = files["dir"] / "plain.routed.jsonl"
    argv = ["route", "--routes", str(files["routes"]), "--input", str(src)]
    # Plain text read as JSON: every line rejected -> exit 1 with the hint.
    code, _, err = run([*argv, "--output", str(out_path)], capsys)
    assert code == 1
    assert "every line rejected (3 of 3) (plain text lines? add --text)" in err
    # --text: the lines are the queries (the blank one is still rejected).
    code, out, err = run([*argv, "--output", str(out_path), "--text"], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in out_path.read_text().splitlines()]
    assert [(r["line"], r["text"], r["route"]) for r in rows] == [
        (1, "my parcel is late", "shipping"),
        (2, "reset my password please", "login"),
    ]
    assert "routed 2 of 3 lines" in out
    # 1 of 3 rejected: over a 0.2 limit, within a 0.5 one.
    code, _, err = run(
        [*argv, "--output", str(out_path), "--text", "--max-reject-rate", "0.2"], capsys
    )
    assert code == 1 and "more than 20.0% of the lines rejected (1 of 3)" in err
    code, _, _ = run(
        [*argv, "--output", str(out_path), "--text", "--max-reject-rate", "0.5"], capsys
    )
    assert code == 0
    # A missing folder: exit 2 naming it, nothing created.
    missing = files["dir"] / "missing" / "dir" / "o.jsonl"
    code, _, err = run([*argv, "--output", str(missing), "--text"], capsys)
    assert code == 2 and f"its directory {missing.parent} does not exist" in err
    assert not (files["dir"] / "missing").exists()


def test_version_and_help_texts(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        _cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("semroute-stream 0.")
    subcommands = next(
        a for a in _cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    )
    for command in ("route", "embed", "replay", "fit", "stub-llm"):
        parser = subcommands.choices[command]
        assert parser.description or command == "stub-llm", f"{command} has no description"
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{command} {action.option_strings[0]} has no help text"


def test_embed_from_stdin_and_from_jsonl(
    fake: FakeEncoder,
    files: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"hello world\n\nbye\n")))
    code, out, _ = run(["embed", "--batch-size", "2"], capsys)
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [row["text"] for row in rows] == ["hello world", "", "bye"]
    assert len(rows[0]["embedding"]) == fake.dim
    assert np.linalg.norm(rows[0]["embedding"]) == pytest.approx(1.0, abs=1e-5)

    out_file = files["dir"] / "emb.jsonl"
    code, _, _ = run(["embed", "--input", str(files["data"]), "--output", str(out_file)], capsys)
    assert code == 0
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [row["text"] for row in rows] == [row["text"] for row in LABELLED]

    bad = files["dir"] / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "oops"}\n')
    code, _, err = run(["embed", "--input", str(bad)], capsys)
    assert code == 2 and f"{bad}:2:" in err and "missing_text" in err


def test_bad_config_is_an_error_line_and_exit_code_2(
    fake: FakeEncoder, files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    broken = files["dir"] / "broken.yaml"
    broken.write_text(yaml.safe_dump({"routes": [{"name": "x", "utterances": []}]}))
    for argv in (
        ["eval", "--routes", str(broken), "--data", str(files["data"])],
        ["route", "--routes", str(broken), "--input", str(files["data"]), "--output", "x"],
    ):
        code, _, err = run(argv, capsys)
        assert code == 2
        assert err.startswith(f"error: {broken}: routes[0] (name 'x'): utterances:")
        assert "Traceback" not in err

    unknown_label = files["dir"] / "unknown.jsonl"
    unknown_label.write_text('{"text": "hi", "label": "nope"}\n')
    argv = ["eval", "--routes", str(files["routes"]), "--data", str(unknown_label)]
    code, _, err = run(argv, capsys)
    assert code == 2 and "line 1: label 'nope' names no route" in err

    argv = ["route", "--routes", str(files["routes"]), "--input", "/no/such.jsonl"]
    code, _, err = run([*argv, "--output", str(files["dir"] / "o.jsonl")], capsys)
    assert code == 2 and "no such input file" in err


def test_python_dash_m_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "semroute_stream", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0
    for command in ("embed", "eval", "fit", "route"):
        assert command in result.stdout


# --- the real encoder ----------------------------------------------------------------------


def _command() -> list[str]:
    script = Path(sys.executable).with_name("semroute-stream")
    return [str(script)] if script.exists() else [sys.executable, "-m", "semroute_stream"]


@pytest.mark.slow
def test_real_embed_from_stdin() -> None:
    result = subprocess.run(
        [*_command(), "embed"],
        input="I was charged twice\nwhere is my parcel\n",
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["text"] for row in rows] == ["I was charged twice", "where is my parcel"]
    vectors = np.array([row["embedding"] for row in rows])
    assert vectors.shape == (2, 384)
    assert np.linalg.norm(vectors, axis=1) == pytest.approx([1.0, 1.0], abs=1e-4)


@pytest.mark.slow
def test_real_route_of_the_bundled_demo(tmp_path: Path) -> None:
    out_path = tmp_path / "tickets.routed.jsonl"
    result = subprocess.run(
        [
            *_command(),
            "route",
            "--routes",
            str(EXAMPLE_ROUTES),
            "--input",
            str(EXAMPLE_TICKETS),
            "--output",
            str(out_path),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 0, result.stderr
    assert "no rejected lines" in result.stdout
    rows = {row["id"]: row for row in map(json.loads, out_path.read_text().splitlines())}
    assert len(rows) == len(EXAMPLE_TICKETS.read_text().splitlines())
    assert all(row["model"].endswith("all-MiniLM-L6-v2") for row in rows.values())
    expected = {
        "T-1001": "billing",
        "T-1002": "technical_issue",
        "T-1003": "account_access",
        "T-1004": "shipping",
        "T-1005": "cancellation",
        "T-1006": "product_question",
        "T-1007": "feedback",
        "T-1008": "refund_request",
        "T-1037": "general",
        "T-1038": "general",
        "T-1039": "general",
        "T-1040": "general",
    }
    assert {key: rows[key]["route"] for key in expected} == expected
    assert (tmp_path / "tickets.routed.rejects.jsonl").read_text() == ""
