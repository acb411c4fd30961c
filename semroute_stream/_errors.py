"""The exceptions semroute-stream raises, in one place.

SemrouteError                 base of everything below
├── ConfigError               bad service config or routes file: names the file, field and reason
├── ModelError                the encoder model cannot be provisioned or loaded
├── InputError                one input message cannot be routed (goes to the DLQ, never raised
│                             out of the service); ``kind`` is a stable machine-readable code
└── LLMError                  a call to an OpenAI-compatible endpoint failed
    ├── LLMRetryableError     429, 5xx, timeouts and connection errors (retried with backoff)
    ├── LLMPermanentError     other 4xx and malformed responses (never retried)
    │   └── LLMMisconfiguredError  401/403/404 or a 200 that is not a chat completion: the
    │                              endpoint, not the message, is wrong (the endpoint pauses)
    └── CircuitOpenError      the endpoint's circuit breaker is open

Every message that cannot be answered ends as one dead letter whose ``error.kind`` is one of
:data:`ERROR_KINDS`: an :class:`InputError`'s ``kind`` (stage ``parse``), an
:class:`LLMError`'s class-level ``kind`` (stage ``llm``), or one of
:data:`HANDLING_ERROR_KINDS` (stage ``handle`` or ``publish``): whatever fails while one message
is handled ends in that message's dead letter, never in a crash.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "ERROR_KINDS",
    "HANDLING_ERROR_KINDS",
    "INPUT_ERROR_KINDS",
    "LLM_ERROR_KINDS",
    "CircuitOpenError",
    "ConfigError",
    "InputError",
    "LLMError",
    "LLMMisconfiguredError",
    "LLMPermanentError",
    "LLMRetryableError",
    "ModelError",
    "SemrouteError",
]

#: ``InputError.kind`` values (stage ``parse``).
INPUT_ERROR_KINDS = (
    "null_value",
    "oversized",
    "invalid_utf8",
    "invalid_json",
    "not_an_object",
    "missing_text",
    "text_not_string",
    "empty_text",
    "too_deep",
    "oversized_key",
    "too_many_headers",
    "oversized_headers",
    "undecodable_header_key",
    "unknown_route",  # a correction's label is no route of the routes in use
    "invalid_label",  # a correction's label is not a string or null
)
#: ``LLMError.kind`` values (stage ``llm``).
LLM_ERROR_KINDS = ("llm_rejected", "llm_retries_exhausted", "llm_circuit_open", "llm_misconfigured")
#: A bug or an unexpected failure while one message was handled (stage ``handle``), and an
#: outcome the broker refused as a record (stage ``publish``; its dead letter is minimal).
HANDLING_ERROR_KINDS = ("internal_error", "unpublishable")
#: Every dead letter's ``error.kind``: the one list (metrics pre-create a series per kind).
ERROR_KINDS = INPUT_ERROR_KINDS + LLM_ERROR_KINDS + HANDLING_ERROR_KINDS


class SemrouteError(Exception):
    """Base class of every error semroute-stream raises."""


class ConfigError(SemrouteError):
    """A config or routes file is invalid.

    ``str(err)`` reads ``FILE: FIELD: REASON`` (one line per problem) so that a start-up failure
    names exactly what to fix.
    """

    def __init__(self, message: str, *, file: str | None = None) -> None:
        self.file = file
        super().__init__(f"{file}: {message}" if file else message)


class ModelError(SemrouteError):
    """The encoder model cannot be provisioned, verified or loaded."""


class InputError(SemrouteError):
    """One input message cannot be routed.

    ``kind`` is one of :data:`INPUT_ERROR_KINDS`.
    """

    def __init__(self, kind: str, reason: str) -> None:
        self.kind = kind
        self.reason = reason
        super().__init__(f"{kind}: {reason}")


class LLMError(SemrouteError):
    """A call to an LLM endpoint failed. ``status`` is the HTTP status when there was one.

    ``kind`` is the dead letter's ``error.kind`` when the message cannot be answered.
    """

    kind: ClassVar[str] = "llm_rejected"

    def __init__(self, message: str, *, endpoint: str, status: int | None = None) -> None:
        self.endpoint = endpoint
        self.status = status
        super().__init__(f"{endpoint}: {message}")


class LLMRetryableError(LLMError):
    """A transient failure: 429, 5xx, timeout, connection error."""

    kind: ClassVar[str] = "llm_retries_exhausted"

    def __init__(
        self,
        message: str,
        *,
        endpoint: str,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.retry_after = retry_after
        super().__init__(message, endpoint=endpoint, status=status)


class LLMPermanentError(LLMError):
    """A failure that retrying will not fix: 4xx other than 429, or a malformed response."""


class LLMMisconfiguredError(LLMPermanentError):
    """The endpoint is set up wrong (401/403/404, or a 200 that is not a chat completion): no
    message can succeed there until someone fixes it, so the endpoint pauses instead of
    dead-lettering every message."""

    kind: ClassVar[str] = "llm_misconfigured"


class CircuitOpenError(LLMError):
    """The endpoint's circuit breaker is open; the call was not attempted.

    ``retry_after`` is how long (seconds) until the breaker lets a trial call through.
    """

    kind: ClassVar[str] = "llm_circuit_open"

    def __init__(self, message: str, *, endpoint: str, retry_after: float = 0.0) -> None:
        self.retry_after = retry_after
        super().__init__(message, endpoint=endpoint)
