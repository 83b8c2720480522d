"""A circuit breaker for an optional dependency: closed, open for a cool-down, half-open.

While open, callers skip the dependency entirely (no timeout to wait out). After the
cool-down exactly one call probes it; success closes the circuit, failure reopens it for
a longer cool-down (doubling up to a ceiling).
"""

from __future__ import annotations

import time
from collections.abc import Callable


class CircuitBreaker:
    __slots__ = ("_clock", "_cooldown", "_open_until", "_probing", "base_cooldown", "max_cooldown")

    def __init__(
        self,
        *,
        cooldown: float = 2.0,
        max_cooldown: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base_cooldown = cooldown
        self.max_cooldown = max_cooldown
        self._clock = clock
        self._cooldown = cooldown
        self._open_until: float | None = None  # None: closed
        self._probing = False

    @property
    def open(self) -> bool:
        return self._open_until is not None

    @property
    def cooling(self) -> bool:
        """Open, and no call may probe yet (the cool-down runs, or a probe is out)."""
        until = self._open_until
        return until is not None and (self._probing or self._clock() < until)

    def allow(self) -> bool:
        """May this call use the dependency? In half-open state only one probe may."""
        if self._open_until is None:
            return True
        if self._probing or self._clock() < self._open_until:
            return False
        self._probing = True
        return True

    def success(self) -> None:
        self._open_until = None
        self._probing = False
        self._cooldown = self.base_cooldown

    def failure(self) -> None:
        if self._probing:
            self._cooldown = min(self._cooldown * 2.0, self.max_cooldown)
        self._probing = False
        self._open_until = self._clock() + self._cooldown

    def abandon(self) -> None:
        """The call was cancelled before it could tell: let the next one probe."""
        self._probing = False
