"""Per-account rate limits over a sliding window: requests, input tokens, concurrency.

Only admitted requests enter the window (a 429 costs the caller nothing, as with the
real providers). Times are real seconds on the caller's monotonic clock.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from gateway.emulator.config import LimitSpec


class RateWindow:
    """Admitted requests and the input tokens they counted, over the last ``window`` s."""

    __slots__ = ("_events", "_tokens", "window")

    def __init__(self, window: float) -> None:
        self.window = window
        self._events: deque[tuple[float, int]] = deque()
        self._tokens = 0

    def _expire(self, now: float) -> None:
        events = self._events
        cutoff = now - self.window
        while events and events[0][0] <= cutoff:
            self._tokens -= events.popleft()[1]

    def usage(self, now: float) -> tuple[int, int]:
        """(requests, tokens) in the window."""
        self._expire(now)
        return len(self._events), self._tokens

    def add(self, now: float, tokens: int) -> None:
        self._events.append((now, tokens))
        self._tokens += tokens

    def reset_in(self, now: float) -> float:
        """Seconds until the oldest event leaves the window (0 when empty)."""
        self._expire(now)
        return self._events[0][0] + self.window - now if self._events else 0.0

    def wait_for_requests(self, now: float, limit: int) -> float:
        """Seconds until one more request fits under ``limit``."""
        events = self._events
        excess = len(events) + 1 - limit
        if excess <= 0:
            return 0.0
        return events[excess - 1][0] + self.window - now

    def wait_for_tokens(self, now: float, limit: int, tokens: int) -> float:
        """Seconds until ``tokens`` more fit under ``limit``; a whole window if they never do."""
        excess = self._tokens + tokens - limit
        if excess <= 0:
            return 0.0
        if tokens > limit:
            return self.window
        for at, counted in self._events:
            excess -= counted
            if excess <= 0:
                return at + self.window - now
        return self.window


@dataclass(slots=True, frozen=True)
class Denial:
    """Why a request was turned away, and when to come back (real seconds)."""

    kind: str  # "requests", "tokens" or "concurrency"
    retry_after: float
    message: str


def admit(
    limits: LimitSpec,
    window: RateWindow,
    *,
    active: int,
    tokens: int,
    now: float,
    concurrency_retry: float,
) -> Denial | None:
    """Check a request against the account's limits; record it in the window if admitted."""
    requests, used = window.usage(now)
    if limits.concurrency is not None and active >= limits.concurrency:
        return Denial(
            "concurrency",
            concurrency_retry,
            f"Concurrency limit reached: {limits.concurrency} requests in flight.",
        )
    if limits.rpm is not None and requests >= limits.rpm:
        return Denial(
            "requests",
            window.wait_for_requests(now, limits.rpm),
            f"Rate limit reached for requests: limit {limits.rpm}, used {requests}.",
        )
    if limits.itpm is not None and used + tokens > limits.itpm:
        return Denial(
            "tokens",
            window.wait_for_tokens(now, limits.itpm, tokens),
            f"Rate limit reached for input tokens: limit {limits.itpm}, used {used}, "
            f"requested {tokens}.",
        )
    window.add(now, tokens)
    return None
