"""semroute-stream: a streaming semantic router.

Consumes text queries from Kafka in micro-batches, embeds them with all-MiniLM-L6-v2 on ONNX
Runtime, routes each to the route whose example utterances it matches best (or the fallback),
calls that route's OpenAI-compatible LLM endpoint and publishes the outcome. Everything public is
importable from here; the ``_``-prefixed modules are private.
"""

from ._encoder import Encoder, EncoderConfig
from ._errors import (
    CircuitOpenError,
    ConfigError,
    InputError,
    LLMError,
    LLMPermanentError,
    LLMRetryableError,
    ModelError,
    SemrouteError,
)
from ._routing.decision import Decisions, RouteTable, decide
from ._routing.importers import import_routes
from ._routing.result import RouteDecision
from ._routing.router import Router
from ._routing.router import set_default_encoder as _set_default_encoder
from ._routing.schema import Fallback, Route, RoutesConfig, load_routes, routes_version, save_routes
from ._service.app import run_service
from ._service.llm import EndpointConfig, LLMPool, LLMResult
from ._service.observe import RunStats
from ._service.settings import Settings, load_settings

__version__ = "0.1.0"

# Router.from_file(path) without an encoder uses the Encoder (_routing never imports it).
_set_default_encoder(Encoder)

__all__ = [
    "CircuitOpenError",
    "ConfigError",
    "Decisions",
    "Encoder",
    "EncoderConfig",
    "EndpointConfig",
    "Fallback",
    "InputError",
    "LLMError",
    "LLMPermanentError",
    "LLMPool",
    "LLMResult",
    "LLMRetryableError",
    "ModelError",
    "Route",
    "RouteDecision",
    "RouteTable",
    "Router",
    "RoutesConfig",
    "RunStats",
    "SemrouteError",
    "Settings",
    "__version__",
    "decide",
    "import_routes",
    "load_routes",
    "load_settings",
    "routes_version",
    "run_service",
    "save_routes",
]
