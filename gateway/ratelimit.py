"""Per-token request and token limits over a sliding window.

Local to the process by design: a replica never waits on shared state to admit a
request, and with Redis gone the limits still hold per replica (never unlimited).
Windows are bucketed (1/12 of the window each), so memory does not grow with traffic.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

_BUCKETS = 12


@dataclass(slots=True)
class _Window:
    start: list[float] = field(default_factory=lambda: [0.0] * _BUCKETS)
    requests: list[int] = field(default_factory=lambda: [0] * _BUCKETS)
    tokens: list[int] = field(default_factory=lambda: [0] * _BUCKETS)


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    retry_after: float
    remaining_requests: int | None
    remaining_tokens: int | None


class TokenLimiter:
    def __init__(
        self, window_seconds: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.window = window_seconds
        self.bucket = window_seconds / _BUCKETS
        self.clock = clock
        self._windows: dict[str, _Window] = {}

    def _slot(self, w: _Window, now: float) -> int:
        i = int(now / self.bucket) % _BUCKETS
        start = now - (now % self.bucket)
        if w.start[i] != start:  # a bucket from an older lap of the ring: reuse it
            w.start[i] = start
            w.requests[i] = 0
            w.tokens[i] = 0
        return i

    def _sums(self, w: _Window, now: float) -> tuple[int, int, float]:
        horizon = now - self.window
        reqs = toks = 0
        oldest = now
        for i in range(_BUCKETS):
            if w.start[i] > horizon:
                reqs += w.requests[i]
                toks += w.tokens[i]
                if w.requests[i] or w.tokens[i]:
                    oldest = min(oldest, w.start[i])
        return reqs, toks, oldest

    def admit(self, token: str, rpm: int | None, tpm: int | None) -> Verdict:
        """Count one request for `token` unless it is over a limit."""
        if rpm is None and tpm is None:
            return Verdict(True, 0.0, None, None)
        now = self.clock()
        w = self._windows.get(token)
        if w is None:
            w = self._windows[token] = _Window()
        reqs, toks, oldest = self._sums(w, now)
        over = (rpm is not None and reqs >= rpm) or (tpm is not None and toks >= tpm)
        if over:
            # The oldest bucket leaves the window first; that frees some room.
            retry = max(oldest + self.window + self.bucket - now, 1.0)
            return Verdict(False, retry, _left(rpm, reqs), _left(tpm, toks))
        w.requests[self._slot(w, now)] += 1
        return Verdict(True, 0.0, _left(rpm, reqs + 1), _left(tpm, toks))

    def record_tokens(self, token: str, tokens: int) -> None:
        """Tokens a finished request used (prompt + completion), for the TPM limit."""
        w = self._windows.get(token)
        if w is not None and tokens > 0:
            w.tokens[self._slot(w, self.clock())] += tokens


def _left(limit: int | None, used: int) -> int | None:
    return None if limit is None else max(limit - used, 0)
