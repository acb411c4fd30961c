"""``semroute-stream tune``: fine-tune the encoder on a routes file (``_offline/tune/finetune.py``),
print the held-out figures and write the model directory."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .._encoder.default_model import DEFAULT_MODEL_ID, locate_weights_dir
from .._errors import ConfigError, ModelError
from .._offline.labelled import load_labelled
from .._offline.tune.finetune import TuneRefused, TuneRequest, run_tune
from .._offline.tune.tune_train import TrainSettings
from .._routing.schema import load_routes
from .arguments import positive_float, positive_int
from .report import print_json_last

__all__ = ["add_tune", "cmd_tune"]

#: The ONNX model must embed like the tuned JAX weights (min cosine over the probe texts).
VERIFY_MIN_COSINE = 0.9999
_DEFAULTS = TrainSettings()


def _fraction(value: str) -> float:
    number = float(value)
    if not 0.0 <= number < 1.0:
        raise argparse.ArgumentTypeError("must be in [0, 1)")
    return number


def add_tune(sub: Any) -> None:
    p = sub.add_parser(
        "tune",
        help="fine-tune the encoder on the routes' utterances; write a model directory",
        description="Fine-tune the whole encoder (supervised contrastive, JAX on CPU: the [tune] "
        "extra) on the routes' utterances and, with --data, labelled rows; hold out part of "
        "them, report accuracy before/after on it, and refuse (exit 1, nothing written) when "
        "the tuned model is worse. MODEL_DIR then works as encoder.model / --model.",
    )
    p.add_argument("--routes", required=True, help="routes file (YAML or JSON)")
    p.add_argument("--data", help="labelled JSONL to train on too (part of it is held out)")
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="model directory to write")
    p.add_argument(
        "--base",
        metavar="DIR",
        help="base model directory with model.safetensors + config.json + tokenizer.json "
        "(default: the built-in all-MiniLM-L6-v2 weights)",
    )
    p.add_argument("--seed", type=int, default=_DEFAULTS.seed, help="default 0")
    p.add_argument(
        "--epochs",
        type=positive_float,
        default=_DEFAULTS.epochs,
        help=f"passes over the training pairs (default {_DEFAULTS.epochs:g})",
    )
    p.add_argument(
        "--learning-rate",
        type=positive_float,
        default=_DEFAULTS.learning_rate,
        help=f"peak AdamW rate (default {_DEFAULTS.learning_rate})",
    )
    p.add_argument(
        "--temperature",
        type=positive_float,
        default=_DEFAULTS.temperature,
        help=f"contrastive loss temperature (default {_DEFAULTS.temperature})",
    )
    p.add_argument(
        "--routes-per-batch",
        type=positive_int,
        default=_DEFAULTS.routes_per_batch,
        help=f"routes in a batch (default {_DEFAULTS.routes_per_batch})",
    )
    p.add_argument(
        "--per-route",
        type=positive_int,
        default=_DEFAULTS.per_route,
        help=f"texts of each route in a batch (default {_DEFAULTS.per_route})",
    )
    p.add_argument(
        "--holdout",
        type=_fraction,
        default=0.2,
        help="fraction of the utterances (and of --data rows) held out per route (default 0.2)",
    )
    p.add_argument("--force", action="store_true", help="write the model even when worse")
    p.add_argument("--json", action="store_true", help="end with one JSON line: the card")
    p.set_defaults(func=cmd_tune)


def _base(args: argparse.Namespace) -> tuple[Path, str]:
    if args.base is None:
        return locate_weights_dir(), DEFAULT_MODEL_ID
    base = Path(args.base).expanduser()
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        if not (base / name).is_file():
            raise ConfigError(f"--base {base}: {name} is missing (a BERT model directory needed)")
    return base, base.resolve().name


def _progress(steps: int) -> Callable[[int, float], None]:
    bar = tqdm(total=steps, desc="tuning", unit="step", disable=not sys.stderr.isatty())

    def on_step(i: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        if i + 1 >= steps:
            bar.close()

    return on_step


def verify_onnx(model_dir: Path, texts: Sequence[str], expected: np.ndarray) -> dict[str, Any]:
    """Load ``model_dir`` in the encoder (ONNX Runtime, fp32) and compare with ``expected``."""
    from .._encoder import Encoder, EncoderConfig

    encoder = Encoder(EncoderConfig(model=str(model_dir), backend="onnxruntime", precision="fp32"))
    got = encoder.encode(list(texts))
    cosine = float(np.min(np.sum(got * expected, axis=1)))
    if cosine < VERIFY_MIN_COSINE:
        raise ModelError(
            f"the ONNX model built from the tuned weights embeds unlike them (min cosine "
            f"{cosine:.6f} < {VERIFY_MIN_COSINE}); nothing written"
        )
    return {"onnx_vs_jax_min_cosine": round(cosine, 7), "texts": len(texts)}


def _print_figures(card: dict[str, Any]) -> None:
    for kind, block in card["held_out"].items():
        b = block["before"] or {}
        a = block["after"] or {}
        print(
            f"held-out {kind} ({block['rows']} rows): overall accuracy "
            f"{b.get('overall_accuracy')} -> {a.get('overall_accuracy')}, top-1 "
            f"{b.get('top1_accuracy')} -> {a.get('top1_accuracy')}"
        )
    print(f"guard: {card['guard']['verdict']} ({card['guard']['figure']})")
    t = card["time"]
    print(f"training: {t['steps']} steps, {t['train_seconds']} s")


def cmd_tune(args: argparse.Namespace) -> int:
    routes = load_routes(args.routes)
    data = load_labelled(args.data, routes.names) if args.data else None
    base_dir, base_name = _base(args)
    settings = TrainSettings(
        epochs=args.epochs,
        routes_per_batch=args.routes_per_batch,
        per_route=args.per_route,
        learning_rate=args.learning_rate,
        temperature=args.temperature,
        seed=args.seed,
    )
    request = TuneRequest(
        routes=routes,
        routes_path=Path(args.routes),
        out=Path(args.out),
        base_dir=base_dir,
        base_name=base_name,
        settings=settings,
        data=data,
        data_path=Path(args.data) if args.data else None,
        holdout=args.holdout,
        force=args.force,
    )
    try:
        card = run_tune(request, progress=_progress, verify=verify_onnx)
    except TuneRefused as refused:
        _print_figures(refused.card)
        print(f"error: {refused}", file=sys.stderr)
        if args.json:
            print_json_last(refused.card)
        return 1
    _print_figures(card)
    if card["guard"]["warning"]:
        print(
            f"WARNING: the tuned model is worse on the held-out {card['guard']['figure']} "
            f"({card['guard']['verdict']})",
            file=sys.stderr,
        )
    print(f"wrote {args.out} (use it as encoder.model / --model)")
    if args.json:
        print_json_last(card)
    return 0
