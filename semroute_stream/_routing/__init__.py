"""The routing core: routes file schema, routing kernels and decision, route head, router.

Pure numpy plus the encoder; knows no Kafka, no HTTP and no labelled data.
"""

__all__: list[str] = []
