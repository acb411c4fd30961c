"""Printing for the command line: the figures of ``eval``, fit reports, method choices."""

from __future__ import annotations

import sys
from typing import Any

import orjson

from .._offline.fit.workflows import FitReport
from .._routing.router import Router
from .._routing.schema import routes_version

__all__ = [
    "chosen_label",
    "describe_resolution",
    "fmt",
    "print_comparison",
    "print_fit",
    "print_json_last",
    "print_report",
]


def fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def print_json_last(data: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(data).decode() + "\n")


def print_report(figures: dict[str, Any], worst: int = 5) -> None:
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
        print(f"  {label:<32}{fmt(figures[key])}")
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
                f"    {name:<30}{fmt(r['f1'])}  {fmt(r['precision'])}  "
                f"{fmt(r['recall'])}  {r['support']}"
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


def describe_resolution(router: Router) -> str:
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


def print_comparison(rows: list[dict[str, Any]], chosen: str) -> None:
    print(
        "  methods on this data (top-1 in scope; overall with the defaults from the "
        "utterances; overall with one fallback setting fitted here; CV accuracy on the "
        "utterances):"
    )
    for row in rows:
        mark = " <- auto" if row["candidate"] == chosen else ""
        print(
            f"    {row['candidate']:<18}{fmt(row['top1_accuracy']):>8}"
            f"{fmt(row['overall_accuracy']):>8}{fmt(row['fitted_overall_accuracy']):>8}"
            f"{fmt(row.get('cv_accuracy')):>8}{mark}"
        )


def chosen_label(router: Router) -> str:
    table = router.resolution.table
    if table.method == "head" and table.head is not None:
        return f"head(blend={table.head.blend:g})"
    return table.method


# --- fit -----------------------------------------------------------------------------------

_FIT_KEYS = (
    "overall_accuracy",
    "in_scope_accuracy",
    "top1_accuracy",
    "fallback_precision",
    "fallback_recall",
    "macro_f1",
)
_ADDED_KEYS = ("overall_accuracy", "in_scope_accuracy", "top1_accuracy", "fallback_recall")


def print_fit(report: FitReport, *, routes_path: str, min_support: int, json: bool) -> None:
    """A fit's summary, its before/after table and, with ``json``, its last line of figures."""
    written = report.written
    print(f"routes: {routes_path} -> {report.out} (version {routes_version(written)})")
    if report.added_utterances is not None:
        _print_added(report)
        extra: dict[str, Any] = {
            "added_utterances": report.added_utterances,
            "fit_seconds": report.fit_seconds,
        }
    else:
        _print_fitted(report, min_support)
        extra = {
            "fit_seconds": report.fit_seconds,
            "routes_with_threshold": report.routes_with_threshold,
            "candidates": report.candidates,
            "objective": report.objective,
            "expected_oos_rate": report.oos_rate if report.objective == "balanced" else None,
        }
    print(f"{'':<34}{'before':>8}{'after':>8}")
    for key in _ADDED_KEYS if report.added_utterances is not None else _FIT_KEYS:
        print(f"  {key:<32}{fmt(report.before[key]):>8}{fmt(report.after[key]):>8}")
    if report.added_utterances is not None:
        print(
            "(the added rows are now utterances: 'after' on this data is no test at all; "
            "measure on held-out data)"
        )
    else:
        print("(figures on the fitting data itself: check on held-out data)")
    if json:
        _print_fit_json(report, extra)


def _print_fitted(report: FitReport, min_support: int) -> None:
    source, written = report.source, report.written
    print(
        f"method: {source.method} ({report.resolved_method}) -> {written.method}; "
        f"default threshold: {source.default_threshold} -> {written.default_threshold}; "
        f"{report.routes_with_threshold} of {len(written.routes)} routes have their own "
        f"threshold (min support {min_support}); fit took {report.fit_seconds:.2f} s"
    )
    if written.method == "head":
        h = written.head
        print(
            f"head: blend {h.blend}, temperature {h.temperature}, min_confidence "
            f"{h.min_confidence}, similarity floor {written.default_threshold}, "
            f"min_margin {h.min_margin}, min_energy {h.min_energy}"
        )
    if report.objective == "balanced":
        overall = f"expected overall at {report.oos_rate:.0%} out-of-scope (objective balanced)"
    else:
        overall = "overall on the data (objective accuracy)"
    if len(report.candidates) > 1:
        print(f"candidates (top-1 in scope, {overall} with one fitted fallback setting):")
        for c in report.candidates:
            mark = " <- chosen" if c["chosen"] else ""
            print(
                f"  {c['candidate']:<18}{fmt(c['top1_accuracy']):>8}"
                f"{fmt(c['fitted_overall_accuracy']):>8}{mark}"
            )


def _print_added(report: FitReport) -> None:
    written = report.written
    print(
        f"added {report.added_utterances} labelled rows as utterances "
        f"({report.add_utterances}); {sum(len(r.utterances) for r in written.routes)} "
        f"utterances now; method {report.source.method} -> {written.method}; fit took "
        f"{report.fit_seconds:.2f} s"
    )


def _print_fit_json(report: FitReport, extra: dict[str, Any]) -> None:
    written = report.written
    dropped = ("per_route", "confusing_utterances", "overlapping_routes")
    print_json_last(
        {
            "out": str(report.out),
            "routes_version": routes_version(written),
            "method": written.method,
            "head": written.head.model_dump(mode="json"),
            "default_threshold": written.default_threshold,
            **{k: round(v, 3) if k == "fit_seconds" else v for k, v in extra.items()},
            "before": {k: v for k, v in report.before.items() if k not in dropped},
            "after": {k: v for k, v in report.after.items() if k not in dropped},
        }
    )
