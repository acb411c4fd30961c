"""The Kafka service: settings, input records, delivery, LLM workers, operations."""

__all__: list[str] = []
