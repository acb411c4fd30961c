"""The encoder wing: texts -> embeddings, and where the model comes from.

``encoder`` holds :class:`Encoder`, ``config`` its settings (:class:`EncoderConfig`), ``backends``
what runs the model (ONNX Runtime or OpenVINO), ``provision`` where the model comes from (the
built-in default, a directory or the Hub: ``model_dir``, ``hub``), ``default_model`` the built-in
all-MiniLM-L6-v2 and its build, ``onnx_build`` the deterministic ONNX graph builder.
"""

from .config import EncoderConfig
from .encoder import FIDELITY_MIN, Encoder, fidelity_probe_texts

__all__ = ["FIDELITY_MIN", "Encoder", "EncoderConfig", "fidelity_probe_texts"]
