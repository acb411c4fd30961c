"""The ``semroute-stream`` command line: run (the Kafka service), replay, check, topics create,
promote, publish, embed, eval, fit, route, tune, import-routes, schema and stub-llm.

One ``cmd_*`` function per subcommand (``serve`` and ``offline``), registered here in
``build_parser()``; a new subcommand is one more ``add_parser`` and one more function.
Exit codes: 0 done, 1 failure, 2 bad config/input/usage (printed as ``error: ...``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from .._errors import ConfigError, InputError, SemrouteError
from .._offline.fit.thresholds import DEFAULT_OBJECTIVE, DEFAULT_OOS_RATE, OBJECTIVES
from .._routing.importers import IMPORT_FORMATS
from .._routing.schema import ROUTES_METHODS
from .._schemas import SCHEMA_NAMES
from .arguments import fraction, oos_rate, positive_int
from .offline import (
    ENCODE_BATCH,
    cmd_embed,
    cmd_eval,
    cmd_fit,
    cmd_import_routes,
    cmd_route,
    cmd_schema,
)
from .serve import (
    cmd_check,
    cmd_overlay,
    cmd_promote,
    cmd_publish,
    cmd_replay,
    cmd_run,
    cmd_topics_create,
)
from .tune import add_tune

__all__ = ["LOG_LEVELS", "build_parser", "main"]

LOG_LEVELS = ["debug", "info", "warning", "error"]


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("encoder")
    group.add_argument(
        "--model", help="built-in model name or a model directory (default: all-MiniLM-L6-v2)"
    )
    group.add_argument("--max-length", type=int, help="max tokens per text (default 256)")
    group.add_argument("--threads", type=int, help="inference threads (default: one per core)")
    group.add_argument(
        "--backend",
        choices=["auto", "onnxruntime", "openvino"],
        help="inference backend (default auto: OpenVINO when installed, else ONNX Runtime)",
    )
    group.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        help="default auto: bf16 on CPUs with native bf16 units when the model passes the probe",
    )
    return common


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("semroute-stream")
    except PackageNotFoundError:  # run from a checkout that was never installed
        from .. import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand; each sets ``func``, the ``cmd_*`` that runs it."""
    parser = argparse.ArgumentParser(
        prog="semroute-stream",
        description="Route text queries by meaning (MiniLM embeddings + example utterances).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common_options()
    methods = list(ROUTES_METHODS)
    _add_run(sub)
    _add_replay(sub)
    _add_check(sub)
    _add_topics(sub)
    _add_overlay(sub)
    _add_promote(sub)
    _add_publish(sub)
    _add_embed(sub, common)
    _add_eval(sub, common, methods)
    _add_fit(sub, common, methods)
    _add_route(sub, common, methods)
    _add_tune(sub)
    _add_import_routes(sub)
    _add_schema(sub)
    _add_stub_llm(sub)
    return parser


def _add_run(sub: Any) -> None:
    p = sub.add_parser(
        "run",
        help="run the Kafka service (consume, route, call LLMs, publish)",
        description="Consume queries from Kafka in micro-batches, route them, call each route's "
        "LLM endpoint and publish one outcome per input. SIGTERM/SIGINT drains and exits, "
        "SIGHUP reloads the routes file.",
    )
    p.add_argument("--config", required=True, help="service config (YAML)")
    p.add_argument(
        "--max-messages", type=positive_int, help="stop (after draining) once N messages are taken"
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        metavar="SECONDS",
        help="stop (after draining) when nothing new has arrived for this long",
    )
    p.add_argument("--log-level", choices=LOG_LEVELS, help="default: the config's logging.level")
    p.set_defaults(func=cmd_run)


def _add_replay(sub: Any) -> None:
    p = sub.add_parser(
        "replay",
        help="reprocess a range of the input topic (to the outputs or a JSONL file), then stop",
        description="Read the input topic from the beginning, an offset or a timestamp up to the "
        "end offsets seen at start, with manual assignment and a consumer group of its own "
        "(<group_id>.replay.<time>); route and answer every message like the service does.",
    )
    p.add_argument("--config", required=True, help="service config (YAML)")
    start = p.add_mutually_exclusive_group(required=True)
    start.add_argument(
        "--from-beginning", action="store_true", help="from each partition's first offset"
    )
    start.add_argument("--from-offset", type=int, metavar="N", help="the same offset everywhere")
    start.add_argument(
        "--from-timestamp", metavar="TIME", help="ISO 8601 (no zone: UTC) or epoch milliseconds"
    )
    p.add_argument("--partitions", help="e.g. 0,1 or 0-3 (default: all)")
    p.add_argument("--output", help="write the records to this JSONL file instead of the topics")
    p.add_argument("--log-level", choices=LOG_LEVELS, help="default: the config's logging.level")
    p.set_defaults(func=cmd_replay)


def _add_check(sub: Any) -> None:
    p = sub.add_parser(
        "check",
        help="validate the config and routes, reach the broker and the LLM endpoints",
        description="Exit 0: all good; 1: a problem found (listed); 2: the config cannot be read.",
    )
    p.add_argument("--config", required=True, help="service config (YAML)")
    p.set_defaults(func=cmd_check)


def _add_topics(sub: Any) -> None:
    p = sub.add_parser(
        "topics",
        help="create the topics a config needs (first runs)",
        description="Topic administration for first runs.",
    )
    topics = p.add_subparsers(dest="topics_command", required=True, metavar="ACTION")
    c = topics.add_parser(
        "create",
        help="create the input, responses, dead-letter and retry topics",
        description="Create the input topic, the responses topic (one per route with "
        "output.per_route_topics), the dead-letter topic, the retry topics and, when on, the "
        "review and shadow topics. Topics that "
        "exist already are reported and left as they are.",
    )
    c.add_argument("--config", required=True, help="service config (YAML)")
    c.add_argument("--partitions", type=positive_int, default=3, help="default 3")
    c.add_argument(
        "--replication-factor",
        type=positive_int,
        help="default: 3, or the number of brokers when there are fewer",
    )
    c.set_defaults(func=cmd_topics_create)


def _add_overlay(sub: Any) -> None:
    p = sub.add_parser(
        "overlay",
        help="show, export or roll back the overlay of learned corrections",
        description="The overlay of corrections (learning.overlay_topic, docs/learning.md): "
        "show its version and entries, export the routes file plus the overlay as a routes "
        "file (for fit and eval), or roll it back to an earlier version.",
    )
    actions = p.add_subparsers(dest="overlay_command", required=True, metavar="ACTION")
    show = actions.add_parser("show", help="version, entries per label, latest entries")
    show.add_argument("--recent", type=positive_int, default=10, help="latest entries (10)")
    export = actions.add_parser("export", help="write the routes file plus the overlay")
    export.add_argument("--output", "-o", required=True, help="routes file to write")
    back = actions.add_parser("rollback", help="return the overlay to an earlier version")
    back.add_argument("version", help="a version listed by overlay show ('empty': none)")
    for action in (show, export, back):
        action.add_argument("--config", required=True, help="service config (YAML)")
        action.set_defaults(func=cmd_overlay)


def _add_promote(sub: Any) -> None:
    p = sub.add_parser(
        "promote",
        help="make the shadow (candidate) routes file the live routes file",
        description="Validate the candidate routes file (shadow.routes) as live routes, keep "
        "the live file as <routes>.before-promote, then replace the live file atomically with "
        "the candidate. A running service reloads it at its next check (or on SIGHUP).",
    )
    p.add_argument("--config", required=True, help="service config (YAML)")
    p.add_argument("--no-backup", action="store_true", help="do not keep the previous file")
    p.set_defaults(func=cmd_promote)


def _add_publish(sub: Any) -> None:
    p = sub.add_parser(
        "publish",
        help="send JSON lines (or lines of text) to the input topic",
        description="Send one message per non-blank line to the config's input topic (or "
        "--topic), keyed by the id field when a JSON line has one; print how many the "
        "brokers acknowledged. Every line is checked before anything is sent.",
    )
    p.add_argument("--config", required=True, help="service config (YAML)")
    p.add_argument("--topic", help="default: the config's input.topic")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--jsonl", action="store_true", help="JSON objects, one a line (default)")
    kind.add_argument(
        "--text", action="store_true", help='lines of text, each sent as {"text": line}'
    )
    p.add_argument("file", metavar="FILE", help="the lines to send; - for stdin")
    p.set_defaults(func=cmd_publish)


def _add_embed(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "embed",
        parents=[common],
        help="embed texts (stdin lines or JSONL) to JSON lines",
        description="Texts one per line on stdin, or --input JSONL with a text field; writes "
        '{"text": ..., "embedding": [...]} per text, in input order.',
    )
    p.add_argument("--input", help="JSONL file with a text field (default: lines on stdin)")
    p.add_argument("--output", help="output file (default: stdout)")
    p.add_argument(
        "--text-field", default="text", help="the JSON field holding the text (default text)"
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=ENCODE_BATCH,
        help=f"texts encoded at once (default {ENCODE_BATCH})",
    )
    p.set_defaults(func=cmd_embed)


def _add_eval(sub: Any, common: argparse.ArgumentParser, methods: Sequence[str]) -> None:
    p = sub.add_parser(
        "eval",
        parents=[common],
        help="accuracy of a routes file on labelled JSONL",
        description='Labelled data: JSONL of {"text": ..., "label": route name or null}.',
    )
    p.add_argument("--routes", required=True, help="routes file (YAML or JSON)")
    p.add_argument("--data", required=True, help="labelled JSONL")
    p.add_argument("--method", choices=methods, help="override the routes file's method")
    p.add_argument("--json", action="store_true", help="end with one JSON line of figures")
    p.add_argument(
        "--html",
        metavar="PATH",
        help="also write the figures as one self-contained HTML page with charts (needs the "
        "[report] extra: pip install 'semroute-stream[report]')",
    )
    p.set_defaults(func=cmd_eval)


def _add_fit(sub: Any, common: argparse.ArgumentParser, methods: Sequence[str]) -> None:
    p = sub.add_parser(
        "fit",
        parents=[common],
        help="fit thresholds on labelled JSONL and write new routes",
        description="Choose the routes' decision method and fit its fallback (thresholds or "
        "the head's floors) on labelled JSONL, then write the result as a new routes file: the "
        "input file is never changed. Prints the before/after figures.",
    )
    p.add_argument("--routes", required=True, help="routes file (YAML or JSON)")
    p.add_argument("--data", required=True, help="labelled JSONL")
    p.add_argument("--out", required=True, help="new routes file (.json for JSON, else YAML)")
    p.add_argument(
        "--method",
        choices=methods,
        help="fit only this method (default auto: compare max, top5_mean and the route head "
        "on the data and write the best)",
    )
    p.add_argument(
        "--min-support",
        type=positive_int,
        default=5,
        help="labelled rows a route needs to get its own threshold (default 5)",
    )
    p.add_argument(
        "--add-utterances",
        choices=["none", "errors", "all"],
        default="none",
        help="also add labelled rows to their route's utterances: all of them, or those "
        "the routes get wrong (default none); the method and fallback then come from "
        "cross-validation on the enlarged utterances",
    )
    p.add_argument(
        "--objective",
        choices=list(OBJECTIVES),
        default=DEFAULT_OBJECTIVE,
        help="what the fallback is tuned for: balanced (default) = the expected overall "
        "accuracy at --expected-oos-rate out-of-scope traffic, whatever the data's own share; "
        "accuracy = rows right on the data (its out-of-scope share becomes the fallback's)",
    )
    p.add_argument(
        "--expected-oos-rate",
        type=oos_rate,
        default=DEFAULT_OOS_RATE,
        metavar="R",
        help=f"the out-of-scope share of the traffic, in [0, 1), for --objective balanced "
        f"(default {DEFAULT_OOS_RATE})",
    )
    p.add_argument("--json", action="store_true", help="end with one JSON line of figures")
    p.set_defaults(func=cmd_fit)


def _add_route(sub: Any, common: argparse.ArgumentParser, methods: Sequence[str]) -> None:
    p = sub.add_parser(
        "route",
        parents=[common],
        help="route a JSONL file (offline batch mode)",
        description="One output line per good input line (input order); bad lines go to the "
        "rejects file with their line number.",
    )
    p.add_argument("--routes", required=True, help="routes file (YAML or JSON)")
    p.add_argument("--input", required=True, help="JSONL file of queries (--text: lines of text)")
    p.add_argument("--output", required=True, help="routed JSONL to write (its folder must exist)")
    p.add_argument("--rejects", help="bad lines go here (default: OUTPUT.rejects.jsonl)")
    p.add_argument(
        "--text", action="store_true", help="the input is lines of text, not JSON objects"
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=256, help="lines encoded at once (default 256)"
    )
    p.add_argument(
        "--text-field", default="text", help="the JSON field holding the query (default text)"
    )
    p.add_argument(
        "--id-field", default="id", help="the JSON field copied as the output's id (default id)"
    )
    p.add_argument(
        "--max-text-chars",
        type=positive_int,
        default=8_000,
        help="a longer text is rejected as oversized (default 8000)",
    )
    p.add_argument(
        "--max-reject-rate",
        type=fraction,
        default=None,
        metavar="R",
        help="exit 1 when more than this share of the lines (0-1) was rejected "
        "(default: exit 1 only when every line was)",
    )
    p.add_argument("--method", choices=methods, help="override the routes file's method")
    p.set_defaults(func=cmd_route)


def _add_tune(sub: Any) -> None:
    add_tune(sub)  # its options and cmd_tune live in _cli/tune.py


def _add_import_routes(sub: Any) -> None:
    p = sub.add_parser(
        "import-routes",
        help="convert semantic-router or LiteLLM routes into a routes file",
        description="Read aurelio semantic-router routes (JSON/YAML export) or a LiteLLM config "
        "with a semantic auto router; write a semroute-stream routes file. Every key dropped "
        "is printed as a warning; conflicts (duplicate names, empty utterances, thresholds "
        "outside [-1, 1]) exit 2.",
    )
    p.add_argument("input", metavar="IN", help="the file to import (YAML, or .json)")
    p.add_argument(
        "--from",
        dest="format",
        choices=list(IMPORT_FORMATS),
        default="auto",
        help="its format (default auto: model_list -> litellm, routes -> aurelio)",
    )
    p.add_argument("--out", required=True, help="routes file to write (.json for JSON, else YAML)")
    p.set_defaults(func=cmd_import_routes)


def _add_schema(sub: Any) -> None:
    p = sub.add_parser(
        "schema",
        help="print a JSON Schema: routes file, service config, outcome or dead-letter record",
        description="Print the JSON Schema (draft 2020-12) of the routes file, the service "
        "config, or the outcome / dead-letter / review / shadow records (docs/schema/).",
    )
    p.add_argument("name", choices=list(SCHEMA_NAMES))
    p.set_defaults(func=cmd_schema)


def _add_stub_llm(sub: Any) -> None:
    from .. import _stub_llm  # stdlib only

    p = sub.add_parser(
        "stub-llm",
        help="serve a stand-in OpenAI-compatible LLM endpoint (demos, docker/compose.yaml)",
        description="An OpenAI-compatible chat-completions server that answers "
        "'[system: FIRST LINE] echo: LAST USER MESSAGE' after --latency-ms; GET /healthz, "
        "/v1/models. Serves until SIGTERM/SIGINT.",
    )
    _stub_llm.add_arguments(p)
    p.set_defaults(func=_stub_llm.serve)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except InputError as err:
        print(f"error: {err.reason} ({err.kind})", file=sys.stderr)
        return 2
    except SemrouteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
