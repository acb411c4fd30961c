"""What the stub receives and answers: ``StubRequest``, ``StubFailure``, ``expected_content``.

Pure and stdlib only: the deterministic answer (see the package docstring) and the word counts
of its ``usage``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["STUB_OWNER", "StubFailure", "StubRequest", "expected_content", "text_of", "words"]

#: ``owned_by`` of every model the stub lists: it answers whatever model it is asked for, and
#: ``semroute-stream check`` tells it apart from a real endpoint by this.
STUB_OWNER = "llm-stub"


@dataclass(frozen=True)
class StubRequest:
    """One chat-completions request the stub received (whether it answered or failed it)."""

    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: Any  # the parsed JSON body (None if it was not JSON)
    received_at: float  # time.time()

    @property
    def messages(self) -> list[dict[str, Any]]:
        return list(self.body.get("messages", [])) if isinstance(self.body, dict) else []

    @property
    def model(self) -> str | None:
        return self.body.get("model") if isinstance(self.body, dict) else None


@dataclass(frozen=True)
class StubFailure:
    """How to fail one completion: an HTTP error, or a dropped connection."""

    status: int = 503
    retry_after: float | None = None
    message: str = "injected failure"
    disconnect: bool = False  # close the connection without any response


def text_of(content: Any) -> str:
    """Message content as text: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and "text" in p
        )
    return "" if content is None else str(content)


def expected_content(messages: list[dict[str, Any]], name: str | None = None) -> str:
    """The content the stub answers for ``messages`` (tests use it to build expectations)."""
    parts = []
    if name:
        parts.append(f"[{name}] ")
    system = next((m for m in messages if m.get("role") in ("system", "developer")), None)
    if system is not None:
        lines = text_of(system.get("content")).strip().splitlines()
        parts.append(f"[system: {lines[0].strip() if lines else ''}] ")
    user = next((m for m in reversed(messages) if m.get("role") == "user"), None)
    parts.append("echo: " + (text_of(user.get("content")) if user is not None else ""))
    return "".join(parts)


def words(text: str) -> int:
    return len(text.split())
