"""The ``eval --html`` page (the ``[report]`` extra): ``html_report``, ``report_charts`` and the
Jinja2 template ``eval_report.html.j2`` beside them (package data)."""

__all__: list[str] = []
