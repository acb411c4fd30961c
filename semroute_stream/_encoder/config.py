"""The encoder's settings, ``EncoderConfig``: which model, how it is pooled, run and batched.

Its own module so that the model resolver (:mod:`.provision`) and the service config can name it
without importing the encoder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import pydantic
from pydantic import Field

from .default_model import DEFAULT_MODEL_NAME

__all__ = ["EncoderConfig"]


class EncoderConfig(pydantic.BaseModel):
    """How to load and run the encoder."""

    model_config = pydantic.ConfigDict(extra="forbid")

    #: ``all-MiniLM-L6-v2`` (built-in), a directory holding model.onnx + tokenizer.json, or a
    #: Hugging Face repo id (``org/name``) resolved by huggingface_hub (see :mod:`.provision`).
    model: str = DEFAULT_MODEL_NAME
    #: The hub revision (commit, tag or branch) of a repo id; pin a commit for reproducible runs.
    revision: str | None = None
    #: sha256 of the model's weights file (model.onnx, or model.safetensors when built here),
    #: checked after download; the built-in default's is known and always checked.
    sha256: str | None = None
    #: ``auto`` reads the model's ``1_Pooling/config.json`` (mean when there is none).
    pooling: Literal["auto", "mean", "cls", "max", "lasttoken"] = "auto"
    #: Prepended to every text before tokenizing (E5/BGE-style models: ``"query: "``).
    query_prefix: str = ""
    #: L2-normalise the embeddings (the routing core's cosines assume unit vectors).
    normalize: bool = True
    #: ``auto``: OpenVINO when it is installed (the ``[openvino]`` extra), else ONNX Runtime.
    backend: Literal["auto", "onnxruntime", "openvino"] = "auto"
    #: ``auto``: bf16 only on a CPU with native bf16 matrix units (AMX, AVX512-BF16) and a model
    #: that passes the fidelity probe at load; fp32 otherwise. bf16 needs the OpenVINO backend.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    #: ONNX Runtime execution providers, in order of preference (e.g. CUDAExecutionProvider).
    execution_providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"])
    #: Texts are truncated to this many tokens (special tokens included).
    max_length: Annotated[int, Field(gt=0, le=512)] = 256
    #: ONNX Runtime intra-op threads; 0 = its default (one per physical core).
    intra_op_threads: Annotated[int, Field(ge=0)] = 0
    #: ONNX Runtime inter-op threads (only used by parallel execution); 0 = its default.
    inter_op_threads: Annotated[int, Field(ge=0)] = 1
    #: Let idle ORT worker threads busy-wait (lower latency, burns CPU between calls).
    allow_spinning: bool = False
    #: Most texts per model call.
    max_batch_size: Annotated[int, Field(gt=0)] = 64
    #: Most padded tokens (rows x padded length) per model call.
    max_batch_tokens: Annotated[int, Field(gt=0)] = 4096
    #: Bucket texts of similar token length into the same model call (less padding).
    sort_by_length: bool = True
    #: Where the built-in model is built and kept (default: see ``default_cache_root``).
    cache_dir: Path | None = None
