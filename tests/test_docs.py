"""The documentation stays true to the code: every relative link resolves, and the settings
table in docs/configuration.md is what docs/gen_config_table.py makes from ``Settings``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "docs" / script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_every_relative_link_resolves() -> None:
    done = _run("check_links.py")
    assert done.returncode == 0, done.stdout + done.stderr


def test_settings_table_is_current() -> None:
    done = _run("gen_config_table.py", "--check")
    assert done.returncode == 0, done.stdout + done.stderr


def test_readme_names_the_test_command_ci_runs() -> None:
    assert "make test" in (ROOT / "README.md").read_text(encoding="utf-8")
    assert "make test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_the_shipped_labelled_example_fits_the_example_routes() -> None:
    """README's `eval` example: every label names a route of config/routes.example.yaml, every
    route has rows, and some rows have no route (the fallback is measured too)."""
    from semroute_stream import load_routes
    from semroute_stream._offline.labelled import load_labelled

    routes = load_routes(ROOT / "config" / "routes.example.yaml")
    data = load_labelled(
        ROOT / "semroute_stream" / "examples" / "tickets.labelled.jsonl", routes.names
    )
    assert set(data.labels) - {None} == set(routes.names)
    assert data.labels.count(None) >= 5
