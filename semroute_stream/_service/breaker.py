"""The circuit breaker of one LLM endpoint: consecutive failures open it, a trial call after
``reset_s`` closes it again (the rules are in :mod:`.llm`'s docstring).

Pure bookkeeping over an injected clock; no I/O.
"""

from __future__ import annotations

from collections.abc import Callable

from .._errors import CircuitOpenError

__all__ = ["CircuitBreaker"]


class CircuitBreaker:
    """Consecutive-failure circuit breaker; see the module docstring."""

    def __init__(
        self, name: str, threshold: int, reset_s: float, clock: Callable[[], float]
    ) -> None:
        self._name = name
        self._threshold = threshold
        self._reset_s = reset_s
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._trial_running = False
        self.down_since: float | None = None  # when it last opened after being closed

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return "closed"
        if self._clock() - self._opened_at < self._reset_s:
            return "open"
        return "half_open"

    def admit(self) -> bool:
        """Let a call through (returns whether it is the half-open trial) or fail fast."""
        if self._opened_at is None:
            return False
        wait = self._opened_at + self._reset_s - self._clock()
        if wait > 0:
            raise CircuitOpenError(
                f"circuit breaker open for {wait:.1f}s more",
                endpoint=self._name,
                retry_after=wait,
            )
        if self._trial_running:
            raise CircuitOpenError(
                "circuit breaker half-open, trial call running",
                endpoint=self._name,
                retry_after=0.1,
            )
        self._trial_running = True
        return True

    def end_trial(self) -> None:
        self._trial_running = False

    def trip(self) -> None:
        """Open now, whatever the count (the endpoint is misconfigured)."""
        self._failures = self._threshold
        self._opened_at = self._clock()
        if self.down_since is None:
            self.down_since = self._opened_at

    def record(self, *, ok: bool) -> bool:
        """Record a call's outcome; returns True when this opened (or reopened) the breaker."""
        if ok:
            self._failures = 0
            self._opened_at = None
            self.down_since = None
            return False
        self._failures += 1
        if self._failures < self._threshold:
            return False
        self._opened_at = self._clock()
        if self.down_since is None:
            self.down_since = self._opened_at
        return True
