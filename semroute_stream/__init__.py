"""semroute-stream: a streaming semantic router.

Consumes text queries from Kafka in micro-batches, embeds them with all-MiniLM-L6-v2 on ONNX
Runtime, routes each to the route whose example utterances it matches best (or the fallback),
calls that route's OpenAI-compatible LLM endpoint and publishes the outcome. Everything public is
importable from here; the ``_``-prefixed modules are private.

``import semroute_stream`` stays light: the service's names (``run_service``, ``Settings``, the
LLM pool...) are imported on first use (PEP 562 ``__getattr__``), so that the library API, the
routing core and the encoder load without aiokafka, httpx or prometheus_client.
"""

import importlib
import typing

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
from ._routing.schema import Fallback, Route, RoutesConfig, load_routes, routes_version, save_routes

if typing.TYPE_CHECKING:
    from ._service.app import run_service
    from ._service.llm import EndpointConfig, LLMPool, LLMResult
    from ._service.observe import RunStats
    from ._service.settings import Settings, load_settings

__version__ = "0.1.0"

#: The service's public names, imported on first use: name -> its module.
_LAZY = {
    "EndpointConfig": "._service.llm",
    "LLMPool": "._service.llm",
    "LLMResult": "._service.llm",
    "RunStats": "._service.observe",
    "Settings": "._service.settings",
    "load_settings": "._service.settings",
    "run_service": "._service.app",
}

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


def __getattr__(name: str) -> typing.Any:
    """A service name, imported now (and kept in the module for the next look-up)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
