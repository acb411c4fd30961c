"""``eval --html``: the fallback curve's arithmetic (_offline.fit.fallback_curve), the page
(_offline.report: html_report, report_charts), and the page as headless Chromium renders it.

The Chromium test runs the installed command on a slice of CLINC150 (the banking domain, some
out-of-scope rows, and a route whose utterance is markup) with the real encoder, then Debian's
``chromium`` (``make system-deps`` installs it) dumps the DOM and takes a screenshot.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fakes import FakeEncoder
from PIL import Image, ImageStat

from semroute_stream._cli import app as _cli
from semroute_stream._cli import offline as _cli_offline
from semroute_stream._errors import ConfigError
from semroute_stream._offline.fit.fallback_curve import fallback_curve, fallback_slack
from semroute_stream._offline.report.html_report import FIGURE_IDS, require_report_libraries
from semroute_stream._routing.decision import HeadParams, RouteTable, decide, score_matrix

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"
CHROMIUM = Path("/usr/bin/chromium")
HOSTILE = "<script>alert(1)</script>"
WINDOW = (1280, 2400)


# --- the curve -------------------------------------------------------------------------------


def test_fallback_curve_at_known_offsets() -> None:
    slack = np.array([-0.3, -0.1, 0.05, 0.2, 0.4])
    gold = np.array([-1, -1, 0, -1, 1])  # rows 0, 1 and 3 have no route: the positives
    curve = fallback_curve(slack, gold, points=5)
    # linspace(-0.3, 0.4, 5) and 0; a row falls back when its slack is below the offset.
    assert curve["offsets"] == [-0.3, -0.125, 0.0, 0.05, 0.225, 0.4]
    assert curve["precision"] == [None, 1.0, 1.0, 1.0, 0.75, 0.75]
    assert curve["recall"] == [0.0, 0.333333, 0.666667, 0.666667, 1.0, 1.0]
    assert curve["fallback_rate"] == [0.0, 0.2, 0.4, 0.4, 0.8, 0.8]
    assert curve["operating_point"] == {
        "offset": 0.0,
        "precision": 1.0,
        "recall": 0.666667,
        "fallback_rate": 0.4,
    }


def test_fallback_curve_without_out_of_scope_rows_has_no_recall() -> None:
    curve = fallback_curve(np.array([0.1, -0.2]), np.array([0, 1]), points=3)
    assert all(r is None for r in curve["recall"])
    assert curve["operating_point"]["precision"] == 0.0  # one fallback, and it is wrong


def _table(
    method: str, shift: float, rng: np.random.Generator, energy: float | None = None
) -> RouteTable:
    """Four routes of three utterances; every cut moved by ``shift``."""
    dim, n_routes = 16, 4
    utts = rng.normal(size=(3 * n_routes, dim)).astype(np.float32)
    utts /= np.linalg.norm(utts, axis=1, keepdims=True)
    head = None
    if method == "head":
        head = HeadParams(
            weights=rng.normal(size=(dim, n_routes)).astype(np.float32),
            bias=np.zeros(n_routes, np.float32),
            blend=2.0,
            min_confidence=np.array([0.3, 0.4, 0.2, 0.5], np.float32) + shift,
            min_margin=0.05 + shift,
            min_energy=None if energy is None else energy + shift,
        )
    return RouteTable(
        names=("a", "b", "c", "d"),
        fallback="other",
        method=method,  # type: ignore[arg-type]
        top_k=3,
        thresholds=np.array([0.3, 0.2, 0.35, 0.25], np.float32) + shift,
        utterances=tuple(f"u{i}" for i in range(3 * n_routes)),
        utterance_route=np.repeat(np.arange(n_routes), 3),
        utterance_embeddings=utts,
        head=head,
    )


@pytest.mark.parametrize(
    ("method", "energy"), [("max", None), ("top5_mean", None), ("head", None), ("head", 0.3)]
)
def test_the_slack_is_the_decision_with_every_cut_moved(method: str, energy: float | None) -> None:
    """A query falls back under cuts moved by ``d`` exactly when its slack is below ``d``
    (the head's energy floor moved with the other cuts)."""
    queries = np.random.default_rng(1).normal(size=(400, 16)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    table = _table(method, 0.0, np.random.default_rng(0), energy)
    slack = fallback_slack(table, score_matrix(table, queries))
    for shift in (-0.15, -0.05, 0.0, 0.03, 0.1, 0.25):
        moved = _table(method, shift, np.random.default_rng(0), energy)  # same weights/utterances
        fallback = decide(moved, queries).is_fallback
        assert 0 < fallback.sum() < len(queries) or shift in (-0.15, 0.25)
        assert np.array_equal(slack < np.float32(shift), fallback), shift


# --- the page, in-process ----------------------------------------------------------------------

ROUTES = {
    "default_threshold": 0.3,
    "method": "max",
    "routes": [
        {"name": "billing", "utterances": ["charged twice on my card", "refund payment"]},
        {"name": "shipping", "utterances": ["where is my parcel", "tracking number"]},
        {"name": "login", "utterances": ["cannot log in", HOSTILE + " reset my password"]},
    ],
}
LABELLED: list[dict[str, Any]] = [
    {"text": "my card was charged twice", "label": "billing"},
    {"text": "refund my payment please", "label": "billing"},
    {"text": "where is my parcel now", "label": "shipping"},
    {"text": "tracking number for parcel", "label": "billing"},
    {"text": "i cannot log in", "label": "login"},
    {"text": HOSTILE + " reset password", "label": None},
    {"text": "what is the weather", "label": None},
    {"text": "tell me a joke", "label": None},
]


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _files(tmp_path: Path, routes: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    (tmp_path / "routes.json").write_text(json.dumps(routes))
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ["--routes", str(tmp_path / "routes.json"), "--data", str(tmp_path / "data.jsonl")]


def test_eval_html_in_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(_cli_offline, "make_encoder", lambda args: FakeEncoder())
    page = tmp_path / "out" / "report.html"
    argv = ["eval", *_files(tmp_path, ROUTES, LABELLED), "--json", "--html", str(page)]
    assert _cli.main(argv) == 0
    out = capsys.readouterr().out
    figures = json.loads(out.splitlines()[-1])  # the JSON stays the last line, as it was
    assert "confusion_matrix" not in figures and "fallback_curve" not in figures
    assert f"html report: {page}" in out
    html = page.read_text(encoding="utf-8")
    assert [f'id="{i}"' in html for i in FIGURE_IDS] == [True] * len(FIGURE_IDS)
    assert HOSTILE not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script" not in html.lower()
    for key in ("overall_accuracy", "fallback_precision", "fallback_recall"):
        assert f'data-key="{key}">{_fmt(figures[key])}<' in html
    # The curve's marked point is the figure eval prints.
    point = re.search(r"the cuts as they are: precision (\S+), recall (\S+)<", html)
    assert point is not None
    assert point.groups() == (_fmt(figures["fallback_precision"]), _fmt(figures["fallback_recall"]))
    assert list(tmp_path.joinpath("out").iterdir()) == [page]  # atomic: no temporary left


def test_eval_html_has_the_text_outputs_tables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The method comparison (method auto) and the overlapping route pairs, as eval prints."""
    monkeypatch.setattr(_cli_offline, "make_encoder", lambda args: FakeEncoder())
    page = tmp_path / "report.html"
    routes = {**ROUTES, "method": "auto"}
    argv = ["eval", *_files(tmp_path, routes, LABELLED), "--json", "--html", str(page)]
    assert _cli.main(argv) == 0
    figures = json.loads(capsys.readouterr().out.splitlines()[-1])
    html = page.read_text(encoding="utf-8")
    methods = html[html.index('id="methods"') :]
    assert figures["methods"] and methods.count("<tr>") == 1 + len(figures["methods"])
    for row in figures["methods"]:
        assert f'<td class="route">{row["candidate"]}' in methods
        assert f'<td class="n">{_fmt(row["top1_accuracy"])}</td>' in methods
    assert methods.count("&larr; auto") == 1
    overlaps = html[html.index('id="overlapping-routes"') : html.index('id="methods"')]
    for o in figures.get("overlapping_routes") or []:
        assert f"{o['routes'][0]} ~ {o['routes'][1]}" in overlaps
    assert ("<table>" in overlaps) == bool(figures.get("overlapping_routes"))
    # method max: no comparison, so no such table
    argv = ["eval", *_files(tmp_path, ROUTES, LABELLED), "--html", str(page)]
    assert _cli.main(argv) == 0
    assert 'id="methods"' not in page.read_text(encoding="utf-8")


def test_a_missing_report_extra_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ConfigError, match=r"pip install 'semroute-stream\[report\]'"):
        require_report_libraries()


# --- the page in headless Chromium -----------------------------------------------------------


def _clinc_slice(tmp_path: Path) -> list[str]:
    """The banking domain's 15 routes and their 300 dev rows, 40 out-of-scope rows, and a
    route whose utterance is markup, with 8 queries (no route) that are that utterance."""
    source = json.loads((DATASETS / "clinc150" / "routes.json").read_text(encoding="utf-8"))
    banking = [r for r in source["routes"] if r["domain"] == "banking"]
    probe = {"name": "html_probe", "utterances": [HOSTILE, "<b>bold</b> & <i>co</i>"]}
    routes = {**source, "routes": [*banking, probe]}
    names = {r["name"] for r in banking}
    rows = [
        json.loads(line)
        for line in (DATASETS / "clinc150" / "dev.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    kept = [r for r in rows if r["label"] in names] + [r for r in rows if r["label"] is None][:40]
    kept += [{"text": HOSTILE, "label": None}] * 8
    return _files(tmp_path, routes, kept)


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make system-deps` (installs Debian's chromium)")
    home = tmp_path / "chromium-home"
    env = {
        **os.environ,
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / "config"),
        "XDG_CACHE_HOME": str(home / "cache"),
    }
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        f"--crash-dumps-dir={tmp_path / 'chromium-crashes'}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        *args,
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=120, check=False, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def _figure(dom: str, figure_id: str) -> str:
    match = re.search(rf'<figure id="{figure_id}">(.*?)</figure>', dom, flags=re.DOTALL)
    assert match is not None, f"no figure {figure_id!r} in the page"
    return match.group(1)


@pytest.mark.slow
def test_eval_html_in_headless_chromium(tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    script = Path(sys.executable).with_name("semroute-stream")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "semroute_stream"]
    result = subprocess.run(
        [*command, "eval", *_clinc_slice(tmp_path), "--json", "--html", str(page)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
        env={**os.environ, "SEMROUTE_CACHE_DIR": str(tmp_path / "cache")},
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.splitlines()[-1])
    html = page.read_text(encoding="utf-8")
    assert "http://" not in html and "https://" not in html  # nothing fetched, nowhere to

    dom = _chromium(tmp_path, "--dump-dom", page.as_uri()).stdout
    assert "<title>Routing evaluation: " in dom
    for figure_id in ("confusion", "fallback-curve", "f1-bars"):
        body = _figure(dom, figure_id)
        assert body.count("<svg") == 1 and body.count("<path") >= 20, figure_id
        assert "<figcaption>" in body and 'role="img"' in body, figure_id
    assert "(fallback)" in _figure(dom, "confusion")
    assert all(name in _figure(dom, "f1-bars") for name in ("balance", "report_fraud"))
    table = _figure(dom, "confusing")
    assert table.count("<tr>") >= 2 and "&lt;script&gt;alert(1)&lt;/script&gt;" in table
    assert "<script" not in dom.lower()  # the utterance stayed text
    assert not re.search(r"""(src|href)=["']?https?:|url\(["']?https?:""", dom)
    for key in ("overall_accuracy", "in_scope_accuracy", "fallback_precision", "fallback_recall"):
        assert f'data-key="{key}">{figures[key]:.3f}<' in dom, key
    assert figures["routes_version"] in dom and figures["model"] in dom

    shot = tmp_path / "report.png"
    _chromium(tmp_path, f"--screenshot={shot}", page.as_uri())
    with Image.open(shot) as image:
        assert image.size == WINDOW
        stats = ImageStat.Stat(image.convert("L"))
    assert stats.stddev[0] > 20.0  # not blank: text, bars and a heatmap
