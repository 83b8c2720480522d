"""Which account created a stored response (OpenAI Responses API).

`previous_response_id` resolves only on the account that created that response, so a
follow-up must go there: for these requests pinning is a matter of correctness. The
map lives in the state store (Redis when replicated, mirrored locally so a Redis outage
does not strand the conversations this replica created).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)

DEFAULT_TTL = 30 * 86400.0  # providers keep stored responses for 30 days


@dataclass(frozen=True, slots=True)
class Owner:
    account: str  # holds the stored response
    token: str  # created it: only this token may continue, read or delete it

    def dump(self) -> str:
        return f"{self.account}\t{self.token}"

    @staticmethod
    def load(raw: str) -> Owner:
        account, _, token = raw.partition("\t")
        return Owner(account, token)


class ResponseOwners(Protocol):
    async def put(self, response_id: str, owner: Owner) -> None: ...
    async def get(self, response_id: str) -> Owner | None: ...
    async def aclose(self) -> None: ...


class MemoryOwners:
    def __init__(
        self,
        ttl: float = DEFAULT_TTL,
        max_entries: int = 1_000_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.clock = clock
        self._owners: OrderedDict[str, tuple[Owner, float]] = OrderedDict()

    async def put(self, response_id: str, owner: Owner) -> None:
        self.put_now(response_id, owner)

    def put_now(self, response_id: str, owner: Owner) -> None:
        self._owners[response_id] = (owner, self.clock() + self.ttl)
        self._owners.move_to_end(response_id)
        while len(self._owners) > self.max_entries:
            self._owners.popitem(last=False)

    async def get(self, response_id: str) -> Owner | None:
        return self.get_now(response_id)

    def get_now(self, response_id: str) -> Owner | None:
        entry = self._owners.get(response_id)
        if entry is None:
            return None
        if entry[1] < self.clock():
            del self._owners[response_id]
            return None
        return entry[0]

    async def aclose(self) -> None:
        return None


class RedisOwners:
    def __init__(
        self,
        url: str,
        *,
        prefix: str = "ag",
        ttl: float = DEFAULT_TTL,
        socket_timeout: float = 0.05,
    ) -> None:
        import redis.asyncio as redis

        self._redis = redis.Redis.from_url(
            url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout
        )
        self.prefix = prefix
        self.ttl = int(ttl)
        self.local = MemoryOwners(ttl)
        self.errors = 0

    def _key(self, response_id: str) -> str:
        return f"{self.prefix}:resp:{response_id}"

    async def put(self, response_id: str, owner: Owner) -> None:
        self.local.put_now(response_id, owner)
        try:
            await self._redis.set(self._key(response_id), owner.dump(), ex=self.ttl)
        except Exception as exc:  # Redis away: this replica still knows, others learn later
            self.errors += 1
            log.warning("response owner not shared (%s)", type(exc).__name__)

    async def get(self, response_id: str) -> Owner | None:
        try:
            raw = await self._redis.get(self._key(response_id))
        except Exception as exc:
            self.errors += 1
            log.warning("response owner lookup fell back to local state (%s)", type(exc).__name__)
            return self.local.get_now(response_id)
        if raw is None:
            return self.local.get_now(response_id)
        return Owner.load(raw.decode() if isinstance(raw, bytes) else str(raw))

    async def aclose(self) -> None:
        await self._redis.aclose()
