"""Check the relative links of the Markdown documentation: every ``](target)`` in README.md,
DEVELOPING.md and docs/*.md must name a file or folder that exists, and a ``#anchor`` into a
Markdown file must match one of its headings (GitHub's rule: lower case, punctuation dropped,
spaces to hyphens). Links inside code blocks and to other sites are not checked.

    .venv/bin/python docs/check_links.py   # lists the broken links; exit 1 when there are any
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_FENCE = re.compile(r"```.*?```", re.S)
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of ``path``."""
    found = set()
    for line in _FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


def broken_links(files: list[Path]) -> list[str]:
    problems = []
    for file in files:
        for target in _LINK.findall(_FENCE.sub("", file.read_text(encoding="utf-8"))):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (file.parent / path).resolve() if path else file
            where = file.relative_to(ROOT)
            if not dest.exists():
                problems.append(f"{where}: {target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{where}: {target}: no heading #{anchor}")
    return problems


def main() -> int:
    files = [ROOT / "README.md", ROOT / "DEVELOPING.md", *sorted((ROOT / "docs").glob("*.md"))]
    problems = broken_links(files)
    for problem in problems:
        print(problem)
    print(f"{len(files)} files, {len(problems)} broken links", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
