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
