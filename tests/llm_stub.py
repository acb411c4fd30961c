#!/usr/bin/env python3
"""The OpenAI-compatible stand-in LLM endpoint, re-exported from the package.

The server ships with the package (``semroute_stream._stub_llm``, ``semroute-stream stub-llm``);
this module keeps the tests' and benchmarks' ``from llm_stub import LLMStub`` and
``python tests/llm_stub.py --port 8000 --latency-ms 200`` working.
"""

from __future__ import annotations

import sys

from semroute_stream._stub_llm import (
    LLMStub,
    StubFailure,
    StubRequest,
    expected_content,
    main,
)
from semroute_stream._stub_llm.server import _Handler, _Server

__all__ = [
    "LLMStub",
    "StubFailure",
    "StubRequest",
    "_Handler",
    "_Server",
    "expected_content",
    "main",
]

if __name__ == "__main__":
    sys.exit(main())
