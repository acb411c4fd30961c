"""The Kafka service: settings, input records, delivery, LLM workers, operations."""
