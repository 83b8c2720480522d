"""One account's stored Responses API responses: ``previous_response_id`` state.

A response lives only on the account that created it, for a fixed TTL from its creation
(reads do not extend it); past ``max_entries`` the least recently used goes first.
Each response keeps its own turn of the conversation and a reference to the response
it continued, so a chain costs its bytes once, and a response stays continuable after
its predecessor has been deleted or has expired, as with the real API.
All times are real seconds on the caller's monotonic clock.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True, frozen=True)
class StoredResponse:
    """body: the response object as served.
    input: this response's own input, as sent.
    turn: this response's input and output as the prompt serialises them.
    previous: the stored response it continued.
    """

    body: bytes
    input: Any
    turn: bytes
    previous: StoredResponse | None

    def conversation(self) -> list[bytes]:
        """The serialised conversation up to and including this response, oldest first."""
        turns: list[bytes] = []
        node: StoredResponse | None = self
        while node is not None:
            turns.append(node.turn)
            node = node.previous
        turns.reverse()
        return turns


class ResponseStore:
    """Response id -> (expiry, response), least recently used first."""

    __slots__ = ("_entries", "max_entries", "ttl")

    def __init__(self, *, ttl: float, max_entries: int) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, StoredResponse]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, response_id: str, now: float) -> StoredResponse | None:
        entry = self._entries.get(response_id)
        if entry is None:
            return None
        if entry[0] <= now:
            del self._entries[response_id]
            return None
        self._entries.move_to_end(response_id)
        return entry[1]

    def put(self, response_id: str, response: StoredResponse, now: float) -> None:
        entries = self._entries
        entries[response_id] = (now + self.ttl, response)
        entries.move_to_end(response_id)
        # Expired entries at the cold end go now; the rest when they are read or evicted.
        while entries:
            oldest = next(iter(entries.values()))
            if oldest[0] > now and len(entries) <= self.max_entries:
                break
            entries.popitem(last=False)

    def delete(self, response_id: str, now: float) -> bool:
        """Forget a response; False if it was not (or no longer) stored."""
        entry = self._entries.pop(response_id, None)
        return entry is not None and entry[0] > now
