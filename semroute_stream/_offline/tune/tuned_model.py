"""The model directory ``semroute-stream tune`` writes, atomically.

::

    MODEL_DIR/
    ├── model.safetensors       the tuned weights (Hugging Face BERT names)
    ├── model.onnx              built from them by _encoder.onnx_build.build_bert_onnx
    ├── config.json, tokenizer.json, ... and 1_Pooling/config.json   copied from the base model
    ├── tune.json               the card: base model, routes and data hashes, settings, figures
    └── README.md               the same, short, for people

Everything is written into a temporary sibling directory, checked (``verify``), then renamed
into place: a failed or refused run leaves nothing behind, and a reader never sees half a model.
An existing ``MODEL_DIR`` is only replaced when it is an earlier ``tune`` output (has
``tune.json``) or empty.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..._encoder.onnx_build import BertArch, build_bert_onnx
from ..._errors import ConfigError
from ..._files import atomic_copy, atomic_write_bytes, sha256_file

__all__ = ["CARD_FILE", "COPIED_FILES", "write_model_dir"]

CARD_FILE = "tune.json"
#: Files of the base model copied as they are (those it has).
COPIED_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
)


def check_target(out: Path) -> None:
    """Fail early (before training) when ``out`` cannot be written or replaced."""
    if out.exists() and not _replaceable(out):
        raise ConfigError(
            f"--out {out} exists and is not an earlier tune output (no {CARD_FILE}): "
            "choose a new directory or remove it"
        )


def _replaceable(out: Path) -> bool:
    return out.is_dir() and ((out / CARD_FILE).is_file() or not any(out.iterdir()))


def write_model_dir(
    out: Path,
    base_dir: Path,
    weights: dict[str, np.ndarray],
    arch: BertArch,
    card: dict[str, Any],
    verify: Callable[[Path], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Write the model directory (see the module docstring); returns the card as written.

    ``verify(tmp_dir)`` runs on the finished temporary directory before the rename; its
    result is added to the card as ``verify``, and an exception from it writes nothing."""
    check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        from safetensors.numpy import save_file

        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        os.chmod(tmp / "model.safetensors", 0o644)
        for name in COPIED_FILES:
            if (base_dir / name).is_file():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                atomic_copy(base_dir / name, tmp / name, mode=0o644)
        build_bert_onnx(tmp / "model.safetensors", tmp / "model.onnx", arch, name=out.name)
        card = {
            **card,
            "files": {
                name: sha256_file(tmp / name) for name in ("model.safetensors", "model.onnx")
            },
        }
        if verify is not None:
            card["verify"] = verify(tmp)
        text = json.dumps(card, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        atomic_write_bytes(tmp / CARD_FILE, text.encode("utf-8"), mode=0o644)
        atomic_write_bytes(tmp / "README.md", readme(card).encode("utf-8"), mode=0o644)
        os.chmod(tmp, 0o755)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return card


def _move_into_place(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.rename(tmp, out)
        return
    check_target(out)
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
    old.rmdir()
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(old, out)
        raise
    with contextlib.suppress(OSError):
        shutil.rmtree(old)


def _figure(block: dict[str, Any] | None, side: str) -> str:
    if not block or block.get(side) is None:
        return "-"
    value = block[side].get("overall_accuracy")
    return "-" if value is None else f"{value:.4f}"


def readme(card: dict[str, Any]) -> str:
    """The card for people: what this model is and how it was made."""
    held = card.get("held_out", {})
    data = card.get("data")
    base = card["base_model"]
    lines = [
        f"# {card['name']}",
        "",
        f"`{base['name']}` fine-tuned by `semroute-stream tune` (supervised contrastive, "
        f"JAX) on the utterances of `{card['routes']['path']}`"
        + (f" and the labelled rows of `{data['path']}`" if data else "")
        + ".",
        "",
        "Use it with `encoder.model: <this directory>` (or `--model <this directory>`).",
        "",
        "| held out | rows | overall accuracy before | after |",
        "| --- | --- | --- | --- |",
    ]
    for key in ("utterances", "data"):
        block = held.get(key)
        if block:
            lines.append(
                f"| {key} | {block['rows']} | {_figure(block, 'before')} | "
                f"{_figure(block, 'after')} |"
            )
    guard = card["guard"]
    lines += [
        "",
        f"Guard: {guard['verdict']} ({guard['figure']}). Held-out utterances are optimistic "
        "against real queries; held-out labelled rows are the honest figure.",
        "",
        f"Seed {card['seed']}; settings `{json.dumps(card['settings'], sort_keys=True)}`; "
        f"{card['time']['train_seconds']:.0f} s of training "
        f"({card['time']['steps']} steps). Every detail is in `{CARD_FILE}`.",
        "",
    ]
    return "\n".join(lines)
