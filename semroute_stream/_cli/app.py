"""The ``semroute-stream`` command line: run (the Kafka service), replay, check, embed, eval,
fit and route.

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

from .._errors import ConfigError, InputError, SemrouteError
from .._input import parse_input
from .._offline.evaluate import (
    Labelled,
    add_labelled_utterances,
    compare_methods,
    evaluate,
    fit_routes,
    label_indices,
    load_labelled,
    suspect_utterances,
)
from .._offline.route_file import default_rejects_path, route_file
from .._routing.decision import RouteTable
from .._routing.router import (
    Router,
    TextEncoder,
    head_texts,
    resolve_routes,
    train_route_head,
)
from .._routing.schema import (
    ROUTES_METHODS,
    RoutesConfig,
    load_routes,
    routes_version,
    save_routes,
)

__all__ = ["build_parser", "main", "make_encoder"]

ENCODE_BATCH = 256


# --- shared pieces -------------------------------------------------------------------------


def make_encoder(args: argparse.Namespace) -> TextEncoder:
    """The encoder the common options ask for (tests replace this function with a fake)."""
    from .._encoder import Encoder, EncoderConfig

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
    if figures.get("fallback_reasons"):
        reasons = ", ".join(f"{k}: {v}" for k, v in figures["fallback_reasons"].items())
        print(f"  fallbacks by reason: {reasons}")
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
    _print_authoring_aids(figures)


def _print_authoring_aids(figures: dict[str, Any]) -> None:
    if figures.get("suspect_utterances"):
        print("  utterances the cross-validation sends to another route (route -> goes to):")
        for c in figures["suspect_utterances"]:
            print(f"    {c['route']} -> {c['goes_to']}: {c['utterance']!r}")
    if figures.get("confusing_utterances"):
        print("  utterances that pull queries to the wrong route (count: route: utterance):")
        for c in figures["confusing_utterances"]:
            pulled = ", ".join(f"{k} {v}" for k, v in c["pulled_from"].items())
            print(f"    {c['count']:>3}: {c['route']}: {c['utterance']!r}  <- {pulled}")
    if figures.get("overlapping_routes"):
        print(
            "  overlapping routes (utterances whose nearest neighbour is in the other route, "
            "centroid cosine):"
        )
        for o in figures["overlapping_routes"]:
            a, b = o["routes"]
            line = f"    {a} ~ {b}: {o['nn_count']}, {o['centroid_similarity']:.3f}"
            pair = o.get("closest_pair")
            if pair:
                line += f"  e.g. {pair['utterances'][0]!r} ~ {pair['utterances'][1]!r}"
            print(line)


def _describe_resolution(router: Router) -> str:
    res = router.resolution
    table = res.table
    text = f"method: {table.method}"
    if table.head is not None:
        text += f" (blend {table.head.blend:g}, temperature {table.head.temperature:g})"
    if res.requested == "auto":
        reason = res.choice.reason if res.choice else f"nearest utterance: {res.note}"
        text += f"; auto: {reason}"
    elif res.requested != table.method:
        text += f" (requested {res.requested})"
    if res.head is not None:
        if res.head.cached:
            text += f"; head from cache ({res.head.seconds:.2f} s)"
        else:
            text += f"; head trained in {res.head.seconds:.2f} s"
    return text


def _print_comparison(rows: list[dict[str, Any]], chosen: str) -> None:
    print(
        "  methods on this data (top-1 in scope; overall with the defaults from the "
        "utterances; overall with one fallback setting fitted here; CV accuracy on the "
        "utterances):"
    )
    for row in rows:
        mark = " <- auto" if row["candidate"] == chosen else ""
        print(
            f"    {row['candidate']:<18}{_fmt(row['top1_accuracy']):>8}"
            f"{_fmt(row['overall_accuracy']):>8}{_fmt(row['fitted_overall_accuracy']):>8}"
            f"{_fmt(row.get('cv_accuracy')):>8}{mark}"
        )


def _chosen_label(router: Router) -> str:
    table = router.resolution.table
    if table.method == "head" and table.head is not None:
        return f"head(blend={table.head.blend:g})"
    return table.method


def cmd_eval(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    routes = _load_routes(args)
    data = load_labelled(args.data, routes.names)
    encoder = make_encoder(args)
    t0 = time.perf_counter()
    router = Router(routes, encoder)
    load_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    embeddings = _encode_all(encoder, data.texts, "encoding")
    encode_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    figures = evaluate(router.table, embeddings, data.labels, data.texts)
    decide_seconds = time.perf_counter() - t0
    head = router.resolution.head
    if head is not None and head.cv is not None:
        table = router.table
        blend = table.head.blend if table.head is not None else 0.0
        figures["suspect_utterances"] = suspect_utterances(table, head.cv, table.method, blend)
    comparison = (
        compare_methods(router.table, router.resolution.head, embeddings, data.labels, data.texts)
        if routes.method == "auto"
        else None
    )
    seconds = time.perf_counter() - started
    print(f"routes: {args.routes} ({len(routes.routes)} routes, version {router.version})")
    print(f"data: {args.data}")
    print(_describe_resolution(router))
    _print_report(figures)
    if comparison:
        _print_comparison(comparison, _chosen_label(router))
    print(
        f"seconds: {seconds:.2f} total, {load_seconds:.2f} loading the routes (utterances "
        f"and head), {encode_seconds:.2f} encoding {len(data)} texts, "
        f"{decide_seconds:.3f} deciding and reporting"
    )
    if args.json:
        _print_json_last(
            {
                **figures,
                "method_requested": routes.method,
                "resolution": router.resolution.summary(),
                "methods": comparison,
                "routes": str(args.routes),
                "data": str(args.data),
                "routes_version": router.version,
                "model": encoder.model_name,
                "seconds": round(seconds, 3),
                "load_seconds": round(load_seconds, 3),
                "encode_seconds": round(encode_seconds, 3),
                "decide_seconds": round(decide_seconds, 4),
            }
        )
    return 0


# --- fit -----------------------------------------------------------------------------------


def cmd_fit(args: argparse.Namespace) -> int:
    routes = load_routes(args.routes)
    requested = args.method or "auto"
    data = load_labelled(args.data, routes.names)
    encoder = make_encoder(args)
    router = Router(routes, encoder)
    embeddings = _encode_all(encoder, data.texts, "encoding")
    before = evaluate(router.table, embeddings, data.labels, data.texts)

    t0 = time.perf_counter()
    methods = ("max", "top5_mean", "head") if requested == "auto" else (requested,)
    names = router.name_embeddings
    if names is None and routes.head.use_names:
        names = encoder.encode(head_texts(routes))
    if args.add_utterances != "none":
        return _fit_adding_utterances(args, routes, router, names, embeddings, data, before)
    head = None
    if "head" in methods and len(routes.routes) >= 2:
        head = router.resolution.head
        if head is None or head.cv is None:
            head = train_route_head(
                routes,
                router.utterance_embeddings,
                names,
                model_name=encoder.model_name,
                cache_dir=router.cache_dir,
            )
    base = RouteTable.build(routes, router.utterance_embeddings, method="max")
    result = fit_routes(
        routes,
        base,
        head,
        embeddings,
        data.labels,
        texts=data.texts,
        methods=methods,
        min_support=args.min_support,
    )
    fit_seconds = time.perf_counter() - t0
    save_routes(result.routes, args.out)

    # The figures of the file as written and read back (no re-encoding of the utterances).
    reloaded = load_routes(args.out)
    resolved = resolve_routes(
        reloaded,
        router.utterance_embeddings,
        names,
        model_name=encoder.model_name,
        cache_dir=router.cache_dir,
    )
    after = evaluate(resolved.table, embeddings, data.labels, data.texts)

    tuned = sum(route.threshold is not None for route in reloaded.routes)
    tuned += sum(route.min_confidence is not None for route in reloaded.routes)
    print(f"routes: {args.routes} -> {args.out} (version {routes_version(reloaded)})")
    print(
        f"method: {routes.method} ({router.table.method}) -> {reloaded.method}; "
        f"default threshold: {routes.default_threshold} -> {reloaded.default_threshold}; "
        f"{tuned} of {len(reloaded.routes)} routes have their own threshold "
        f"(min support {args.min_support}); fit took {fit_seconds:.2f} s"
    )
    if reloaded.method == "head":
        h = reloaded.head
        print(
            f"head: blend {h.blend}, temperature {h.temperature}, min_confidence "
            f"{h.min_confidence}, similarity floor {reloaded.default_threshold}, "
            f"min_margin {h.min_margin}"
        )
    if len(result.candidates) > 1:
        print("candidates (top-1 in scope, overall with one fitted fallback setting):")
        for c in result.candidates:
            mark = " <- chosen" if c["chosen"] else ""
            print(
                f"  {c['candidate']:<18}{_fmt(c['top1_accuracy']):>8}"
                f"{_fmt(c['fitted_overall_accuracy']):>8}{mark}"
            )
    keys = ["overall_accuracy", "in_scope_accuracy", "top1_accuracy"]
    keys += ["fallback_precision", "fallback_recall", "macro_f1"]
    _report_fit(
        args,
        reloaded,
        before,
        after,
        keys,
        "(figures on the fitting data itself: check on held-out data)",
        fit_seconds=fit_seconds,
        routes_with_threshold=tuned,
        candidates=result.candidates,
    )
    return 0


def _report_fit(
    args: argparse.Namespace,
    written: RoutesConfig,
    before: dict[str, Any],
    after: dict[str, Any],
    keys: Sequence[str],
    caveat: str,
    **extra: Any,
) -> None:
    """The before/after table of a fit (and, with --json, its last line of figures)."""
    print(f"{'':<34}{'before':>8}{'after':>8}")
    for key in keys:
        print(f"  {key:<32}{_fmt(before[key]):>8}{_fmt(after[key]):>8}")
    print(caveat)
    if args.json:
        dropped = ("per_route", "confusing_utterances", "overlapping_routes")
        _print_json_last(
            {
                "out": str(args.out),
                "routes_version": routes_version(written),
                "method": written.method,
                "head": written.head.model_dump(mode="json"),
                "default_threshold": written.default_threshold,
                **{k: round(v, 3) if k == "fit_seconds" else v for k, v in extra.items()},
                "before": {k: v for k, v in before.items() if k not in dropped},
                "after": {k: v for k, v in after.items() if k not in dropped},
            }
        )


def _fit_adding_utterances(
    args: argparse.Namespace,
    routes: RoutesConfig,
    router: Router,
    names: np.ndarray | None,
    embeddings: np.ndarray,
    data: Labelled,
    before: dict[str, Any],
) -> int:
    """``fit --add-utterances``: labelled rows become utterances of their route (all of them,
    or those the routes get wrong), then the method and its fallback come from the
    cross-validation on the enlarged utterances (not from the same labelled rows, which are
    now utterances) and are written out."""
    t0 = time.perf_counter()
    rows = None
    if args.add_utterances == "errors":
        gold = label_indices(router.table, data.labels)
        rows = router.decide(embeddings, data.texts).route != gold
    augmented, utterance_embeddings, added = add_labelled_utterances(
        routes, router.utterance_embeddings, data.texts, data.labels, embeddings, rows
    )
    # The old fallback settings were tuned for the old utterances: derive them again.
    augmented.method = args.method or "auto"
    augmented.default_threshold = None
    augmented.head = augmented.head.model_copy(
        update={"blend": None, "temperature": None, "min_confidence": None, "min_margin": None}
    )
    for route in augmented.routes:
        route.threshold = None
        route.min_confidence = None
    resolution = resolve_routes(
        augmented,
        utterance_embeddings,
        names,
        model_name=router.encoder.model_name,
        cache_dir=router.cache_dir,
    )
    fitted = resolution.record(augmented)
    fit_seconds = time.perf_counter() - t0
    save_routes(fitted, args.out)
    reloaded = load_routes(args.out)
    again = resolve_routes(
        reloaded,
        utterance_embeddings,
        names,
        model_name=router.encoder.model_name,
        cache_dir=router.cache_dir,
    )
    after = evaluate(again.table, embeddings, data.labels, data.texts)
    print(f"routes: {args.routes} -> {args.out} (version {routes_version(reloaded)})")
    print(
        f"added {added} labelled rows as utterances ({args.add_utterances}); "
        f"{sum(len(r.utterances) for r in reloaded.routes)} utterances now; method "
        f"{routes.method} -> {reloaded.method}; fit took {fit_seconds:.2f} s"
    )
    _report_fit(
        args,
        reloaded,
        before,
        after,
        ("overall_accuracy", "in_scope_accuracy", "top1_accuracy", "fallback_recall"),
        "(the added rows are now utterances: 'after' on this data is no test at all; "
        "measure on held-out data)",
        added_utterances=added,
        fit_seconds=fit_seconds,
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

    from .._service.log_setup import setup_logging
    from .._service.pipeline import run_service
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
    methods = list(ROUTES_METHODS)

    p = sub.add_parser(
        "run",
        help="run the Kafka service (consume, route, call LLMs, publish)",
        description="Consume queries from Kafka in micro-batches, route them, call each route's "
        "LLM endpoint and publish one outcome per input. SIGTERM/SIGINT drains and exits, "
        "SIGHUP reloads the routes file.",
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
    log_levels = ["debug", "info", "warning", "error"]
    p.add_argument("--log-level", choices=log_levels, help="default: the config's logging.level")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "replay",
        help="reprocess a range of the input topic (to the outputs or a JSONL file), then stop",
        description="Read the input topic from the beginning, an offset or a timestamp up to the "
        "end offsets seen at start, with manual assignment and a consumer group of its own "
        "(<group_id>.replay.<time>); route and answer every message like the service does.",
    )
    p.add_argument("--config", required=True, help="service config (YAML)")
    start = p.add_mutually_exclusive_group(required=True)
    start.add_argument("--from-beginning", action="store_true")
    start.add_argument("--from-offset", type=int, metavar="N", help="the same offset everywhere")
    start.add_argument(
        "--from-timestamp", metavar="TIME", help="ISO 8601 (no zone: UTC) or epoch milliseconds"
    )
    p.add_argument("--partitions", help="e.g. 0,1 or 0-3 (default: all)")
    p.add_argument("--output", help="write the records to this JSONL file instead of the topics")
    p.add_argument("--log-level", choices=log_levels, help="default: the config's logging.level")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser(
        "check",
        help="validate the config and routes, reach the broker and the LLM endpoints",
        description="Exit 0: all good; 1: a problem found (listed); 2: the config cannot be read.",
    )
    p.add_argument("--config", required=True, help="service config (YAML)")
    p.set_defaults(func=cmd_check)

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
    p.add_argument(
        "--method",
        choices=methods,
        help="fit only this method (default auto: compare max, top5_mean and the route head "
        "on the data and write the best)",
    )
    p.add_argument(
        "--min-support",
        type=_positive,
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
