"""Tuning the encoder on a routes file (``semroute-stream tune``, the ``[tune]`` extra).

The encoder only (routes are fitted by ``_offline.fit``): ``finetune`` (the run, its guard and
card), ``bert_jax`` (the BERT forward in JAX), ``tune_data``, ``tune_train`` and ``tuned_model``.
"""

__all__: list[str] = []
