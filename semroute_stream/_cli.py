"""The ``semroute-stream`` command line: run (the Kafka service), embed, eval, fit and route.

One ``cmd_*`` function per subcommand, registered in ``build_parser()``; a new subcommand
is one more ``add_parser`` and one more function.
Exit codes: 0 done, 1 failure, 2 bad config/input/usage (printed as ``error: ...``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import orjson
from pydantic import ValidationError
from tqdm import tqdm

from semroute_stream._decision import METHODS, RouteTable, route_scores, similarities
from semroute_stream._errors import ConfigError, InputError, SemrouteError
from semroute_stream._evaluate import (
    evaluate,
    fit_thresholds,
    label_indices,
    load_labelled,
    report,
)
from semroute_stream._offline import default_rejects_path, route_file
from semroute_stream._records import parse_input
from semroute_stream._router import Router, TextEncoder
from semroute_stream._routes import RoutesConfig, load_routes, routes_version, save_routes

__all__ = ["build_parser", "main", "make_encoder"]

ENCODE_BATCH = 256


# --- shared pieces -------------------------------------------------------------------------


def make_encoder(args: argparse.Namespace) -> TextEncoder:
    """The encoder the common options ask for (tests replace this function with a fake)."""
    from semroute_stream._encoder import Encoder, EncoderConfig

    options = {
        "model": args.model,
        "max_length": args.max_length,
        "intra_op_threads": args.threads,
    }
    try:
        config = EncoderConfig(**{k: v for k, v in options.items() if v is not None})
    except ValidationError as err:
        raise ConfigError(f"encoder options: {err}") from None
    return Encoder(config)


def _progress() -> bool:
    return sys.stderr.isatty()


def _encode_all(encoder: TextEncoder, texts: Sequence[str], desc: str) -> np.ndarray:
    """All texts' embeddings, encoded in batches (with a progress bar on a terminal)."""
    if not texts:
        return np.zeros((0, encoder.dim), dtype=np.float32)
    parts = []
    with tqdm(total=len(texts), desc=desc, disable=not _progress(), leave=False) as bar:
        for start in range(0, len(texts), ENCODE_BATCH):
            chunk = texts[start : start + ENCODE_BATCH]
            parts.append(encoder.encode(chunk))
            bar.update(len(chunk))
    return np.concatenate(parts).astype(np.float32, copy=False)


def _load_routes(args: argparse.Namespace) -> RoutesConfig:
    routes = load_routes(args.routes)
    method = getattr(args, "method", None)
    if method is not None and method != routes.method:
        routes = routes.model_copy(update={"method": method})
    return routes


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _print_json_last(data: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(data).decode() + "\n")


# --- embed ---------------------------------------------------------------------------------


def _texts_from_stdin() -> Iterator[str]:
    for number, raw in enumerate(sys.stdin.buffer, start=1):
        line = raw.rstrip(b"\r\n") if raw.endswith(b"\n") else raw
        try:
            yield line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise InputError(
                "invalid_utf8", f"stdin:{number}: not valid UTF-8 at byte {err.start}"
            ) from None


def _texts_from_jsonl(path: str, text_field: str) -> Iterator[str]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            line = raw.rstrip(b"\r\n") if raw.endswith(b"\n") else raw
            try:
                query = parse_input(
                    line,
                    format="json",
                    text_field=text_field,
                    id_field="id",
                    max_bytes=1 << 30,
                    max_chars=1 << 30,
                )
            except InputError as err:
                raise InputError(err.kind, f"{path}:{number}: {err.reason}") from None
            yield query.text


def cmd_embed(args: argparse.Namespace) -> int:
    texts = _texts_from_jsonl(args.input, args.text_field) if args.input else _texts_from_stdin()
    encoder = make_encoder(args)
    out: TextIO = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115
    try:
        batch: list[str] = []
        for text in _with_end(texts):
            if text is not None:
                batch.append(text)
            if batch and (text is None or len(batch) >= args.batch_size):
                vectors = encoder.encode(batch)
                for t, v in zip(batch, np.ascontiguousarray(vectors, np.float32), strict=True):
                    line = {"text": t, "embedding": v}
                    out.write(orjson.dumps(line, option=orjson.OPT_SERIALIZE_NUMPY).decode() + "\n")
                batch = []
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


def _with_end(texts: Iterator[str]) -> Iterator[str | None]:
    yield from texts
    yield None


# --- eval ----------------------------------------------------------------------------------


def _print_report(figures: dict[str, Any], worst: int = 5) -> None:
    print(
        f"rows: {figures['n']} ({figures['n_in_scope']} in scope, "
        f"{figures['n_out_of_scope']} out of scope); method: {figures['method']}"
    )
    for key, label in (
        ("overall_accuracy", "overall accuracy"),
        ("in_scope_accuracy", "in-scope accuracy"),
        ("top1_accuracy", "top-1 in-scope (no thresholds)"),
        ("fallback_precision", "fallback precision"),
        ("fallback_recall", "fallback recall"),
        ("fallback_rate", "fallback rate"),
        ("macro_f1", "macro F1 (routes with data)"),
    ):
        print(f"  {label:<32}{_fmt(figures[key])}")
    ranked = sorted(
        ((name, r) for name, r in figures["per_route"].items() if r["support"]),
        key=lambda item: (item[1]["f1"] or 0.0, item[0]),
    )
    if ranked:
        print("  weakest routes (F1, precision, recall, support):")
        for name, r in ranked[:worst]:
            print(
                f"    {name:<30}{_fmt(r['f1'])}  {_fmt(r['precision'])}  "
                f"{_fmt(r['recall'])}  {r['support']}"
            )
    if figures["confusions"]:
        print("  most frequent confusions (gold -> predicted: count):")
        for c in figures["confusions"][:10]:
            gold = c["gold"] if c["gold"] is not None else "(no route)"
            pred = c["predicted"] if c["predicted"] is not None else "(fallback)"
            print(f"    {gold} -> {pred}: {c['count']}")


def cmd_eval(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    routes = _load_routes(args)
    data = load_labelled(args.data, routes.names)
    encoder = make_encoder(args)
    router = Router(routes, encoder)
    t0 = time.perf_counter()
    embeddings = _encode_all(encoder, data.texts, "encoding")
    encode_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    figures = evaluate(router.table, embeddings, data.labels)
    decide_seconds = time.perf_counter() - t0
    seconds = time.perf_counter() - started
    print(f"routes: {args.routes} ({len(routes.routes)} routes, version {router.version})")
    print(f"data: {args.data}")
    _print_report(figures)
    print(
        f"seconds: {seconds:.2f} total, {encode_seconds:.2f} encoding {len(data)} texts, "
        f"{decide_seconds:.3f} deciding"
    )
    if args.json:
        _print_json_last(
            {
                **figures,
                "routes": str(args.routes),
                "data": str(args.data),
                "routes_version": router.version,
                "model": encoder.model_name,
                "seconds": round(seconds, 3),
                "encode_seconds": round(encode_seconds, 3),
                "decide_seconds": round(decide_seconds, 4),
            }
        )
    return 0


# --- fit -----------------------------------------------------------------------------------


def cmd_fit(args: argparse.Namespace) -> int:
    routes = _load_routes(args)
    data = load_labelled(args.data, routes.names)
    encoder = make_encoder(args)
    router = Router(routes, encoder)
    embeddings = _encode_all(encoder, data.texts, "encoding")
    before = evaluate(router.table, embeddings, data.labels)

    t0 = time.perf_counter()
    fitted = fit_thresholds(
        routes, router.table, embeddings, data.labels, min_support=args.min_support
    )
    fit_seconds = time.perf_counter() - t0
    save_routes(fitted, args.out)

    # The figures of the file as written and read back.
    reloaded = load_routes(args.out)
    table = RouteTable.build(reloaded, router.table.utterance_embeddings)
    gold = label_indices(table, data.labels)
    after = report(table, route_scores(table, similarities(table, embeddings)), gold)

    tuned = sum(route.threshold is not None for route in reloaded.routes)
    print(f"routes: {args.routes} -> {args.out} (version {routes_version(reloaded)})")
    print(
        f"default threshold: {routes.default_threshold} -> {reloaded.default_threshold}; "
        f"{tuned} of {len(reloaded.routes)} routes have their own threshold "
        f"(min support {args.min_support}); fit took {fit_seconds:.2f} s"
    )
    print(f"{'':<34}{'before':>8}{'after':>8}")
    for key in (
        "overall_accuracy",
        "in_scope_accuracy",
        "top1_accuracy",
        "fallback_precision",
        "fallback_recall",
        "macro_f1",
    ):
        print(f"  {key:<32}{_fmt(before[key]):>8}{_fmt(after[key]):>8}")
    print("(figures on the fitting data itself: check on held-out data)")
    if args.json:
        _print_json_last(
            {
                "out": str(args.out),
                "routes_version": routes_version(reloaded),
                "default_threshold": reloaded.default_threshold,
                "routes_with_threshold": tuned,
                "fit_seconds": round(fit_seconds, 3),
                "before": {k: v for k, v in before.items() if k not in ("per_route",)},
                "after": {k: v for k, v in after.items() if k not in ("per_route",)},
            }
        )
    return 0


# --- route (offline file mode) -------------------------------------------------------------


def cmd_route(args: argparse.Namespace) -> int:
    routes = _load_routes(args)
    if not os.path.isfile(args.input):
        raise ConfigError(f"no such input file: {args.input}")
    router = Router(routes, make_encoder(args))
    rejects = Path(args.rejects) if args.rejects else default_rejects_path(args.output)

    def on_reject(line: int, err: InputError) -> None:
        print(f"{args.input}:{line}: rejected: {err.kind}: {err.reason}", file=sys.stderr)

    summary = route_file(
        router,
        args.input,
        args.output,
        rejects,
        batch_size=args.batch_size,
        text_field=args.text_field,
        id_field=args.id_field,
        max_text_chars=args.max_text_chars,
        progress=_progress(),
        on_reject=on_reject,
    )
    rate = summary.routed / summary.seconds if summary.seconds > 0 else 0.0
    print(
        f"routed {summary.routed} of {summary.lines} lines in {summary.seconds:.2f} s "
        f"({rate:.0f}/s) -> {args.output}"
    )
    for name, count in summary.per_route.most_common():
        print(f"  {name:<30}{count:>7}")
    if summary.rejected:
        kinds = ", ".join(f"{k}: {n}" for k, n in summary.rejects_by_kind.most_common())
        print(f"rejected {summary.rejected} lines ({kinds}) -> {rejects}")
    else:
        print(f"no rejected lines ({rejects} is empty)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """The streaming service: consume, route, call the LLM workers, publish, commit."""
    import asyncio
    import logging

    from semroute_stream._pipeline import run_service
    from semroute_stream._settings import load_settings

    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    settings = load_settings(args.config)
    try:
        stats = asyncio.run(
            run_service(settings, max_messages=args.max_messages, idle_timeout_s=args.idle_timeout)
        )
    except asyncio.CancelledError:  # a second signal: exit at once, uncommitted work is redone
        print("error: stopped without draining (second signal)", file=sys.stderr)
        return 130
    print(orjson.dumps(stats.as_dict()).decode())
    return 0


# --- parser and main -----------------------------------------------------------------------


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("encoder")
    group.add_argument(
        "--model", help="built-in model name or a model directory (default: all-MiniLM-L6-v2)"
    )
    group.add_argument("--max-length", type=int, help="max tokens per text (default 256)")
    group.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    return common


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="semroute-stream",
        description="Route text queries by meaning (MiniLM embeddings + example utterances).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common_options()
    methods = sorted(METHODS)

    p = sub.add_parser(
        "run",
        help="run the Kafka service (consume, route, call LLMs, publish)",
        description="Consume queries from Kafka in micro-batches, route them, call each route's "
        "LLM endpoint and publish one outcome per input. SIGTERM/SIGINT drains and exits.",
    )
    p.add_argument("--config", required=True, help="service config (YAML)")
    p.add_argument(
        "--max-messages", type=_positive, help="stop (after draining) once N messages are taken"
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        metavar="SECONDS",
        help="stop (after draining) when nothing new has arrived for this long",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "embed",
        parents=[common],
        help="embed texts (stdin lines or JSONL) to JSON lines",
        description="Texts one per line on stdin, or --input JSONL with a text field; writes "
        '{"text": ..., "embedding": [...]} per text, in input order.',
    )
    p.add_argument("--input", help="JSONL file with a text field (default: lines on stdin)")
    p.add_argument("--output", help="output file (default: stdout)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--batch-size", type=_positive, default=ENCODE_BATCH)
    p.set_defaults(func=cmd_embed)

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
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "fit",
        parents=[common],
        help="fit thresholds on labelled JSONL and write new routes",
    )
    p.add_argument("--routes", required=True, help="routes file (YAML or JSON)")
    p.add_argument("--data", required=True, help="labelled JSONL")
    p.add_argument("--out", required=True, help="new routes file (.json for JSON, else YAML)")
    p.add_argument("--method", choices=methods, help="fit for (and write) this method")
    p.add_argument(
        "--min-support",
        type=_positive,
        default=5,
        help="labelled rows a route needs to get its own threshold (default 5)",
    )
    p.add_argument("--json", action="store_true", help="end with one JSON line of figures")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser(
        "route",
        parents=[common],
        help="route a JSONL file (offline batch mode)",
        description="One output line per good input line (input order); bad lines go to the "
        "rejects file with their line number.",
    )
    p.add_argument("--routes", required=True, help="routes file (YAML or JSON)")
    p.add_argument("--input", required=True, help="JSONL file of queries")
    p.add_argument("--output", required=True, help="routed JSONL to write")
    p.add_argument("--rejects", help="bad lines go here (default: OUTPUT.rejects.jsonl)")
    p.add_argument("--batch-size", type=_positive, default=256)
    p.add_argument("--text-field", default="text")
    p.add_argument("--id-field", default="id")
    p.add_argument("--max-text-chars", type=_positive, default=8_000)
    p.add_argument("--method", choices=methods, help="override the routes file's method")
    p.set_defaults(func=cmd_route)
    return parser


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
