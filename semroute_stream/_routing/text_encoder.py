"""What the router needs of an encoder (``TextEncoder``), and the default one, imported lazily.

``_routing`` has no static import of the encoder wing (docs/architecture.md, Layering): the
default encoder of ``Router.from_file`` is named by ``DEFAULT_ENCODER`` and imported by
``default_encoder_factory`` when a router is built without one, never at import time.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

__all__ = ["DEFAULT_ENCODER", "TextEncoder", "default_encoder_factory"]


class TextEncoder(Protocol):
    """What the router needs of an encoder (``semroute_stream._encoder.Encoder`` is one)."""

    @property
    def model_name(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """``(len(texts), dim)`` float32, L2-normalised, in input order."""
        ...


#: The encoder ``Router.from_file`` builds when it is given none, as ``module:attribute``: imported
#: on first use by ``default_encoder_factory``, so that ``_routing`` has no static import of the
#: encoder wing (docs/architecture.md, Layering) and nothing is registered at import time.
DEFAULT_ENCODER = "semroute_stream._encoder:Encoder"


def default_encoder_factory() -> Callable[[], TextEncoder]:
    """The default encoder's class (``DEFAULT_ENCODER``), imported now."""
    module, _, name = DEFAULT_ENCODER.partition(":")
    factory: Callable[[], TextEncoder] = getattr(importlib.import_module(module), name)
    return factory
