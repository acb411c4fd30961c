"""The offline commands: ``embed``, ``eval``, ``fit``, ``route`` (a JSONL file),
``import-routes`` and ``schema``.

They parse, call ``_offline`` and print (``report``); ``make_encoder`` builds the encoder the
common options ask for (tests replace it with a fake).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import orjson
from pydantic import ValidationError
from tqdm import tqdm

from .._errors import ConfigError, InputError
from .._files import atomic_write_bytes
from .._input import parse_input
from .._offline.fit.compare import compare_methods
from .._offline.fit.evaluate import evaluate, suspect_utterances
from .._offline.fit.workflows import fit_labelled
from .._offline.labelled import Labelled, load_labelled
from .._offline.report.html_report import render_html, require_report_libraries
from .._offline.route_file import default_rejects_path, route_file
from .._routing.importers import import_routes
from .._routing.router import Router, TextEncoder
from .._routing.schema import RoutesConfig, load_routes, save_routes
from .._schemas import schema_text
from .report import (
    chosen_label,
    describe_resolution,
    print_comparison,
    print_fit,
    print_json_last,
    print_report,
)

__all__ = [
    "ENCODE_BATCH",
    "cmd_embed",
    "cmd_eval",
    "cmd_fit",
    "cmd_import_routes",
    "cmd_route",
    "cmd_schema",
    "make_encoder",
]

ENCODE_BATCH = 256


# --- shared pieces -------------------------------------------------------------------------


def make_encoder(args: argparse.Namespace) -> TextEncoder:
    """The encoder the common options ask for (tests replace this function with a fake)."""
    from .._encoder import Encoder, EncoderConfig

    options = {
        "model": args.model,
        "max_length": args.max_length,
        "intra_op_threads": args.threads,
        "backend": getattr(args, "backend", None),
        "precision": getattr(args, "precision", None),
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


def cmd_eval(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if args.html:
        require_report_libraries()  # before the encoding, not after it
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
    figures = evaluate(
        router.table, embeddings, data.labels, data.texts, detail=args.html is not None
    )
    decide_seconds = time.perf_counter() - t0
    comparison = _authoring_aids(router, figures, embeddings, data)
    seconds = time.perf_counter() - started
    print(f"routes: {args.routes} ({len(routes.routes)} routes, version {router.version})")
    print(f"data: {args.data}")
    print(describe_resolution(router))
    print_report(figures)
    if comparison:
        print_comparison(comparison, chosen_label(router))
    print(
        f"seconds: {seconds:.2f} total, {load_seconds:.2f} loading the routes (utterances "
        f"and head), {encode_seconds:.2f} encoding {len(data)} texts, "
        f"{decide_seconds:.3f} deciding and reporting"
    )
    meta = {
        "method_requested": routes.method,
        "routes": str(args.routes),
        "data": str(args.data),
        "routes_version": router.version,
        "model": encoder.model_name,
    }
    if args.html:
        _write_html(Path(args.html), figures, meta, comparison, chosen_label(router))
    if args.json:
        print_json_last(
            {
                **{k: v for k, v in figures.items() if k not in _HTML_ONLY},
                **meta,
                "resolution": router.resolution.summary(),
                "methods": comparison,
                "seconds": round(seconds, 3),
                "load_seconds": round(load_seconds, 3),
                "encode_seconds": round(encode_seconds, 3),
                "decide_seconds": round(decide_seconds, 4),
            }
        )
    return 0


_HTML_ONLY = ("confusion_matrix", "fallback_curve")  # evaluate's detail: the page's, not JSON


def _write_html(
    path: Path,
    figures: dict[str, Any],
    meta: dict[str, Any],
    methods: list[dict[str, Any]] | None,
    chosen: str,
) -> None:
    """The HTML report, written atomically."""
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    page = render_html(figures, {**meta, "generated": generated}, methods, chosen)
    page_bytes = page.encode("utf-8")
    atomic_write_bytes(path, page_bytes, mode=0o644)
    print(f"html report: {path} ({len(page_bytes) / 1024:.0f} KiB)")


def _authoring_aids(
    router: Router, figures: dict[str, Any], embeddings: np.ndarray, data: Labelled
) -> list[dict[str, Any]] | None:
    """Adds the utterances the cross-validation sends elsewhere to ``figures`` (when the head
    was cross-validated); returns every method's figures on the data for ``auto``."""
    head = router.resolution.head
    table = router.table
    if head is not None and head.cv is not None:
        blend = table.head.blend if table.head is not None else 0.0
        figures["suspect_utterances"] = suspect_utterances(table, head.cv, table.method, blend)
    if router.routes.method != "auto":
        return None
    return compare_methods(table, head, embeddings, data.labels, data.texts)


# --- fit -----------------------------------------------------------------------------------


def cmd_fit(args: argparse.Namespace) -> int:
    routes = load_routes(args.routes)
    data = load_labelled(args.data, routes.names)
    encoder = make_encoder(args)
    router = Router(routes, encoder)
    embeddings = _encode_all(encoder, data.texts, "encoding")
    fitted = fit_labelled(
        router,
        data,
        embeddings,
        out=args.out,
        method=args.method,
        min_support=args.min_support,
        add_utterances=args.add_utterances,
        objective=args.objective,
        oos_rate=args.expected_oos_rate,
    )
    print_fit(fitted, routes_path=str(args.routes), min_support=args.min_support, json=args.json)
    return 0


# --- route (offline file mode) -------------------------------------------------------------


def cmd_route(args: argparse.Namespace) -> int:
    routes = _load_routes(args)
    if not os.path.isfile(args.input):
        raise ConfigError(f"no such input file: {args.input}")
    rejects = Path(args.rejects) if args.rejects else default_rejects_path(args.output)
    for path in (Path(args.output), rejects):
        if not path.parent.is_dir():
            raise ConfigError(f"{path}: its directory {path.parent} does not exist")
    router = Router(routes, make_encoder(args))

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
        format="text" if args.text else "json",
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
    return _reject_verdict(summary.rejected, summary.lines, args.max_reject_rate, args.text)


def _reject_verdict(rejected: int, lines: int, max_rate: float | None, text: bool) -> int:
    """1 (with the reason on stderr) when too many lines were rejected: every line, or more
    than ``max_rate`` of them."""
    if not lines or not rejected:
        return 0
    if max_rate is None and rejected < lines:
        return 0
    if max_rate is not None and rejected / lines <= max_rate:
        return 0
    limit = "every line" if max_rate is None else f"more than {max_rate:.1%} of the lines"
    hint = "" if text else " (plain text lines? add --text)"
    print(f"error: {limit} rejected ({rejected} of {lines}){hint}", file=sys.stderr)
    return 1


# --- import-routes and schema --------------------------------------------------------------


def cmd_import_routes(args: argparse.Namespace) -> int:
    routes, warnings = import_routes(args.input, args.format)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    save_routes(routes, args.out)
    with_threshold = sum(route.threshold is not None for route in routes.routes)
    print(
        f"imported {len(routes.routes)} routes ({with_threshold} with their own threshold, "
        f"method {routes.method}) from {args.input} -> {args.out}; {len(warnings)} warnings"
    )
    print(
        "next: set each route's endpoint (and the fallback's) for LLM mode, and tune the "
        "thresholds on labelled data with `semroute-stream fit`"
    )
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    sys.stdout.write(schema_text(args.name))
    return 0
