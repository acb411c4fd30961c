"""The service commands: ``run`` (the Kafka service), ``replay``, ``check``, and for first runs
``topics create`` and ``publish``.

Each imports the service's modules when it runs (the package itself already loads them: its
public API includes ``run_service``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import orjson

__all__ = ["cmd_check", "cmd_publish", "cmd_replay", "cmd_run", "cmd_topics_create"]


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
    if not stats.stopped_by.startswith("replay"):  # a signal: the range was not worked off
        print(f"error: replay stopped before its end offsets ({stats.stopped_by})", file=sys.stderr)
        return 1
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Validate the config and routes, reach the broker and every LLM endpoint."""
    import asyncio

    from .._service.check import check

    return asyncio.run(check(args.config, say=lambda finding: print(finding.line(), flush=True)))


def cmd_topics_create(args: argparse.Namespace) -> int:
    """Create the topics the config needs; existing ones are reported, not errors."""
    import asyncio

    from .._routing.schema import load_routes
    from .._service.settings import load_settings
    from .._service.topics import create_topics, topic_roles

    settings = load_settings(args.config)
    roles = topic_roles(settings, load_routes(settings.routes))
    done = asyncio.run(
        create_topics(settings, [t for t, _ in roles], args.partitions, args.replication_factor)
    )
    for topic, role in roles:
        print(f"{done[topic]:<24} {topic} ({role})")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    """Make the candidate routes file (``shadow.routes``) the live one."""
    from .._service.settings import load_settings
    from .._service.shadow import promote

    done = promote(load_settings(args.config), backup=not args.no_backup)
    print(
        f"promoted {done.candidate} (version {done.new_version}) to {done.live} "
        f"(was version {done.old_version or 'unreadable'})"
    )
    if done.backup is not None:
        print(f"the previous routes file is kept as {done.backup}")
    print("a running service reloads it at its next check (reload.watch_interval_s) or on SIGHUP")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    """Send JSON lines (or text lines) to the input topic; print how many were acknowledged."""
    import asyncio

    from .._service.publish import parse_lines, publish
    from .._service.settings import load_settings

    settings = load_settings(args.config)
    topic = args.topic or settings.input.topic
    if args.file == "-":
        messages = parse_lines(sys.stdin, settings, text=args.text)
    else:
        with open(args.file, encoding="utf-8") as fh:
            messages = parse_lines(fh, settings, text=args.text)
    acked, error = asyncio.run(publish(settings, topic, messages))
    print(orjson.dumps({"topic": topic, "messages": len(messages), "acknowledged": acked}).decode())
    if error is not None:
        print(f"error: {len(messages) - acked} not acknowledged: {error}", file=sys.stderr)
        return 1
    return 0


def cmd_overlay(args: argparse.Namespace) -> int:
    """``overlay show|export|rollback``: print the result as JSON."""
    import asyncio

    from .._service import overlay_admin
    from .._service.settings import load_settings

    settings = load_settings(args.config)
    if args.overlay_command == "show":
        result = asyncio.run(overlay_admin.show_overlay(settings, recent=args.recent))
    elif args.overlay_command == "export":
        result = asyncio.run(overlay_admin.export_overlay(settings, Path(args.output)))
    else:
        result = asyncio.run(overlay_admin.rollback_overlay(settings, args.version))
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    return 0
