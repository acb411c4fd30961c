"""Generate the settings table of docs/configuration.md from the service config's model.

The rows (every setting, its type, default and bounds) come from
``semroute_stream._service.settings.Settings`` through its JSON Schema (``json_schema("config")``,
the same schema as ``docs/schema/config.json``); the meanings are kept here, one per setting.
A setting without a meaning, or a meaning without a setting, is an error, so the table cannot
silently fall behind the model.

    .venv/bin/python docs/gen_config_table.py          # rewrite the table in docs/configuration.md
    .venv/bin/python docs/gen_config_table.py --check  # exit 1 when the table is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from semroute_stream._encoder import EncoderConfig
from semroute_stream._schemas import json_schema
from semroute_stream._service import settings
from semroute_stream._service.llm import EndpointConfig

DOC = Path(__file__).resolve().parent / "configuration.md"
START = "<!-- config-table:start (docs/gen_config_table.py) -->"
END = "<!-- config-table:end -->"

#: The meaning of each setting, by its dotted path (``endpoints.*`` for every endpoint).
MEANINGS: dict[str, str] = {
    "routes": "the routes file (relative to the config file)",
    "secrets_dir": "directory of secret files (`kafka__sasl_password`...); "
    "`SEMROUTE_SECRETS_DIR` too",
    "mode": "`llm`: call the route's endpoint; `route_only`: publish the decision alone",
    "delivery": "`at_least_once` or `exactly_once` ([delivery.md](delivery.md))",
    "kafka.bootstrap_servers": "the brokers, `host:port[,host:port...]`",
    "kafka.client_id": "client id of every Kafka client",
    "kafka.security_protocol": "TLS and/or SASL",
    "kafka.sasl_mechanism": "required with a `SASL_*` protocol, refused without one",
    "kafka.sasl_username": "PLAIN / SCRAM user",
    "kafka.sasl_password": "PLAIN / SCRAM password (secret: environment, `.env` or secret file)",
    "kafka.sasl_oauth_token_provider": "OAUTHBEARER: `module:callable` giving the token",
    "kafka.sasl_kerberos_service_name": "GSSAPI service name (needs `pip install gssapi`)",
    "kafka.sasl_kerberos_domain_name": "GSSAPI domain name",
    "kafka.ssl_cafile": "CA bundle (relative to the config file)",
    "kafka.ssl_certfile": "client certificate (mutual TLS)",
    "kafka.ssl_keyfile": "client key (needs `ssl_certfile`)",
    "kafka.ssl_key_password": "password of an encrypted `ssl_keyfile` (secret)",
    "kafka.ssl_check_hostname": "`false` still verifies the chain, not the name",
    "kafka.metadata_max_age_ms": "metadata refresh: a topic created after start is seen this soon",
    "kafka.client_options.consumer": "allow-listed aiokafka options of the input consumer",
    "kafka.client_options.producer": "allow-listed aiokafka options of the outcome producers",
    "kafka.client_options.admin": "allow-listed aiokafka options of the admin client",
    "input.topic": "the topic the queries come from",
    "input.group_id": "consumer group (a replay commits to `<group_id>.replay.<UTC time>`)",
    "input.auto_offset_reset": "where a group without offsets starts",
    "input.format": "`json`: objects with a text field; `text`: the value is the text",
    "input.text_field": "the JSON field holding the query text",
    "input.id_field": "the JSON field copied to the outcome's `id`",
    "input.max_message_bytes": "larger values are dead-lettered (`oversized`)",
    "input.max_text_chars": "longer texts are dead-lettered (`oversized`)",
    "input.max_json_depth": "deeper JSON is dead-lettered (`too_deep`)",
    "input.max_key_bytes": "larger keys are dead-lettered (`oversized_key`)",
    "input.max_headers": "more headers are dead-lettered (`too_many_headers`)",
    "input.max_header_bytes": "larger headers in total are dead-lettered (`oversized_headers`)",
    "input.session_timeout_ms": "consumer group session timeout (heartbeats follow from it)",
    "input.max_poll_interval_ms": "consumer `max.poll.interval.ms`",
    "output.responses_topic": "where outcome records go",
    "output.dlq_topic": "where dead letters go",
    "output.per_route_topics": "one responses topic per route: `<prefix><route>`",
    "output.route_topic_prefix": "prefix of the per-route topics (null: `<responses_topic>.`)",
    "output.max_record_bytes": "records are cut to fit this and the output topics' "
    "`max.message.bytes`, whichever is smaller",
    "output.create_topics": "create missing output topics at start-up and reload "
    "(false: fail naming them)",
    "output.retry_topic_prefix": "parking topics `<prefix><endpoint>` "
    "(null: `<input.topic>.retry.`)",
    "output.timestamps": "outcome timestamps: the input record's, or this host's clock (`now`)",
    "batching.max_size": "a micro-batch closes at this many messages",
    "batching.linger_ms": "... or after this long",
    "flow.max_in_flight": "messages taken but not finished; above it every partition pauses",
    "flow.max_in_flight_per_endpoint": "the same bound for one endpoint",
    "flow.commit_interval_ms": "how often offsets (or exactly-once transactions) are committed",
    "flow.drain_timeout_s": "on SIGTERM/SIGINT: how long in-flight work may finish",
    "flow.rebalance_drain_timeout_s": "on a revoke: how long in-flight work may finish",
    "flow.circuit_open_max_wait_s": "with parking off: wait this long for an unavailable "
    "endpoint, then dead-letter",
    "flow.park_after_s": "llm mode: park a message whose endpoint is unavailable this long "
    "(null: no parking)",
    "flow.transaction_timeout_ms": "exactly_once: the producers' transaction timeout",
    "encoder.model": "`all-MiniLM-L6-v2` (built in), a directory with model.onnx + "
    "tokenizer.json, or `org/name` on the Hub",
    "encoder.revision": "Hub revision of a repo id (pin a commit)",
    "encoder.sha256": "sha256 of the weights file, checked after download",
    "encoder.pooling": "`auto`: the model's `1_Pooling/config.json`, else mean",
    "encoder.query_prefix": 'prepended to every text (E5/BGE: `"query: "`)',
    "encoder.normalize": "L2-normalise the embeddings (the cosines assume it)",
    "encoder.backend": "`auto`: OpenVINO where it helps, else ONNX Runtime "
    "([The encoder](#the-encoder))",
    "encoder.precision": "`auto`: bf16 only on CPUs with native bf16 units and a passing probe",
    "encoder.execution_providers": "ONNX Runtime providers, in order of preference",
    "encoder.max_length": "texts are truncated to this many tokens",
    "encoder.intra_op_threads": "ONNX Runtime intra-op threads (0: one per physical core)",
    "encoder.inter_op_threads": "ONNX Runtime inter-op threads (0: its default)",
    "encoder.allow_spinning": "let idle ONNX Runtime threads busy-wait (latency for CPU)",
    "encoder.max_batch_size": "most texts per model call",
    "encoder.max_batch_tokens": "most padded tokens (rows x padded length) per model call",
    "encoder.sort_by_length": "bucket texts of similar length into one model call",
    "encoder.cache_dir": "where the built-in model is built and kept",
    "endpoints": "LLM endpoints by name, referred to by the routes' `endpoint`",
    "endpoints.*.base_url": "OpenAI-compatible base URL: `POST {base_url}/chat/completions`",
    "endpoints.*.model": "the model asked for (a route's `model` overrides it)",
    "endpoints.*.api_key_env": "environment variable holding the API key (must be set)",
    "endpoints.*.system_prompt": "system prompt (a route's `system_prompt` overrides it)",
    "endpoints.*.max_tokens": "`max_tokens` of each request",
    "endpoints.*.temperature": "`temperature` of each request",
    "endpoints.*.timeout_s": "httpx timeout (each read; `deadline_s` bounds the whole attempt)",
    "endpoints.*.max_concurrency": "calls in flight to this endpoint",
    "endpoints.*.max_attempts": "tries per call in all (429, 5xx, timeouts, connection "
    "errors are retried)",
    "endpoints.*.backoff_initial_s": "first retry backoff (doubling, full jitter; "
    "`Retry-After` wins, capped)",
    "endpoints.*.backoff_max_s": "longest retry backoff",
    "endpoints.*.circuit_failure_threshold": "consecutive failures that open the breaker",
    "endpoints.*.circuit_reset_s": "open breaker: time to the trial call",
    "endpoints.*.deadline_s": "total time of one attempt, body included",
    "endpoints.*.max_response_bytes": "larger answers are rejected (`llm_rejected`)",
    "endpoints.*.extra_headers": "HTTP headers added to every request",
    "observability.metrics_port": "`/metrics`, `/livez`, `/readyz` port (null: no server; 0: any)",
    "observability.host": "address the server listens on (`0.0.0.0` for other hosts)",
    "observability.stall_timeout_s": "`/readyz` turns 503 after this long without progress",
    "logging.format": "`text` or `json` (one object per line)",
    "logging.level": "log level (`--log-level` wins)",
    "logging.log_message_text": "dead-letter log lines carry the message text (debugging)",
    "reload.watch_interval_s": "routes file check interval (0: only on SIGHUP)",
    "tracing.enabled": "OpenTelemetry spans (`pip install 'semroute-stream[otel]'`)",
    "review.enabled": "copy decisions worth a human look to the review topic "
    "([operations.md](operations.md#review-shadow-and-decision-quality))",
    "review.topic": "the review topic (default `<output.responses_topic>.review`)",
    "review.reasons": "which decisions: `fallback`, `low_margin`, `low_confidence` (head), "
    "`disagreement` (chosen route ≠ nearest utterance's route)",
    "review.margin_below": "`low_margin`: a chosen route leading its runner-up by less",
    "review.confidence_below": "`low_confidence`: a head's calibrated probability below this",
    "review.sample_rate": "share of candidates kept, by a hash of topic/partition/offset "
    "and `seed` (a replay keeps the same)",
    "review.seed": "the sampling hash's seed",
    "review.max_per_minute": "cap: a token bucket of this many, refilled evenly over a minute",
    "shadow.routes": "a candidate routes file decided alongside the live one (relative to the "
    "config file; unset: off); `semroute-stream promote` swaps it in",
    "shadow.topic": "where disagreements go (default `<output.responses_topic>.shadow`)",
    "drift.enabled": "route-share and fallback-rate drift gauges",
    "drift.recent_messages": "the recent window, in decisions",
    "drift.baseline_messages": "the baseline window: the decisions before the recent window",
    "tracing.exporter": "`otlp` (`OTEL_EXPORTER_OTLP_*`), `console`, or `global`",
    "tracing.service_name": "the spans' service name",
    "learning.enabled": "corrections retrain the head in-stream ([learning](learning.md))",
    "learning.corrections_topic": "corrections topic (null: `<input.topic>.corrections`)",
    "learning.overlay_topic": "overlay topic, compacted, 1 partition (`<input.topic>.overlay`)",
    "learning.group_id": "group reading the corrections (null: `<input.group_id>.corrections`)",
    "learning.max_text_chars": "a longer correction text is dead-lettered (`oversized`)",
    "learning.retrain_debounce_s": "wait this long after an overlay change before retraining",
    "learning.retrain_min_interval_s": "at least this long between two retrains",
    "learning.guard_tolerance": "hold back a retrain whose CV accuracy drops more than this",
    "learning.retrain_process": "train in a separate process (the routing loop keeps the GIL)",
    "learning.retrain_nice": "the training process's nice level (it yields the CPU to routing)",
    "learning.flip_limit": "label flips of one text within the window before it is quarantined",
    "learning.flip_window_s": "the flip-counting window",
}

#: Sections rendered as one row each (their own options are listed in the row).
_LEAF_SECTIONS = {
    "kafka.client_options.consumer",
    "kafka.client_options.producer",
    "kafka.client_options.admin",
}


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if isinstance(ref, str):
        resolved: dict[str, Any] = schema["$defs"][ref.rsplit("/", 1)[-1]]
        return resolved
    return node


def _type(schema: dict[str, Any], node: dict[str, Any]) -> str:
    node = _resolve(schema, node)
    if "enum" in node:
        return " \\| ".join(f"`{v}`" for v in node["enum"])
    if "anyOf" in node:
        return " \\| ".join(_type(schema, option) for option in node["anyOf"])
    kind = node.get("type", "any")
    if kind == "array":
        return f"list of {_type(schema, node.get('items', {}))}"
    if kind == "object":
        return "mapping"
    if node.get("format") == "password":
        return "secret"
    if node.get("format") == "path":
        return "path"
    return str(kind)


def _bounds(schema: dict[str, Any], node: dict[str, Any]) -> str:
    parts = []
    for option in [node, *node.get("anyOf", [])]:
        option = _resolve(schema, option)
        for key, sign in (
            ("minimum", ">="),
            ("exclusiveMinimum", ">"),
            ("maximum", "<="),
            ("exclusiveMaximum", "<"),
        ):
            if key in option:
                parts.append(f"{sign} {option[key]}")
    return ", ".join(parts)


#: The models behind the schema's sections, by name (for defaults made by a factory, which the
#: schema leaves out).
_MODELS: dict[str, type[BaseModel]] = {
    model.__name__: model
    for model in (
        settings.Settings,
        settings.KafkaConfig,
        settings.InputConfig,
        settings.OutputConfig,
        settings.BatchingConfig,
        settings.FlowConfig,
        settings.ObservabilityConfig,
        settings.LoggingConfig,
        settings.ReloadConfig,
        settings.TracingConfig,
        EncoderConfig,
        EndpointConfig,
    )
}


def _default(node: dict[str, Any], required: bool, model: str, name: str) -> str:
    if required:
        return "**required**"
    if "default" in node:
        value = node["default"]
    elif model in _MODELS and name in _MODELS[model].model_fields:
        value = _MODELS[model].model_fields[name].get_default(call_default_factory=True)
    else:
        return ""
    if isinstance(value, dict) and value:
        return "(see below)"
    return f"`{json.dumps(value)}`"


def rows(schema: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(setting, type, default, meaning) for every setting, in the model's order."""
    out: list[tuple[str, str, str, str]] = []
    missing: list[str] = []

    def meaning(path: str) -> str:
        text = MEANINGS.get(path)
        if text is None:
            missing.append(path)
            return ""
        return text

    def walk(section: dict[str, Any], prefix: str) -> None:
        required = set(section.get("required", []))
        model = str(section.get("title", ""))
        for name, node in section.get("properties", {}).items():
            path = f"{prefix}{name}"
            target = _resolve(schema, node)
            if path in _LEAF_SECTIONS:
                options = ", ".join(f"`{o}`" for o in target.get("properties", {}))
                out.append((path, "mapping", "`{}`", f"{meaning(path)}: {options}"))
            elif "properties" in target and "$ref" in node:
                walk(target, f"{path}.")
            elif "$ref" in target.get("additionalProperties", {}):
                values = _resolve(schema, target["additionalProperties"])
                kind = "mapping: name → section below"
                out.append((path, kind, _default(node, False, model, name), meaning(path)))
                walk(values, f"{path}.*.")
            else:
                text = meaning(path)
                bounds = _bounds(schema, node)
                kind = _type(schema, node) + (f" ({bounds})" if bounds else "")
                out.append((path, kind, _default(node, name in required, model, name), text))

    walk(schema, "")
    stale = sorted(set(MEANINGS) - {row[0] for row in out})
    problems = [f"no meaning for {p}" for p in missing] + [f"no such setting: {p}" for p in stale]
    if problems:
        raise SystemExit("gen_config_table: " + "; ".join(problems))
    return out


def table() -> str:
    lines = ["| setting | type | default | meaning |", "| --- | --- | --- | --- |"]
    for path, kind, default, text in rows(json_schema("config")):
        lines.append(f"| `{path}` | {kind} | {default} | {text} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the table is stale")
    args = parser.parse_args()
    text = DOC.read_text(encoding="utf-8")
    head, start, rest = text.partition(START)
    _, end, tail = rest.partition(END)
    if not start or not end:
        print(f"{DOC}: markers {START} ... {END} not found", file=sys.stderr)
        return 1
    new = f"{head}{START}\n{table()}\n{END}{tail}"
    if args.check:
        if new != text:
            print(
                f"{DOC}: the settings table is stale: run docs/gen_config_table.py", file=sys.stderr
            )
            return 1
        return 0
    DOC.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
