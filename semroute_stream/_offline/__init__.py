"""The offline tools on labelled data and files: ``fit`` (routes), ``tune`` (the encoder),
``report`` (the ``eval --html`` page), file routing (``route_file``) and labelled data
(``labelled``)."""

__all__: list[str] = []
