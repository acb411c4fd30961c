"""The service commands: ``run`` (the Kafka service), ``replay`` and ``check``.

Each imports the service's modules when it runs (the package itself already loads them: its
public API includes ``run_service``).
"""

from __future__ import annotations

import argparse
import sys

import orjson

__all__ = ["cmd_check", "cmd_replay", "cmd_run"]


def cmd_run(args: argparse.Namespace) -> int:
    """The streaming service: consume, route, call the LLM workers, publish, commit."""
    import asyncio

    from .._service.app import run_service
    from .._service.log_setup import setup_logging
    from .._service.settings import load_settings

    settings = load_settings(args.config)
    setup_logging(settings.logging, args.log_level)
    try:
        stats = asyncio.run(
            run_service(settings, max_messages=args.max_messages, idle_timeout_s=args.idle_timeout)
        )
    except asyncio.CancelledError:  # a second signal: exit at once, uncommitted work is redone
        print("error: stopped without draining (second signal)", file=sys.stderr)
        return 130
    print(orjson.dumps(stats.as_dict()).decode())
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    """Reprocess a range of the input topic, then stop (see semroute_stream/_replay.py)."""
    import asyncio

    from .._service.log_setup import setup_logging
    from .._service.replay import ReplayStart, parse_partitions, parse_timestamp, run_replay
    from .._service.settings import load_settings

    settings = load_settings(args.config)
    setup_logging(settings.logging, args.log_level)
    if args.from_timestamp is not None:
        start = ReplayStart(timestamp_ms=parse_timestamp(args.from_timestamp))
    elif args.from_offset is not None:
        start = ReplayStart(offset=args.from_offset)
    else:
        start = ReplayStart(beginning=True)
    partitions = parse_partitions(args.partitions) if args.partitions else None
    try:
        stats = asyncio.run(run_replay(settings, start, partitions=partitions, output=args.output))
    except asyncio.CancelledError:
        print("error: stopped without draining (second signal)", file=sys.stderr)
        return 130
    print(orjson.dumps({**stats.as_dict(), "output": args.output}).decode())
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Validate the config and routes, reach the broker and every LLM endpoint."""
    import asyncio

    from .._service.check import check

    return asyncio.run(check(args.config, say=lambda finding: print(finding.line(), flush=True)))
