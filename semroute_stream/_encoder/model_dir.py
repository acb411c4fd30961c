"""A model directory's files: their names, the pooling config, sha256 checks, linked layouts.

What :mod:`.provision` and :mod:`.hub` share: :class:`ResolvedModel` (a model ready to load),
:func:`read_pooling` (sentence-transformers' ``1_Pooling/config.json``), the sha256 check of a
weights file, and :func:`link_dir`, a directory of links onto the Hub layout's ``onnx/`` files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._errors import ModelError
from .._files import sha256_file
from .default_model import MODEL_FILE, TOKENIZER_FILE, build_lock

if TYPE_CHECKING:
    from .config import EncoderConfig

__all__ = [
    "ONNX_DATA_FILE",
    "ONNX_FILE",
    "POOLING_CONFIG",
    "POOLING_FLAGS",
    "SAFETENSORS_FILE",
    "ResolvedModel",
    "check_sha256",
    "identity",
    "link_dir",
    "pooling_file",
    "pooling_of",
    "read_json",
    "read_pooling",
    "unwritable",
]

ONNX_FILE = "onnx/model.onnx"
ONNX_DATA_FILE = "onnx/model.onnx_data"
SAFETENSORS_FILE = "model.safetensors"
POOLING_CONFIG = "1_Pooling/config.json"
#: sentence-transformers' Pooling flags → the encoder's pooling names.
POOLING_FLAGS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "lasttoken",
}
_UNSUPPORTED_POOLING_FLAGS = (
    "pooling_mode_mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens",
)


@dataclass(frozen=True)
class ResolvedModel:
    """A model ready to load, and where it came from."""

    #: Holds ``model.onnx`` + ``tokenizer.json``.
    directory: Path
    #: The reported model name: the repo id, or the directory's name.
    name: str
    #: From ``1_Pooling/config.json``: mean, cls, max or lasttoken; None when there is none.
    pooling: str | None
    #: ``builtin``, ``directory`` or ``hub`` (for logs and metrics).
    source: str
    #: The resolved Hub commit (hub models only).
    revision: str | None = None
    #: Directory models: a hash of the weights file's path, size and modification time, so
    #: that two directories of the same name (a model tuned again, say) are told apart.
    fingerprint: str | None = None

    @property
    def key(self) -> str:
        """The model's identity in cache keys (the route head's): the name, plus the Hub
        commit or the directory's fingerprint."""
        suffix = self.revision or self.fingerprint
        return f"{self.name}@{suffix}" if suffix else self.name


def read_pooling(directory: Path) -> str | None:
    """The pooling in ``directory``'s sentence-transformers Pooling config, None without one.

    The Pooling module's folder comes from ``modules.json`` (default ``1_Pooling``). Raises
    :class:`ModelError` for an unreadable file or a pooling the encoder does not implement."""
    path = pooling_file(directory)
    config = read_json(path)
    if config is None:
        return None
    if not isinstance(config, dict):
        raise ModelError(f"{path}: expected a JSON object")
    modes = [mode for flag, mode in POOLING_FLAGS.items() if config.get(flag)]
    unsupported = [flag for flag in _UNSUPPORTED_POOLING_FLAGS if config.get(flag)]
    if unsupported or len(modes) > 1:
        raise ModelError(
            f"{path}: pooling {', '.join(modes + unsupported)} is not supported (one of "
            f"{', '.join(POOLING_FLAGS.values())}); set encoder.pooling to override"
        )
    return modes[0] if modes else None


def pooling_file(directory: Path) -> Path:
    """The Pooling module's config: its folder from ``modules.json``, else ``1_Pooling``."""
    folder = POOLING_CONFIG.split("/")[0]
    modules = read_json(directory / "modules.json")
    if isinstance(modules, list):
        for module in modules:
            if isinstance(module, dict) and str(module.get("type", "")).endswith(".Pooling"):
                folder = str(module.get("path") or folder)
    return directory / folder / "config.json"


# --- helpers -----------------------------------------------------------------------------------


def link_dir(target: Path, source: Path) -> Path:
    """``target`` holding model.onnx + tokenizer.json as links to ``source``'s onnx/ layout.

    Symbolic links where the platform allows (the Hub cache's files are links too), copies
    otherwise; made in a temporary directory and renamed into place, so it is whole or absent."""
    files = {
        MODEL_FILE: source / ONNX_FILE,
        TOKENIZER_FILE: source / TOKENIZER_FILE,
        "model.onnx_data": source / ONNX_DATA_FILE,
        POOLING_CONFIG: pooling_file(source),  # so that the directory alone says its pooling
    }
    files = {name: src for name, src in files.items() if src.is_file()}

    def valid() -> bool:
        return all(
            (target / name).is_file() and (target / name).resolve() == src.resolve()
            for name, src in files.items()
        )

    if valid():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with build_lock(target.parent):
            if valid():
                return target
            tmp = Path(
                tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            )
            try:
                for name, src in files.items():
                    (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                    try:
                        os.symlink(src.resolve(), tmp / name)
                    except OSError:  # pragma: no cover - no symlinks (some Windows set-ups)
                        shutil.copyfile(src, tmp / name)
                if target.exists():
                    shutil.rmtree(target)
                os.replace(tmp, target)
            finally:
                with contextlib.suppress(OSError):
                    shutil.rmtree(tmp)
    except OSError as exc:
        raise unwritable(target, exc) from exc
    return target


def unwritable(target: Path, exc: OSError) -> ModelError:
    return ModelError(
        f"cannot write the model cache in {target}: {exc} "
        "(set SEMROUTE_CACHE_DIR to a writable directory)"
    )


def check_sha256(
    path: Path, expected: str | None, *, label: str | None = None, actual: str | None = None
) -> None:
    """Raise :class:`ModelError` unless ``path``'s sha256 (or ``actual``) is ``expected``."""
    if expected is None:
        return
    actual = actual or sha256_file(path)
    if actual != expected.lower():
        where = f"{label}: " if label else ""
        raise ModelError(
            f"{where}{path.name} ({path}) has sha256 {actual}, expected {expected}: "
            "the file is not the one pinned (check encoder.sha256 and encoder.revision)"
        )


def pooling_of(directory: Path, config: EncoderConfig) -> str | None:
    if config.pooling == "auto":
        return read_pooling(directory)
    try:  # the override wins; the file is only reported
        return read_pooling(directory)
    except ModelError:
        return None


def read_json(path: Path) -> Any:
    """The parsed file, None when it does not exist; ModelError when it is not JSON."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc}") from exc
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ModelError(f"{path} is not valid JSON: {exc}") from exc


def identity(path: Path) -> str:
    """A hash of a file's resolved path, size and modification time (cheap: no read)."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]
