"""A sliding window of request and token counts in a fixed ring of time buckets.

Memory does not grow with traffic: a window is a few small lists whatever the rate. The
sum covers the current bucket and ``buckets`` whole ones before it, so it over-counts
the oldest edge by at most one bucket - the safe side for admission.
"""

from __future__ import annotations


class SlidingWindow:
    __slots__ = ("_epochs", "_head", "_inp", "_out", "_req", "input", "output", "requests", "width")

    def __init__(self, window_seconds: float, buckets: int) -> None:
        self.width = window_seconds / buckets
        slots = buckets + 1
        self._epochs = [-1] * slots
        self._req = [0] * slots
        self._inp = [0] * slots
        self._out = [0] * slots
        self._head = -1  # newest epoch the totals are valid for
        self.requests = 0
        self.input = 0
        self.output = 0

    def _roll(self, now: float) -> int:
        epoch = int(now // self.width)
        if epoch != self._head:
            oldest = epoch - len(self._epochs) + 1
            for slot, slot_epoch in enumerate(self._epochs):
                if 0 <= slot_epoch < oldest:
                    self.requests -= self._req[slot]
                    self.input -= self._inp[slot]
                    self.output -= self._out[slot]
                    self._req[slot] = self._inp[slot] = self._out[slot] = 0
                    self._epochs[slot] = -1
            self._head = epoch
        return epoch

    def add(self, now: float, requests: int, input_tokens: int, output_tokens: int) -> None:
        epoch = self._roll(now)
        slot = epoch % len(self._epochs)
        self._epochs[slot] = epoch
        self._req[slot] += requests
        self._inp[slot] += input_tokens
        self._out[slot] += output_tokens
        self.requests += requests
        self.input += input_tokens
        self.output += output_tokens

    def adjust(self, at: float, now: float, input_delta: int, output_delta: int) -> None:
        """Correct what was added at time ``at``, if that bucket is still in the window."""
        self._roll(now)
        epoch = int(at // self.width)
        slot = epoch % len(self._epochs)
        if self._epochs[slot] != epoch:
            return  # aged out: it no longer counts either way
        input_delta = max(input_delta, -self._inp[slot])
        output_delta = max(output_delta, -self._out[slot])
        self._inp[slot] += input_delta
        self._out[slot] += output_delta
        self.input += input_delta
        self.output += output_delta

    def totals(self, now: float) -> tuple[int, int, int]:
        """(requests, input tokens, output tokens) in the window ending now."""
        if int(now // self.width) != self._head:
            self._roll(now)
        return self.requests, self.input, self.output
