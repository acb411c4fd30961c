"""The trained route head and its cache: ``load_or_train_head`` reads it or trains and writes it.

Weights and cross-validation scores are cached in ``<cache root>/heads/<key>.npz`` (the
encoder's cache root: ``$SEMROUTE_CACHE_DIR``, ``$XDG_CACHE_HOME/semroute-stream`` or
``~/.cache/semroute-stream``), keyed by a hash of the model name, the route names and
utterances and the head's training settings; files are written to a temporary name and moved
into place, and a cache that cannot be read or written is only a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._files import atomic_output, default_cache_root
from .kernels import head_log_proba
from .lexical import MAX_TERMS, LexicalHead, Vocabulary
from .selection import FOLDS, CrossValidation, cross_validate
from .training import train_head, train_lexical

__all__ = [
    "HEAD_VERSION",
    "HeadModel",
    "default_head_cache_dir",
    "head_cache_key",
    "load_or_train_head",
    "train_head_model",
]

log = logging.getLogger(__name__)

HEAD_VERSION = 2
"""Bump when training changes: it is part of the cache key."""


@dataclass(frozen=True, eq=False)
class HeadModel:
    """A trained head, its cross-validation (when asked for) and where it came from."""

    weights: np.ndarray  # (D, R) float32
    bias: np.ndarray  # (R,) float32
    cv: CrossValidation | None
    key: str
    cached: bool  # loaded from the cache
    seconds: float  # training (+ cross-validation) time, or cache load time
    iterations: int = 0
    lexical: LexicalHead | None = None  # the lexical view (None: head.lexical is 0)

    def log_proba(self, queries: np.ndarray, texts: Sequence[str] | None) -> np.ndarray:
        """The head's uncalibrated scores for normalised queries (and their texts)."""
        return head_log_proba(self.weights, self.bias, self.lexical, queries, texts)


def head_cache_key(
    model_name: str,
    route_names: Sequence[str],
    utterances: Sequence[Sequence[str]],
    *,
    l2: float,
    use_names: bool,
    with_cv: bool,
    dim: int,
    lexical: float = 0.0,
) -> str:
    """A hash of everything the head's weights depend on (not thresholds, endpoints, ...)."""
    payload = json.dumps(
        {
            "version": HEAD_VERSION,
            "model": model_name,
            "dim": dim,
            "l2": l2,
            "use_names": use_names,
            "lexical": lexical,
            "max_terms": MAX_TERMS,
            "cv": with_cv,
            "folds": FOLDS,
            "routes": [[n, list(u)] for n, u in zip(route_names, utterances, strict=True)],
        },
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


def default_head_cache_dir() -> Path:
    """``heads/`` under the cache root (see ``_files.default_cache_root``)."""
    return default_cache_root() / "heads"


_CACHE_ARRAYS = ("weights", "bias", "fingerprint")
_CV_ARRAYS = ("held_out", "gold", "head_log_proba", "max_score", "top5_score")
_LEX_ARRAYS = ("lex_terms", "lex_idf", "lex_weights", "lex_bias")


def _fingerprint(utterance_embeddings: np.ndarray, route_of: np.ndarray, n: int) -> np.ndarray:
    """Each route's mean utterance embedding: checks the cache was made with these vectors."""
    sums = np.zeros((n, utterance_embeddings.shape[1]), dtype=np.float64)
    np.add.at(sums, route_of, utterance_embeddings)
    counts = np.maximum(np.bincount(route_of, minlength=n), 1)
    out: np.ndarray = (sums / counts[:, None]).astype(np.float32)
    return out


def _read_cache(
    path: Path, fingerprint: np.ndarray, with_cv: bool, lexical: float
) -> HeadModel | None:
    started = time.perf_counter()
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        log.warning("route head cache %s is unreadable (%s): retraining", path, err)
        return None
    needed = _CACHE_ARRAYS + (_CV_ARRAYS if with_cv else ()) + (_LEX_ARRAYS if lexical else ())
    if any(name not in arrays for name in needed):
        return None
    stored = arrays["fingerprint"]
    if stored.shape != fingerprint.shape or not np.allclose(stored, fingerprint, atol=1e-3):
        log.info("route head cache %s was made with other embeddings: retraining", path)
        return None
    cv = CrossValidation(**{name: arrays[name] for name in _CV_ARRAYS}) if with_cv else None
    lexical_head = None
    if lexical:
        vocabulary = Vocabulary(tuple(str(t) for t in arrays["lex_terms"]), arrays["lex_idf"])
        lexical_head = LexicalHead(
            vocabulary, arrays["lex_weights"], arrays["lex_bias"], float(lexical)
        )
    return HeadModel(
        weights=arrays["weights"],
        bias=arrays["bias"],
        cv=cv,
        key=path.stem,
        cached=True,
        seconds=time.perf_counter() - started,
        lexical=lexical_head,
    )


def _write_cache(path: Path, model: HeadModel, fingerprint: np.ndarray) -> None:
    arrays: dict[str, np.ndarray] = {
        "weights": model.weights,
        "bias": model.bias,
        "fingerprint": fingerprint,
    }
    if model.cv is not None:
        arrays.update({name: getattr(model.cv, name) for name in _CV_ARRAYS})
    if model.lexical is not None:
        arrays["lex_terms"] = np.array(model.lexical.vocabulary.terms, dtype=str)
        arrays["lex_idf"] = model.lexical.vocabulary.idf
        arrays["lex_weights"] = model.lexical.weights
        arrays["lex_bias"] = model.lexical.bias
    try:
        with atomic_output(path) as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]
    except OSError as err:
        log.warning("cannot write the route head cache %s: %s", path, err)


def load_or_train_head(
    utterance_embeddings: np.ndarray,
    route_of: np.ndarray,
    name_embeddings: np.ndarray | None,
    n_routes: int,
    *,
    key: str,
    l2: float,
    with_cv: bool,
    cache_dir: Path | None,
    lexical: float = 0.0,
    texts: Sequence[str] = (),
    name_texts: Sequence[str] = (),
) -> HeadModel:
    """The head (and, with ``with_cv``, its cross-validation): from ``cache_dir/<key>.npz``
    when there, else trained and written there. ``cache_dir=None`` disables the cache.

    ``lexical`` > 0 adds the lexical view with that weight, trained on ``texts`` (the
    utterances) and ``name_texts`` (the names' texts, when ``name_embeddings`` is given)."""
    u = np.ascontiguousarray(utterance_embeddings, dtype=np.float32)
    route_of = np.asarray(route_of, dtype=np.intp)
    fingerprint = _fingerprint(u, route_of, n_routes)
    path = cache_dir / f"{key}.npz" if cache_dir is not None else None
    if path is not None:
        hit = _read_cache(path, fingerprint, with_cv, lexical)
        if hit is not None:
            return hit
    model = train_head_model(
        u,
        route_of,
        name_embeddings,
        n_routes,
        key=path.stem if path is not None else key,
        l2=l2,
        with_cv=with_cv,
        lexical=lexical,
        texts=texts,
        name_texts=name_texts,
    )
    if path is not None:
        _write_cache(path, model, fingerprint)
    return model


def train_head_model(
    utterance_embeddings: np.ndarray,
    route_of: np.ndarray,
    name_embeddings: np.ndarray | None,
    n_routes: int,
    *,
    key: str,
    l2: float,
    with_cv: bool,
    lexical: float = 0.0,
    texts: Sequence[str] = (),
    name_texts: Sequence[str] = (),
) -> HeadModel:
    """Train the head on the utterances (and names), its lexical view when ``lexical`` > 0,
    and, with ``with_cv``, cross-validate it (see ``load_or_train_head``; no cache)."""
    started = time.perf_counter()
    u = np.ascontiguousarray(utterance_embeddings, dtype=np.float32)
    if name_embeddings is not None and len(name_embeddings):
        extra = np.ascontiguousarray(name_embeddings, dtype=np.float32)
        extra_route = np.arange(n_routes, dtype=np.intp)
    else:
        extra = np.zeros((0, u.shape[1]), dtype=np.float32)
        extra_route = np.zeros(0, dtype=np.intp)
    labels = np.concatenate([route_of, extra_route])
    weights, bias, iterations = train_head(np.concatenate([u, extra]), labels, n_routes, l2=l2)
    extra_texts = list(name_texts) if len(extra) else []
    lexical_head = None
    if lexical:
        if len(texts) != len(u) or len(extra_texts) != len(extra):
            raise ValueError("the lexical view needs the text of every utterance and name")
        lexical_head = train_lexical(
            [*texts, *extra_texts], labels, n_routes, l2=l2, weight=lexical
        )
    cv = None
    if with_cv:
        cv = cross_validate(
            u,
            route_of,
            extra,
            extra_route,
            n_routes,
            l2=l2,
            init=(weights, bias),
            lexical=lexical_head,
            texts=texts,
            extra_texts=extra_texts,
        )
    seconds = time.perf_counter() - started
    return HeadModel(weights, bias, cv, key, False, seconds, iterations, lexical_head)
