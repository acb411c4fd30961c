"""The routing core: routes file schema, routing kernels and decision, route head, router.

Numpy, plus the routes file and the head cache on disk; it takes any encoder (a ``TextEncoder``)
and knows no Kafka, no HTTP and no labelled data.
"""

__all__: list[str] = []
