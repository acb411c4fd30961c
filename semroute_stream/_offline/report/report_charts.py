"""The charts of ``eval --html``: matplotlib figures of ``evaluate``'s figures, as SVG text.

No pyplot (no global figure registry, nothing to leak, no backend to choose): each chart is a
``matplotlib.figure.Figure`` drawn straight to SVG. Text stays text (``svg.fonttype: none``),
so the page is small and its route names can be searched and read by a screen reader. The
ids inside each SVG get a prefix of their own, so several charts can share one page.
"""

from __future__ import annotations

import functools
import io
import math
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ParamSpec

import numpy as np

from ..._errors import ConfigError

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from matplotlib.typing import RcKeyType

__all__ = [
    "REPORT_HINT",
    "confusion_chart",
    "curve_chart",
    "f1_chart",
    "require_matplotlib",
    "worst_routes",
]

_P = ParamSpec("_P")
REPORT_HINT = "install the extra: pip install 'semroute-stream[report]'"
WORST_ROUTES = 20  # routes in the confusion heatmap
BARS_PER_PANEL = 50  # routes per column of the F1 bars
_OTHER, _NO_ROUTE, _FALLBACK = "(other routes)", "(no route)", "(fallback)"
_STYLE: dict[RcKeyType, Any] = {
    "svg.fonttype": "none",
    "svg.hashsalt": "semroute-stream",  # the same figures give the same SVG
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans", "Liberation Sans", "Arial"],
    "font.size": 9.0,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


def require_matplotlib() -> None:
    """Raises ConfigError with the install hint when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError(f"eval --html: matplotlib is not installed; {REPORT_HINT}") from None


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _svg(fig: Figure, prefix: str, label: str) -> str:
    """The figure as an ``<svg>`` element for an HTML page: no XML prologue, no metadata, ids
    prefixed, ``role="img"`` with ``label`` for assistive technology."""
    import matplotlib

    out = io.StringIO()
    with matplotlib.rc_context(_STYLE):
        fig.savefig(out, format="svg", metadata={"Date": None, "Creator": None})
    text = out.getvalue()
    text = text[text.index("<svg") :]
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.DOTALL)
    text = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", text)
    text = re.sub(r'(\bid="|url\(#|href="#)', rf"\g<1>{prefix}-", text)
    label = label.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")
    return text.replace("<svg", f'<svg role="img" aria-label="{label}"', 1)


def _styled(draw: Callable[_P, str]) -> Callable[_P, str]:
    """Runs a drawing function under the report's matplotlib style."""

    @functools.wraps(draw)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> str:
        import matplotlib

        with matplotlib.rc_context(_STYLE):
            return draw(*args, **kwargs)

    return wrapper


# --- (a) confusion heatmap -----------------------------------------------------------------


def worst_routes(per_route: dict[str, dict[str, Any]], limit: int = WORST_ROUTES) -> list[str]:
    """The ``limit`` routes of lowest F1 (routes with an F1: labelled rows or predictions),
    worst first; ties: more rows misrouted or wrongly taken first, then by name."""
    scored = [(name, r) for name, r in per_route.items() if r["f1"] is not None]
    errors = {n: (r["support"] + r["predicted"]) * (1.0 - r["f1"]) for n, r in scored}
    ranked = sorted(scored, key=lambda item: (item[1]["f1"], -errors[item[0]], item[0]))
    return [name for name, _ in ranked[:limit]]


def _grouped(cm: dict[str, Any], shown: list[str]) -> tuple[np.ndarray, list[str], list[str]]:
    """The confusion matrix summed into the ``shown`` routes, the other routes (when there
    are any) and the fallback."""
    counts = np.asarray(cm["counts"], dtype=np.int64)
    names = cm["labels"][:-1]
    others = len(shown) < len(names)
    index = {name: i for i, name in enumerate(names)}
    group = np.full(len(names) + 1, len(shown), dtype=np.intp)  # the other routes
    for k, name in enumerate(shown):
        group[index[name]] = k
    n = len(shown) + 1 + others
    group[-1] = n - 1  # the fallback
    grouped = np.zeros((n, n), dtype=np.int64)
    np.add.at(grouped, (group[:, None], group[None, :]), counts)
    middle = [_OTHER] if others else []
    return grouped, [*shown, *middle, _NO_ROUTE], [*shown, *middle, _FALLBACK]


@_styled
def confusion_chart(figures: dict[str, Any], limit: int = WORST_ROUTES) -> str:
    """Gold by row, predicted by column, for the ``limit`` routes of lowest F1; every other
    route summed into one row and column, the fallback as the last. Colour: the share of the
    row; numbers: counts."""
    shown = worst_routes(figures["per_route"], limit)
    grouped, rows, cols = _grouped(figures["confusion_matrix"], shown)
    n, summed = len(rows), len(rows) - len(shown)  # summed: the other routes and the fallback
    share = grouped / np.maximum(grouped.sum(axis=1, keepdims=True), 1)
    hidden = np.zeros(share.shape, dtype=bool)
    if summed == 2:
        hidden[n - 2, n - 2] = True  # other -> other: the bulk of the data, no news
    side = max(4.0, 0.36 * n + 2.6)
    fig = _figure(side + 0.9, side)
    ax = fig.add_subplot()
    image = ax.imshow(
        np.ma.masked_array(share, mask=hidden), cmap="Blues", vmin=0.0, vmax=1.0, aspect="equal"
    )
    for i in range(n):
        for j in range(n):
            if grouped[i, j] and not hidden[i, j]:
                dark = share[i, j] > 0.55
                ax.text(j, i, str(grouped[i, j]), ha="center", va="center", fontsize=6.5,
                        color="white" if dark else "#222222")  # fmt: skip
    ax.set_xticks(range(n), cols, rotation=60, ha="right", rotation_mode="anchor", fontsize=7.5)
    ax.set_yticks(range(n), rows, fontsize=7.5)
    ax.set_xlabel("predicted route")
    ax.set_ylabel("labelled route (gold)")
    ax.spines[:].set_visible(False)
    ax.set_xticks(np.arange(n + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(n + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", linewidth=0.8)
    ax.tick_params(which="minor", length=0)
    ax.axhline(len(shown) - 0.5, color="#555555", linewidth=1.0)  # the routes | the sums
    ax.axvline(len(shown) - 0.5, color="#555555", linewidth=1.0)
    fig.colorbar(image, ax=ax, shrink=0.6, label="share of the labelled row")
    label = f"Confusion heatmap of the {len(shown)} routes with the lowest F1"
    return _svg(fig, "confusion", label)


# --- (b) fallback precision/recall against the offset of every cut -----------------------------


def _values(values: list[float | None]) -> np.ndarray:
    return np.array([math.nan if v is None else v for v in values], dtype=np.float64)


@_styled
def curve_chart(curve: dict[str, Any], method: str) -> str:
    """Precision, recall and fallback rate against the offset added to every cut, the cuts as
    they are (offset 0) marked."""
    x = _values(curve["offsets"])
    point = curve["operating_point"]
    fig = _figure(10.0, 4.4)
    ax = fig.add_subplot()
    ax.plot(x, _values(curve["precision"]), color="#1f77b4", linewidth=1.8, label="precision")
    ax.plot(x, _values(curve["recall"]), color="#d62728", linewidth=1.8, label="recall")
    ax.plot(x, _values(curve["fallback_rate"]), color="#7f7f7f", linewidth=1.2,
            linestyle="--", label="fallback rate")  # fmt: skip
    ax.axvline(0.0, color="#333333", linewidth=0.8, linestyle=":")
    for key, colour in (("precision", "#1f77b4"), ("recall", "#d62728")):
        if point[key] is not None:
            ax.plot([0.0], [point[key]], marker="o", markersize=7, color=colour,
                    markeredgecolor="black", zorder=5)  # fmt: skip
    text = "the cuts as they are: precision {}, recall {}".format(
        *(f"{point[k]:.3f}" if point[k] is not None else "n/a" for k in ("precision", "recall"))
    )
    ax.annotate(text, xy=(0.0, 1.02), xycoords=("data", "axes fraction"), ha="center",
                fontsize=8.5, annotation_clip=False)  # fmt: skip
    if point["recall"] is None:
        ax.text(0.5, 0.3, "no rows without a route in the data: recall is undefined",
                transform=ax.transAxes, ha="center", color="#555555",
                bbox={"facecolor": "white", "edgecolor": "#cccccc"})  # fmt: skip
    cuts = "min_confidence, similarity floor, min_margin" if method == "head" else "thresholds"
    ax.set_xlabel(f"offset added to every route's cut ({cuts}); 0 = as configured")
    ax.set_ylabel("fallback (out of scope = positive)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    return _svg(fig, "fallback-curve", "Fallback precision and recall against the threshold")


# --- (c) per-route F1 bars -------------------------------------------------------------------


@_styled
def f1_chart(figures: dict[str, Any]) -> str:
    """Every labelled route's F1, worst first, in columns of ``BARS_PER_PANEL``; the macro F1
    as a dashed line."""
    import matplotlib

    ranked = sorted(
        ((name, r["f1"] or 0.0) for name, r in figures["per_route"].items() if r["support"]),
        key=lambda item: (item[1], item[0]),
    )
    panels = max(1, math.ceil(len(ranked) / BARS_PER_PANEL))
    per_panel = max(1, math.ceil(len(ranked) / panels))
    fig = _figure(4.2 * panels + 0.6, 0.17 * per_panel + 1.1)
    cmap = matplotlib.colormaps["RdYlBu"]
    macro = figures.get("macro_f1")
    for p in range(panels):
        part = ranked[p * per_panel : (p + 1) * per_panel]
        ax = fig.add_subplot(1, panels, p + 1)
        y = np.arange(len(part))
        f1 = np.array([f for _, f in part])
        ax.barh(y, f1, height=0.75, color=cmap(0.1 + 0.8 * f1))
        for yy, f in zip(y, f1, strict=True):
            ax.text(f + 0.012, float(yy), f"{f:.2f}", va="center", fontsize=6.5, zorder=3,
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.4})  # fmt: skip
        ax.set_yticks(y, [name for name, _ in part], fontsize=7)
        ax.set_ylim(per_panel - 0.5, -0.5)  # worst at the top
        ax.set_xlim(0.0, 1.12)
        ax.set_xticks([0.0, 0.25, 0.5, 0.75, 1.0])
        ax.tick_params(axis="y", length=0)
        ax.grid(axis="x", alpha=0.3)
        if macro is not None:
            ax.axvline(macro, color="#555555", linestyle="--", linewidth=0.9, zorder=0.5)
        ax.set_xlabel("F1")
    label = f"F1 of each of {len(ranked)} routes, worst first"
    return _svg(fig, "f1-bars", label)
