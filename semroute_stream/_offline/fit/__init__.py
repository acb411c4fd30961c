"""Fitting routes on labelled data: the accuracy figures, method comparison, fallback thresholds.

Routes only (the encoder is never changed here: that is ``_offline.tune``): ``evaluate``,
``fallback_curve``, ``compare``, ``thresholds``, ``fit_routes`` and ``workflows`` (the ``fit``
command's workflows).
"""

__all__: list[str] = []
