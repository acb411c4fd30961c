"""The sentence encoder, ``Encoder``: tokenizers + an inference backend + numpy pooling.

``Encoder(EncoderConfig()).encode(texts)`` returns L2-normalised float32 embeddings, one row per
text, in input order. Texts are tokenized once, sorted by token length and cut into contiguous
sub-batches of at most ``max_batch_size`` rows and ``max_batch_tokens`` padded tokens, choosing the
cut points that minimise the estimated run time (padded tokens, attention cost and a fixed
per-call overhead), so that a batch of short queries with a few long tickets does not pad every
query to the tickets' length (typically > 90 % of the tokens run are real). Each sub-batch is
padded only to its own longest text; the embeddings do not depend on which other texts share the
batch beyond float rounding (padded keys get an additive -10000 mask, exactly 0 after softmax).

Where the model comes from (the built-in ``all-MiniLM-L6-v2``, a directory, or a Hugging Face repo
id) is :mod:`.provision`; what runs it (ONNX Runtime or OpenVINO, fp32 or bf16) is
:mod:`.backends`. ``precision: auto`` takes bf16 only on a CPU with native bf16 units and only
when the shipped probe texts (``examples/fidelity_probe.txt``) embed within cosine
:data:`FIDELITY_MIN` of fp32. The model's first usable output is used: ``last_hidden_state`` (or
any rank-3 output) is pooled over the attention mask as the model's ``1_Pooling`` config says
(mean when it says nothing; ``pooling:`` overrides); a rank-2 output (e.g. ``sentence_embedding``)
is taken as already pooled. A ``token_type_ids`` input, if the model has one, is fed zeros.

``encode`` is thread-safe: the tokenizer is configured once at start-up and only read afterwards,
ONNX Runtime's ``run`` is thread-safe, and the OpenVINO backend keeps one infer request per thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from .._errors import ModelError
from .._files import atomic_write_bytes, default_cache_root
from .backends import Backend, cpu_features, open_backend, pick_backend, supported_precisions
from .config import EncoderConfig
from .default_model import MARKER_FILE, MODEL_FILE, TOKENIZER_FILE
from .provision import resolve_model

__all__ = [
    "FIDELITY_MIN",
    "Encoder",
    "SubBatch",
    "fidelity_probe_texts",
]

_POOLED_OUTPUT_NAMES = ("sentence_embedding", "sentence_embeddings", "embeddings", "text_embeds")
#: Cost model of one model call, in token-equivalents (see ``_split_sorted``).
_CALL_OVERHEAD_TOKENS = 16.0
_ATTENTION_TOKENS = 800.0
#: ``precision: auto`` keeps bf16 only when every probe text is at least this close to fp32.
FIDELITY_MIN = 0.9999
_log = logging.getLogger("semroute_stream.encoder")


class SubBatch(NamedTuple):
    """One model call: the rows' positions in the input, and the padded model inputs."""

    indices: npt.NDArray[np.intp]
    input_ids: npt.NDArray[np.int64]
    attention_mask: npt.NDArray[np.int64]


class Encoder:
    """Embeds texts into (L2-normalised) vectors with an ONNX sentence-embedding model."""

    model_name: str
    dim: int
    max_length: int
    #: The backend and precision in use (after ``auto`` was resolved).
    backend: str
    precision: str
    #: Min cosine of the shipped probe texts, bf16 vs fp32, when bf16 was considered.
    fidelity: float | None
    #: How token states are pooled: mean, cls, max, lasttoken, or "model" (already pooled).
    pooling: str

    def __init__(self, config: EncoderConfig | None = None) -> None:
        self.config = config if config is not None else EncoderConfig()
        self.max_length = self.config.max_length
        resolved = resolve_model(self.config)
        self.model_dir, self.model_name = resolved.directory, resolved.name
        self.model_source, self.model_revision = resolved.source, resolved.revision
        #: The model's identity in the route head's cache key (``ResolvedModel.key``).
        self.model_key = resolved.key
        self._tokenizer, self._pad_id = _load_tokenizer(
            self.model_dir / TOKENIZER_FILE, self.max_length
        )
        self.fidelity = None
        backend_name = pick_backend(self.config.backend, self.config.execution_providers)
        plan = self._precision_plan(backend_name)
        self._backend = self._open(backend_name, "bf16" if plan == "bf16" else "fp32")
        self._input_dtypes = self._check_inputs()
        self._output_name, declared_dim, rank = self._pick_output()
        self.pooling = self._pick_pooling(rank, resolved.pooling)
        probe = self._run(self.prepare(["semroute-stream warm-up"])[0])
        self.dim = int(probe.shape[1])
        if declared_dim is not None and declared_dim != self.dim:  # pragma: no cover - odd models
            raise ModelError(
                f"{self.model_dir / MODEL_FILE}: output {self._output_name!r} declares dimension "
                f"{declared_dim} but produced {self.dim}"
            )
        if plan == "probe":
            self._probe_bf16(backend_name)
        self.backend, self.precision = self._backend.name, self._backend.precision

    def __repr__(self) -> str:
        return (
            f"Encoder(model_name={self.model_name!r}, dim={self.dim}, max_length={self.max_length}"
            f", backend={self.backend!r}, precision={self.precision!r})"
        )

    # ---------------------------------------------------------------------------------------
    # Public API
    # ---------------------------------------------------------------------------------------

    def encode(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Embed ``texts``: an ``(n, dim)`` float32 array (unit vectors unless ``normalize`` is
        off), in input order."""
        batches = self.prepare(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for batch in batches:
            out[batch.indices] = self._run(batch)
        return out

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Real tokens per text (special tokens included) after truncation to ``max_length``."""
        return [len(enc.ids) for enc in self._tokenize(texts)]

    def prepare(self, texts: Sequence[str]) -> list[SubBatch]:
        """Tokenize ``texts`` and cut them into padded sub-batches (what :meth:`encode` runs)."""
        encodings = self._tokenize(texts)
        if not encodings:
            return []
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.intp, count=len(encodings))
        max_rows = self.config.max_batch_size
        max_tokens = self.config.max_batch_tokens
        if self.config.sort_by_length:
            order = np.argsort(lengths, kind="stable")
            bounds = _split_sorted(lengths[order], max_rows, max_tokens)
        else:
            order = np.arange(len(encodings), dtype=np.intp)
            bounds = _split_in_order(lengths, max_rows, max_tokens)
        batches: list[SubBatch] = []
        for start, end in bounds:
            indices = order[start:end]
            longest = int(lengths[indices].max())
            batches.append(self._pad([encodings[i].ids for i in indices], indices, longest))
        return batches

    # ---------------------------------------------------------------------------------------
    # Internals
    # ---------------------------------------------------------------------------------------

    def _open(self, backend: str, precision: str) -> Backend:
        cfg = self.config
        try:
            return open_backend(
                self.model_dir / MODEL_FILE,
                backend,
                precision,
                threads=cfg.intra_op_threads,
                inter_op_threads=cfg.inter_op_threads,
                spinning=cfg.allow_spinning,
                providers=cfg.execution_providers,
            )
        except ModelError as exc:
            if not (self.model_dir / MARKER_FILE).is_file() or "cannot load" not in str(exc):
                raise  # only a model built here can be rebuilt by deleting it
            raise ModelError(
                f"{exc} (delete {self.model_dir} to rebuild the cached model)"
            ) from exc

    def _precision_plan(self, backend: str) -> str:
        """``fp32``, ``bf16``, or ``probe`` (bf16 if the fidelity probe passes).

        ``auto`` takes bf16 only with native bf16 units and when the shipped probe texts embed
        within cosine :data:`FIDELITY_MIN` of fp32. The probe's verdict is kept in the cache
        (``probes/``, keyed by the model file, backend version, CPU and settings), so later
        starts skip the fp32 compile and the probe.
        """
        wanted = self.config.precision
        native = supported_precisions(backend)
        if wanted == "fp32" or (wanted == "auto" and "bf16" not in native):
            return "fp32"
        if wanted == "bf16" and "bf16" not in native:
            features = cpu_features()
            raise ModelError(
                f"encoder.precision bf16 needs encoder.backend openvino (not {backend})"
                if backend != "openvino"
                else f"encoder.precision bf16 needs a CPU with native bf16 units (AMX or "
                f"AVX512-BF16); {features.model} has flags {features.as_dict()['flags']}"
            )
        try:
            verdict = json.loads(self._verdict_path(backend).read_text(encoding="utf-8"))
            self.fidelity = float(verdict["fidelity"])
        except (OSError, ValueError, KeyError, TypeError):
            return "probe"
        keep = wanted == "bf16" or self.fidelity >= FIDELITY_MIN
        self._log_verdict(keep, cached=True)
        return "bf16" if keep else "fp32"

    def _probe_bf16(self, backend: str) -> None:
        """Embed the probe texts in fp32 and bf16; keep bf16 if close enough (or asked for)."""
        texts = fidelity_probe_texts()
        reference = self.encode(texts)
        fp32 = self._backend
        self._backend = self._open(backend, "bf16")
        got = self.encode(texts)
        self.fidelity = float(np.min(np.sum(reference * got, axis=1) / _norms(reference, got)))
        with contextlib.suppress(OSError):  # a read-only cache only costs the next start a probe
            path = self._verdict_path(backend)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, json.dumps({"fidelity": self.fidelity}).encode())
        keep = self.config.precision == "bf16" or self.fidelity >= FIDELITY_MIN
        self._log_verdict(keep, cached=False)
        if not keep:
            self._backend = fp32

    def _log_verdict(self, keep: bool, *, cached: bool) -> None:
        how = "cached probe" if cached else "probe"
        if keep:
            _log.info(
                "encoder: %s bf16 (%s: min cosine vs fp32 %.6f)",
                self.model_name,
                how,
                self.fidelity,
            )
        else:
            _log.warning(
                "encoder: bf16 %s min cosine %.6f < %s for %s; staying on fp32",
                how,
                self.fidelity,
                FIDELITY_MIN,
                self.model_name,
            )

    def _verdict_path(self, backend: str) -> Path:
        model = self.model_dir / MODEL_FILE
        stat = model.stat()
        key = {
            "model": [str(model.resolve()), stat.st_size, stat.st_mtime_ns],
            "backend": [backend, importlib.metadata.version(backend)],
            "cpu": cpu_features().as_dict(),
            "texts": fidelity_probe_texts(),
            "settings": [self.config.max_length, self.config.pooling, self.config.query_prefix],
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        root = self.config.cache_dir if self.config.cache_dir is not None else None
        return (Path(root).expanduser() if root else default_cache_root()) / "probes" / digest

    def _tokenize(self, texts: Sequence[str]) -> list[Any]:
        if isinstance(texts, str):
            raise TypeError("encode() takes a sequence of strings, not a single string")
        if len(texts) == 0:
            return []
        items = list(texts)
        for i, text in enumerate(items):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] is {type(text).__name__}, not str")
        prefix = self.config.query_prefix
        if prefix:
            items = [prefix + text for text in items]
        encodings: list[Any] = self._tokenizer.encode_batch(items, add_special_tokens=True)
        return encodings

    def _pad(self, rows: list[list[int]], indices: npt.NDArray[np.intp], length: int) -> SubBatch:
        ids = np.full((len(rows), length), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), length), dtype=np.int64)
        for r, row in enumerate(rows):
            ids[r, : len(row)] = row
            mask[r, : len(row)] = 1
        return SubBatch(indices, ids, mask)

    def _run(self, batch: SubBatch) -> npt.NDArray[np.float32]:
        feed: dict[str, npt.NDArray[Any]] = {}
        for name, dtype in self._input_dtypes.items():
            if name == "input_ids":
                feed[name] = batch.input_ids.astype(dtype, copy=False)
            elif name == "attention_mask":
                feed[name] = batch.attention_mask.astype(dtype, copy=False)
            else:  # token_type_ids
                feed[name] = np.zeros(batch.input_ids.shape, dtype=dtype)
        try:
            hidden = self._backend.run(self._output_name, feed)
        except Exception as exc:
            raise ModelError(f"{self.model_dir / MODEL_FILE}: inference failed: {exc}") from exc
        if hidden.ndim == 3:
            pooled = _pool(hidden, batch.attention_mask, self.pooling)
        elif hidden.ndim == 2:
            pooled = hidden
        else:
            raise ModelError(
                f"{self.model_dir / MODEL_FILE}: output {self._output_name!r} has rank "
                f"{hidden.ndim}; expected 3 (token states) or 2 (pooled embeddings)"
            )
        if not self.config.normalize:
            return pooled.astype(np.float32, copy=False)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        result: npt.NDArray[np.float32] = (pooled / np.maximum(norms, np.float32(1e-12))).astype(
            np.float32, copy=False
        )
        return result

    def _check_inputs(self) -> dict[str, type[np.signedinteger[Any]]]:
        model_path = self.model_dir / MODEL_FILE
        dtypes = self._backend.inputs
        for name in dtypes:
            if name not in ("input_ids", "attention_mask", "token_type_ids"):
                raise ModelError(
                    f"{model_path}: unsupported model input {name!r}; expected input_ids, "
                    "attention_mask and optionally token_type_ids"
                )
        if "input_ids" not in dtypes:
            raise ModelError(f"{model_path}: the model has no input_ids input")
        return dtypes

    def _pick_output(self) -> tuple[str, int | None, int | None]:
        """The output to use: token states (pooled here) or an already pooled embedding."""
        outputs = {o.name: o for o in self._backend.outputs}
        chosen: str | None = None
        if "last_hidden_state" in outputs:
            chosen = "last_hidden_state"
        else:
            chosen = next((n for n in _POOLED_OUTPUT_NAMES if n in outputs), None)
        if chosen is None:
            chosen = next((n for n, o in outputs.items() if o.rank in (2, 3)), None)
        if chosen is None:
            raise ModelError(
                f"{self.model_dir / MODEL_FILE}: no usable output among {sorted(outputs)}; "
                "expected last_hidden_state [batch, seq, dim] or a pooled embedding [batch, dim]"
            )
        return chosen, outputs[chosen].dim, outputs[chosen].rank

    def _pick_pooling(self, rank: int | None, declared: str | None) -> str:
        if rank == 2:
            return "model"
        if self.config.pooling != "auto":
            return self.config.pooling
        return declared or "mean"


def fidelity_probe_texts() -> list[str]:
    """The fixed texts the bf16 fidelity probe embeds (shipped with the package)."""
    path = Path(__file__).parent.parent / "examples" / "fidelity_probe.txt"
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _pool(
    hidden: npt.NDArray[np.float32], attention_mask: npt.NDArray[np.int64], mode: str
) -> npt.NDArray[np.float32]:
    mask = attention_mask.astype(np.float32)
    pooled: npt.NDArray[np.float32]
    if mode == "cls":
        pooled = hidden[:, 0, :]
    elif mode == "lasttoken":
        last = np.maximum(attention_mask.sum(axis=1) - 1, 0)
        pooled = hidden[np.arange(hidden.shape[0]), last, :]
    elif mode == "max":
        pooled = np.where(mask[:, :, None] > 0, hidden, np.float32(-np.inf)).max(axis=1)
    else:
        summed = np.matmul(mask[:, None, :], hidden)[:, 0, :]
        pooled = summed / np.maximum(mask.sum(axis=1, keepdims=True), np.float32(1e-9))
    return pooled


def _norms(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    n: npt.NDArray[np.float32] = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.maximum(n, np.float32(1e-12))


def _split_sorted(
    lengths: npt.NDArray[np.intp], max_rows: int, max_tokens: int
) -> list[tuple[int, int]]:
    """Cut ascending ``lengths`` into contiguous sub-batches of least estimated run time.

    A model call on ``rows`` texts padded to ``L`` tokens is modelled as costing
    ``_CALL_OVERHEAD_TOKENS + rows * L * (1 + L / _ATTENTION_TOKENS)`` token-equivalents (fixed
    per-call overhead, linear layers, attention), measured with all-MiniLM-L6-v2 on a 2-core x86
    CPU. Dynamic programming over the cut points finds the cheapest split that respects
    ``max_rows`` and ``max_tokens`` (a single text longer than ``max_tokens`` gets its own call).
    """
    n = len(lengths)
    best = np.zeros(n + 1, dtype=np.float64)
    cut = np.zeros(n + 1, dtype=np.intp)
    lens = lengths.astype(np.float64)
    for j in range(1, n + 1):
        longest = lens[j - 1]
        rows_cap = max(1, min(max_rows, int(max_tokens // longest)))
        starts = np.arange(max(0, j - rows_cap), j)
        rows = j - starts
        cost = best[starts] + (
            _CALL_OVERHEAD_TOKENS + rows * longest * (1.0 + longest / _ATTENTION_TOKENS)
        )
        k = int(np.argmin(cost))
        best[j] = cost[k]
        cut[j] = starts[k]
    bounds: list[tuple[int, int]] = []
    end = n
    while end > 0:
        bounds.append((int(cut[end]), end))
        end = int(cut[end])
    bounds.reverse()
    return bounds


def _split_in_order(
    lengths: npt.NDArray[np.intp], max_rows: int, max_tokens: int
) -> list[tuple[int, int]]:
    """Greedy consecutive sub-batches in input order (``sort_by_length=False``)."""
    bounds: list[tuple[int, int]] = []
    start = 0
    while start < len(lengths):
        end = start + 1
        longest = int(lengths[start])
        while end < len(lengths) and end - start < max_rows:
            candidate = max(longest, int(lengths[end]))
            if candidate * (end - start + 1) > max_tokens:
                break
            longest = candidate
            end += 1
        bounds.append((start, end))
        start = end
    return bounds


def _load_tokenizer(path: Path, max_length: int) -> tuple[Any, int]:
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:
        raise ModelError(f"cannot load tokenizer {path}: {exc}") from exc
    padding = tokenizer.padding
    pad_id: int | None = padding.get("pad_id") if padding else None
    if pad_id is None:
        pad_id = next(
            (i for tok in ("[PAD]", "<pad>") if (i := tokenizer.token_to_id(tok)) is not None), 0
        )
    # The shipped tokenizer.json pads to a fixed 128 and truncates at 128: pad nothing here (the
    # encoder pads each sub-batch to its own longest text) and truncate at max_length.
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length)
    return tokenizer, int(pad_id)
