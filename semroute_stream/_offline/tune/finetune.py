"""``semroute-stream tune``: fine-tune the encoder on the routes' utterances (and labelled
rows), guard against over-fitting, and write a model directory.

1. Hold out part of the utterances (stratified by route, seeded, never a route's last one) and,
   with labelled data, part of its rows the same way (stratified by label, ``null`` too).
2. Embed with the base weights and route the held-out texts with the routes' own decision
   machinery (``resolve_routes`` + ``evaluate``; the routes keep only their training
   utterances, so a held-out utterance is never its own neighbour): the *before* figures.
3. Train (:mod:`.tune_train`) on the rest, embed again: the *after* figures.
4. The guard compares overall accuracy on the held-out labelled rows when there are any (the
   honest figure: utterance cross-validation was measured to be optimistic against real
   queries), else on the held-out utterances. Worse by more than the noise (one point of
   accuracy, or one row when there are fewer than a hundred): nothing is written and
   :class:`TuneRefused` is raised, unless ``force``; worse within it: written, with a warning.
5. The model is kept as trained (not retrained on everything): the figures then describe the
   model shipped, and a second training would double the time. The held-out utterances still
   serve as route utterances at run time (the routes file is not changed).
"""

from __future__ import annotations

import importlib.metadata
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..._errors import SemrouteError
from ..._files import sha256_file
from ..._routing.router import head_texts, needs_head, resolve_routes, utterance_routes
from ..._routing.schema import RoutesConfig
from ..fit.evaluate import evaluate
from ..labelled import Labelled
from .bert_jax import Params, import_jax, load_params, to_numpy
from .tune_data import BUCKETS, MAX_TOKENS, Tokens, hold_out
from .tune_train import TrainSettings, embed, train
from .tuned_model import check_target, write_model_dir

__all__ = ["FIGURES", "TuneRefused", "TuneRequest", "run_tune"]

FIGURES = ("overall_accuracy", "in_scope_accuracy", "top1_accuracy")
#: A tuned model worse by at most this (or by one held-out row) is written with a warning:
#: a hundred held-out rows cannot tell one row apart from noise.
NOISE_POINTS = 0.01
#: The label of ``null`` rows in the held-out split of labelled data.
NO_ROUTE = -1


class TuneRefused(SemrouteError):
    """The tuned model is worse on the held-out texts than the base model (nothing written)."""

    def __init__(self, message: str, card: dict[str, Any]) -> None:
        super().__init__(message)
        self.card = card


@dataclass(frozen=True)
class TuneRequest:
    """What to tune on and where to write it."""

    routes: RoutesConfig
    routes_path: Path
    out: Path
    base_dir: Path
    base_name: str
    settings: TrainSettings
    data: Labelled | None = None
    data_path: Path | None = None
    holdout: float = 0.2
    force: bool = False


@dataclass(frozen=True)
class _Split:
    routes: RoutesConfig  # the routes with their training utterances only
    train_texts: list[str]
    train_labels: np.ndarray
    held: dict[str, tuple[list[str], list[str | None]]]  # kind -> texts, labels


def _split(req: TuneRequest) -> _Split:
    routes = req.routes
    route_of = utterance_routes(routes)
    texts = [t for r in routes.routes for t in r.utterances]
    train_rows, held_rows = hold_out(route_of.tolist(), req.holdout, req.settings.seed)
    kept = set(train_rows.tolist())
    trimmed = routes.model_copy(
        update={
            "routes": [
                r.model_copy(
                    update={
                        "utterances": [texts[j] for j in np.flatnonzero(route_of == i) if j in kept]
                    }
                )
                for i, r in enumerate(routes.routes)
            ]
        }
    )
    names = routes.names
    train_texts = [texts[j] for j in train_rows]
    train_labels = route_of[train_rows].tolist()
    held = {"utterances": ([texts[j] for j in held_rows], [names[route_of[j]] for j in held_rows])}
    if req.data is not None and len(req.data):
        index = {name: i for i, name in enumerate(names)}
        codes = [NO_ROUTE if lab is None else index[lab] for lab in req.data.labels]
        d_train, d_held = hold_out(codes, req.holdout, req.settings.seed + 1)
        for j in d_train:
            if codes[j] != NO_ROUTE:  # rows of no route are only evaluated
                train_texts.append(req.data.texts[j])
                train_labels.append(codes[j])
        held["data"] = ([req.data.texts[j] for j in d_held], [req.data.labels[j] for j in d_held])
    return _Split(trimmed, train_texts, np.array(train_labels, dtype=np.intp), held)


def _figures(
    params: Params, arch: Any, split: _Split, tokens: Tokens, model_key: str
) -> dict[str, dict[str, Any]]:
    """Overall / in-scope / top-1 accuracy of each held-out kind, routed with ``params``."""
    routes = split.routes
    u = embed(params, arch, [t for r in routes.routes for t in r.utterances], tokens)
    names = embed(params, arch, head_texts(routes), tokens) if needs_head(routes) else None
    table = resolve_routes(routes, u, names, model_name=model_key, cache_dir=None).table
    out: dict[str, dict[str, Any]] = {}
    for kind, (texts, labels) in split.held.items():
        if texts:
            figures = evaluate(table, embed(params, arch, texts, tokens), labels, texts)
            out[kind] = {key: figures[key] for key in FIGURES}
    return out


def run_tune(
    req: TuneRequest,
    *,
    progress: Callable[[int], Callable[[int, float], None]] | None = None,
    verify: Callable[[Path, Sequence[str], np.ndarray], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Tune, guard and write (see the module docstring); returns the card.

    ``progress(steps)`` returns the per-step callback (the CLI's progress bar);
    ``verify(model_dir, texts, expected)`` checks the written ONNX model against the tuned
    embeddings of ``texts`` before the directory is moved into place."""
    started, cpu_started = time.perf_counter(), time.process_time()
    import_jax()
    check_target(req.out)
    params, arch = load_params(req.base_dir)
    tokens = Tokens(req.base_dir / "tokenizer.json")
    split = _split(req)
    before = _figures(params, arch, split, tokens, f"{req.base_name}@base")
    on_step = progress(req.settings.steps(len(split.train_texts))) if progress else None
    t0 = time.perf_counter()
    tuned, losses = train(
        params, arch, split.train_texts, split.train_labels, tokens, req.settings, on_step
    )
    train_seconds = time.perf_counter() - t0
    after = _figures(tuned, arch, split, tokens, f"{req.out.name}@tuned")
    card = _card(req, split, before, after, losses)
    card["time"] = {
        "train_seconds": round(train_seconds, 1),
        "steps": len(losses),
        "seconds_before_writing": round(time.perf_counter() - started, 1),
        "cpu_seconds_before_writing": round(time.process_time() - cpu_started, 1),
    }
    if not card["guard"]["passed"] and not req.force:
        raise TuneRefused(
            f"the tuned model is worse on the held-out {card['guard']['figure']} beyond noise "
            f"({card['guard']['before']:.4f} -> {card['guard']['after']:.4f}); nothing written "
            "(--force writes it anyway)",
            card,
        )
    probe_texts = split.held["utterances"][0][:32] or split.train_texts[:32]
    expected = embed(tuned, arch, probe_texts, tokens)
    check = (lambda d: verify(d, probe_texts, expected)) if verify is not None else None
    return write_model_dir(req.out, req.base_dir, to_numpy(tuned), arch, card, check)


def _guard(
    before: dict[str, dict[str, Any]],
    after: dict[str, dict[str, Any]],
    rows: dict[str, int],
    force: bool,
) -> dict[str, Any]:
    """The verdict: ``passed`` (not worse), ``within noise`` (worse by at most
    :data:`NOISE_POINTS` or one row: written, with a warning) or refused (unless ``force``)."""
    kind = "data" if "data" in before else "utterances"
    if kind not in before:
        return {
            "figure": "none held out",
            "before": None,
            "after": None,
            "passed": True,
            "warning": False,
            "verdict": "nothing held out: not checked",
        }
    b, a = before[kind]["overall_accuracy"], after[kind]["overall_accuracy"]
    n = max(rows[kind], 1)
    allowed_rows = max(1, math.floor(NOISE_POINTS * n))  # compared in rows: no rounding
    lost_rows = round((b - a) * n)
    passed = lost_rows <= allowed_rows
    allowed = allowed_rows / n
    if a >= b:
        verdict = "passed"
    elif passed:
        verdict = f"worse within noise (at most {allowed:.4f}): written, check it on real queries"
    else:
        verdict = "worse, written with --force" if force else "refused"
    return {
        "figure": f"{kind} overall_accuracy",
        "before": b,
        "after": a,
        "tolerance": round(allowed, 4),
        "passed": passed,
        "warning": a < b,
        "verdict": f"{verdict}: {b:.4f} -> {a:.4f}",
    }


def _card(
    req: TuneRequest,
    split: _Split,
    before: dict[str, dict[str, Any]],
    after: dict[str, dict[str, Any]],
    losses: list[float],
) -> dict[str, Any]:
    routes_file = {
        "path": str(req.routes_path),
        "sha256": sha256_file(req.routes_path),
        "routes": len(req.routes.routes),
        "utterances": sum(len(r.utterances) for r in req.routes.routes),
    }
    data = None
    if req.data is not None and req.data_path is not None:
        data = {
            "path": str(req.data_path),
            "sha256": sha256_file(req.data_path),
            "rows": len(req.data),
            "held_out_rows": len(split.held.get("data", ([], []))[0]),
        }
    held = {
        kind: {"rows": len(texts), "before": before.get(kind), "after": after.get(kind)}
        for kind, (texts, _) in split.held.items()
    }
    weights = req.base_dir / "model.safetensors"
    return {
        "name": req.out.name,
        "tool": "semroute-stream tune",
        "versions": {
            pkg: importlib.metadata.version(pkg) for pkg in ("semroute-stream", "jax", "optax")
        },
        "base_model": {"name": req.base_name, "model_safetensors_sha256": sha256_file(weights)},
        "routes": routes_file,
        "data": data,
        "seed": req.settings.seed,
        "settings": {
            **req.settings.as_dict(),
            "holdout": req.holdout,
            "buckets": list(BUCKETS),
            "max_tokens": MAX_TOKENS,
            "loss": "supervised contrastive (in-batch, route labels)",
            "optimizer": "adamw, linear warm-up and decay, clip 1.0",
        },
        "train_rows": len(split.train_texts),
        "held_out": held,
        "guard": _guard(
            before, after, {kind: len(t) for kind, (t, _) in split.held.items()}, req.force
        ),
        "loss": {
            "first": round(float(np.mean(losses[:10])), 4),
            "last": round(float(np.mean(losses[-10:])), 4),
        },
        "retrained_on_all": False,
    }
