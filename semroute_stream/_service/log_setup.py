"""Log set-up for the service: plain text or one JSON object per line.

Fields passed with ``extra=`` (the service puts ``topic``, ``partition``, ``offset`` on every
line about one message, plus ``kind``, ``route``, ``endpoint`` where known) become JSON keys, or
``key=value`` pairs after the text message. Message text is only ever passed (as ``text``) when
``logging.log_message_text`` is on; secrets are never passed.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

from .settings import LoggingConfig

__all__ = ["JsonFormatter", "TextFormatter", "setup_logging"]

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """``{"ts": ..., "level": ..., "logger": ..., "msg": ..., <extras>, "exc": ...}``."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_extras(record),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class TextFormatter(logging.Formatter):
    """The classic line, then the extras as ``key=value``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = _extras(record)
        if not extras:
            return line
        pairs = " ".join(f"{k}={v}" for k, v in extras.items())
        head, sep, tail = line.partition("\n")  # keep a traceback below the pairs
        return f"{head} [{pairs}]{sep}{tail}"


def setup_logging(config: LoggingConfig, level: str | None = None) -> None:
    """Configure the root logger (stderr); ``level`` (e.g. from the CLI) beats the config's."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if config.format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel((level or config.level).upper())
    # One line per HTTP request is noise at info level (and may carry URLs); keep warnings.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(root.level, logging.WARNING))
