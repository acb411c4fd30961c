"""The stub's command line: `semroute-stream stub-llm`, `python -m semroute_stream._stub_llm`."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from .server import LLMStub

__all__ = ["add_arguments", "main", "serve"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The stub's command-line options (``main`` and ``semroute-stream stub-llm``)."""
    parser.add_argument(
        "--host", default="127.0.0.1", help="listen address (default 127.0.0.1; 0.0.0.0: all)"
    )
    parser.add_argument("--port", type=int, default=8000, help="listen port (default 8000)")
    parser.add_argument(
        "--latency-ms", type=float, default=0.0, help="delay of every answer (default 0)"
    )
    parser.add_argument("--name", default=None, help="prefix answers with [NAME] (default none)")
    parser.add_argument(
        "--model",
        action="append",
        help="model id listed by /v1/models; repeatable (default stub-model)",
    )
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    parser.add_argument("--verbose", action="store_true", help="log every request")


def serve(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM (then stop and return 0)."""
    stub = LLMStub(
        args.port,
        args.latency_ms / 1000.0,
        host=args.host,
        name=args.name,
        models=tuple(args.model or ["stub-model"]),
        api_key=args.api_key,
        verbose=args.verbose,
    )
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    stub.start()
    print(f"llm-stub listening on {stub.url} (latency {args.latency_ms:g} ms)", flush=True)
    done.wait()
    stub.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="OpenAI-compatible chat-completions stub")
    add_arguments(parser)
    return serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
