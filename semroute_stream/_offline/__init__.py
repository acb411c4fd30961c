"""The offline tools on labelled data and files: eval, fit, thresholds, file routing, tune."""

__all__: list[str] = []
