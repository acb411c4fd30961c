"""The ``fit`` command's workflows: fit routes on labelled data, write them, read them back.

* ``fit_labelled``: what ``semroute-stream fit`` runs; ``fit_file`` fits the method and its
  fallback on the labelled rows (``fit_routes``); ``fit_adding_utterances`` makes labelled
  rows utterances (``add_labelled_utterances``) and lets the cross-validation on the enlarged
  utterances choose. Each returns a ``FitReport`` for the command line to print.

Routes are never changed in place: every step returns new ones (``model_copy(update=...)``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..._routing.router import Router, compile_table, head_texts, resolve_routes, train_route_head
from ..._routing.schema import (
    DECISION_METHODS,
    DecisionMethod,
    RoutesConfig,
    RoutesMethod,
    load_routes,
    save_routes,
)
from ..labelled import Labelled, label_indices
from .evaluate import evaluate
from .fit_routes import fit_routes
from .thresholds import DEFAULT_OBJECTIVE, DEFAULT_OOS_RATE, Objective, row_weights

__all__ = [
    "AddUtterances",
    "FitReport",
    "add_labelled_utterances",
    "fit_adding_utterances",
    "fit_file",
    "fit_labelled",
]

AddUtterances = Literal["none", "errors", "all"]
"""Which labelled rows ``fit`` adds to their route's utterances."""


# --- more utterances -----------------------------------------------------------------------


def add_labelled_utterances(
    routes: RoutesConfig,
    utterance_embeddings: np.ndarray,
    texts: Sequence[str],
    labels: Sequence[str | None],
    embeddings: np.ndarray,
    rows: np.ndarray | None = None,
) -> tuple[RoutesConfig, np.ndarray, int]:
    """``routes`` with labelled rows appended to their route's utterances (rows with a
    label, among ``rows`` when given, whose text is not already one of that route's
    utterances), the matching utterance embeddings (route by route, as ``utterances_of``
    lists them; the rows' own embeddings, nothing is re-encoded) and how many were added."""
    index = {name: i for i, name in enumerate(routes.names)}
    texts_of: list[list[str]] = [list(route.utterances) for route in routes.routes]
    vectors: list[list[np.ndarray]] = []
    start = 0
    for route in routes.routes:
        vectors.append(list(utterance_embeddings[start : start + len(route.utterances)]))
        start += len(route.utterances)
    seen = [{u.strip() for u in route.utterances} for route in routes.routes]
    chosen = range(len(texts)) if rows is None else (int(r) for r in np.flatnonzero(rows))
    added = 0
    for row in chosen:
        label = labels[row]
        text = texts[row]
        if label is None or label not in index or not text.strip():
            continue
        r = index[label]
        if text.strip() in seen[r]:
            continue
        seen[r].add(text.strip())
        texts_of[r].append(text)
        vectors[r].append(np.asarray(embeddings[row], dtype=np.float32))
        added += 1
    out = routes.model_copy(
        update={
            "routes": [
                route.model_copy(update={"utterances": utterances}, deep=True)
                for route, utterances in zip(routes.routes, texts_of, strict=True)
            ]
        },
        deep=True,
    )
    dim = utterance_embeddings.shape[1]
    flat = [v for per_route in vectors for v in per_route]
    matrix = np.stack(flat).astype(np.float32) if flat else np.zeros((0, dim), np.float32)
    return out, matrix, added


# --- the fit command's workflows -----------------------------------------------------------


@dataclass(frozen=True)
class FitReport:
    """What one ``fit`` did: the routes before and as written (read back from ``out``), the
    figures of both on the labelled data, and how the fit went."""

    source: RoutesConfig  # the routes as read
    resolved_method: DecisionMethod  # what they decided with when loaded
    written: RoutesConfig  # the file as written, read back
    out: str | Path  # as given
    before: dict[str, Any]
    after: dict[str, Any]
    fit_seconds: float
    candidates: list[dict[str, Any]] = field(default_factory=list)  # fit_file only
    routes_with_threshold: int = 0  # fit_file only: routes with a threshold or floor of their own
    added_utterances: int | None = None  # fit_adding_utterances only
    add_utterances: AddUtterances = "none"
    objective: Objective = DEFAULT_OBJECTIVE  # fit_file only: what the fallback was fitted for
    oos_rate: float = DEFAULT_OOS_RATE  # fit_file only: the out-of-scope share (balanced)


def fit_labelled(
    router: Router,
    data: Labelled,
    embeddings: np.ndarray,
    *,
    out: str | Path,
    method: RoutesMethod | None = None,
    min_support: int = 5,
    add_utterances: AddUtterances = "none",
    objective: Objective = DEFAULT_OBJECTIVE,
    oos_rate: float = DEFAULT_OOS_RATE,
) -> FitReport:
    """``fit``: the router's routes fitted on labelled ``data`` (``embeddings`` are its rows'),
    written to ``out``. ``method`` (default ``auto``: every method) limits the candidates;
    ``add_utterances`` other than ``none`` adds labelled rows to the utterances instead (see
    ``fit_adding_utterances``); ``objective`` at ``oos_rate`` is what the fallback is fitted
    for (``thresholds.row_weights``; checked before anything is fitted)."""
    row_weights(np.zeros(0, dtype=np.intp), objective, oos_rate)  # fail fast on bad values
    before = evaluate(router.table, embeddings, data.labels, data.texts)
    started = time.perf_counter()
    names = router.name_embeddings
    if names is None and router.routes.head.use_names:
        names = router.encoder.encode(head_texts(router.routes))
    if add_utterances != "none":
        return fit_adding_utterances(
            router, data, embeddings, names, before, out=out, method=method, which=add_utterances
        )
    return fit_file(
        router,
        data,
        embeddings,
        names,
        before,
        out=out,
        method=method,
        min_support=min_support,
        started=started,
        objective=objective,
        oos_rate=oos_rate,
    )


def fit_file(
    router: Router,
    data: Labelled,
    embeddings: np.ndarray,
    names: np.ndarray | None,
    before: dict[str, Any],
    *,
    out: str | Path,
    method: RoutesMethod | None,
    min_support: int,
    started: float | None = None,
    objective: Objective = DEFAULT_OBJECTIVE,
    oos_rate: float = DEFAULT_OOS_RATE,
) -> FitReport:
    """``fit`` without new utterances: ``fit_routes`` on the labelled rows (the head trained
    when it is a candidate and the router has none with a cross-validation), written to
    ``out``, read back and evaluated on the same rows."""
    started = time.perf_counter() if started is None else started
    routes = router.routes
    methods = [m for m in DECISION_METHODS if (method or "auto") in ("auto", m)]
    head = None
    if "head" in methods and len(routes.routes) >= 2:
        head = router.resolution.head
        if head is None or head.cv is None:
            head = train_route_head(
                routes,
                router.utterance_embeddings,
                names,
                model_name=router.model_key,
                cache_dir=router.cache_dir,
            )
    base = compile_table(routes, router.utterance_embeddings, method="max")
    result = fit_routes(
        routes,
        base,
        head,
        embeddings,
        data.labels,
        texts=data.texts,
        methods=methods,
        min_support=min_support,
        objective=objective,
        oos_rate=oos_rate,
    )
    fit_seconds = time.perf_counter() - started
    written, after = _write_and_evaluate(
        router, result.routes, router.utterance_embeddings, names, data, embeddings, out
    )
    fitted = sum(route.threshold is not None for route in written.routes)
    fitted += sum(route.min_confidence is not None for route in written.routes)
    return FitReport(
        source=routes,
        resolved_method=router.table.method,
        written=written,
        out=out,
        before=before,
        after=after,
        fit_seconds=fit_seconds,
        candidates=result.candidates,
        routes_with_threshold=fitted,
        objective=objective,
        oos_rate=oos_rate,
    )


def fit_adding_utterances(
    router: Router,
    data: Labelled,
    embeddings: np.ndarray,
    names: np.ndarray | None,
    before: dict[str, Any],
    *,
    out: str | Path,
    method: RoutesMethod | None,
    which: AddUtterances,
) -> FitReport:
    """``fit --add-utterances``: labelled rows become utterances of their route (``all`` of
    them, or those the routes get wrong: ``errors``), then the method and its fallback come
    from the cross-validation on the enlarged utterances (not from the same labelled rows,
    which are now utterances) and are written out."""
    started = time.perf_counter()
    routes = router.routes
    rows = None
    if which == "errors":
        gold = label_indices(router.table, data.labels)
        rows = router.decide(embeddings, data.texts).route != gold
    augmented, utterance_embeddings, added = add_labelled_utterances(
        routes, router.utterance_embeddings, data.texts, data.labels, embeddings, rows
    )
    augmented = _without_fallback_settings(augmented, method or "auto")
    resolution = resolve_routes(
        augmented,
        utterance_embeddings,
        names,
        model_name=router.model_key,
        cache_dir=router.cache_dir,
    )
    fitted = resolution.record(augmented)
    fit_seconds = time.perf_counter() - started
    written, after = _write_and_evaluate(
        router, fitted, utterance_embeddings, names, data, embeddings, out
    )
    return FitReport(
        source=routes,
        resolved_method=router.table.method,
        written=written,
        out=out,
        before=before,
        after=after,
        fit_seconds=fit_seconds,
        added_utterances=added,
        add_utterances=which,
    )


def _without_fallback_settings(routes: RoutesConfig, method: RoutesMethod) -> RoutesConfig:
    """``routes`` with ``method`` and every fallback setting left to be derived again (the
    old ones were fitted for the old utterances)."""
    cleared = {"threshold": None, "min_confidence": None}
    head = routes.head.model_copy(
        update={"blend": None, "temperature": None, "min_confidence": None, "min_margin": None},
        deep=True,
    )
    return routes.model_copy(
        update={
            "method": method,
            "default_threshold": None,
            "head": head,
            "routes": [route.model_copy(update=cleared, deep=True) for route in routes.routes],
        },
        deep=True,
    )


def _write_and_evaluate(
    router: Router,
    fitted: RoutesConfig,
    utterance_embeddings: np.ndarray,
    names: np.ndarray | None,
    data: Labelled,
    embeddings: np.ndarray,
    out: str | Path,
) -> tuple[RoutesConfig, dict[str, Any]]:
    """Write ``fitted`` to ``out``, read it back and evaluate it on the labelled rows (the
    figures of the file as written; the utterances are not re-encoded)."""
    save_routes(fitted, out)
    written = load_routes(out)
    resolved = resolve_routes(
        written,
        utterance_embeddings,
        names,
        model_name=router.model_key,
        cache_dir=router.cache_dir,
    )
    return written, evaluate(resolved.table, embeddings, data.labels, data.texts)
