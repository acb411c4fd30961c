"""The offline tools on labelled data and files: eval, fit, thresholds, file routing."""

__all__: list[str] = []
