"""A real HTTP server on loopback that speaks the OpenAI chat-completions API. Stdlib only.

A stand-in LLM endpoint for the tests, the benchmarks and docker/compose.yaml; shipped with the
package as ``semroute-stream stub-llm`` (``tests/llm_stub.py`` re-exports it).

Endpoints: ``POST /v1/chat/completions`` (and ``/chat/completions``), ``GET /v1/models``
(and ``/models``), ``GET /healthz``.

The answer is deterministic and shows what arrived, so a test can check that the right prompt
reached the right endpoint::

    content = "[NAME] " (if the stub has a name)
            + "[system: FIRST LINE OF THE SYSTEM PROMPT] " (if there is a system message)
            + "echo: " + LAST USER MESSAGE

``model`` echoes the request's model; ``usage`` counts whitespace-separated words.

In tests::

    with LLMStub(name="billing", latency=0.05) as stub:    # started; stopped on exit
        stub.url                     # "http://127.0.0.1:PORT/v1" (base_url for an OpenAI client)
        stub.fail_next(2, status=503, retry_after=1)       # the next 2 completions fail
        stub.fail_next(1, disconnect=True)                 # ... then one connection is dropped
        stub.fail_always(status=400)                       # every completion fails until clear()
        stub.clear()                                       # no more scripted failures
        stub.latency = 0.2                                 # seconds before every completion
        stub.stop(); stub.start()                          # down (connection refused), up again
        stub.requests                                      # [StubRequest(...)] completions only
        stub.request_count, stub.success_count, stub.failure_count, stub.max_in_flight

CLI (docker, benchmarks)::

    semroute-stream stub-llm --host 127.0.0.1 --port 8000 --latency-ms 200 [--name NAME]
    python tests/llm_stub.py ...                                  # the same, from a checkout
"""

from .answers import STUB_OWNER, StubFailure, StubRequest, expected_content
from .cli import add_arguments, main, serve
from .server import LLMStub

__all__ = [
    "STUB_OWNER",
    "LLMStub",
    "StubFailure",
    "StubRequest",
    "add_arguments",
    "expected_content",
    "main",
    "serve",
]
