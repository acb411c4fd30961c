"""``eval --html``: the figures of ``evaluate`` as one self-contained HTML page.

The page holds everything it shows: the charts are inline SVG (``report_charts``), the style
sheet is inline, there is no script and no font, image or style fetched from anywhere, so it
opens from ``file://`` offline. The text comes from the data and the routes file, so the page
is a Jinja2 template with autoescaping: no query or utterance can become markup. It needs the
``[report]`` extra (matplotlib, Jinja2).
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from ..._errors import ConfigError
from .report_charts import REPORT_HINT, confusion_chart, curve_chart, f1_chart, worst_routes

__all__ = ["FIGURE_IDS", "render_html", "require_report_libraries"]

#: The page's figures, always there; ``methods`` (every method's figures) is added for
#: ``method: auto``.
FIGURE_IDS = ("confusion", "fallback-curve", "f1-bars", "confusing", "overlapping-routes")

_SUMMARY = (
    ("overall_accuracy", "overall accuracy"),
    ("in_scope_accuracy", "in-scope accuracy"),
    ("top1_accuracy", "top-1 (no thresholds)"),
    ("macro_f1", "macro F1"),
    ("fallback_precision", "fallback precision"),
    ("fallback_recall", "fallback recall"),
    ("fallback_rate", "fallback rate"),
)

_TEMPLATE = "eval_report.html.j2"  # next to this module (package data)


def require_report_libraries() -> None:
    """Raises ConfigError with the install hint when the ``[report]`` extra is missing."""
    try:
        import jinja2  # noqa: F401
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"eval --html: {err.name} is not installed; {REPORT_HINT}") from None


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def render_html(
    figures: dict[str, Any],
    meta: dict[str, Any],
    methods: list[dict[str, Any]] | None = None,
    chosen: str | None = None,
) -> str:
    """The page for ``evaluate(..., detail=True)``'s ``figures``; ``meta``: ``routes`` and
    ``data`` (the files), ``routes_version``, ``model``, ``method_requested`` and
    ``generated`` (a date), shown in the header. ``methods``: ``compare_methods``' rows (for
    ``method: auto``), ``chosen`` the candidate auto took; the page then has their table."""
    require_report_libraries()
    import jinja2
    from markupsafe import Markup

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    template = env.from_string(resources.files(__package__).joinpath(_TEMPLATE).read_text())
    method = figures["method"]
    cuts = (
        "min_confidence, the similarity floor and min_margin"
        if method == "head"
        else "every route's threshold"
    )
    return template.render(
        figures=figures,
        meta=meta,
        fmt=_fmt,
        summary=_SUMMARY,
        n_routes=len(figures["per_route"]),
        labelled_routes=sum(1 for r in figures["per_route"].values() if r["support"]),
        worst=worst_routes(figures["per_route"]),
        point=figures["fallback_curve"]["operating_point"],
        cuts=cuts,
        confusion=Markup(confusion_chart(figures)),
        curve=Markup(curve_chart(figures["fallback_curve"], method)),
        f1=Markup(f1_chart(figures)),
        methods=methods or [],
        chosen=chosen,
        overlaps=figures.get("overlapping_routes") or [],
    )
