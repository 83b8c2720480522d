"""The usage log: one record per proxied request, embedded or in Redis.

Appending never blocks the request and never fails it. The Redis log buffers records
(bounded) and writes them in batches from a background task; a write is idempotent
(keyed by request id), so a batch retried after an ambiguous failure is never counted
twice. Each token reads only its own records; an admin token reads all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import orjson

from gateway import background

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class UsageRecord:
    time: float  # unix seconds at the request's end
    request_id: str
    token: str
    user: str
    group: str
    model: str
    endpoint: str
    account: str
    status: int
    prompt_tokens: int
    cached_tokens: int
    cache_write_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cost: float
    cache_discount: float
    estimated: bool
    latency_ms: float
    ttfb_ms: float | None
    decision: str
    attempts: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Query:
    token: str | None  # None: every token (admin)
    start: float = 0.0
    end: float = float("inf")
    model: str | None = None
    group: str | None = None
    limit: int = 100
    before: float | None = None  # paging cursor: records strictly older than this time

    def matches(self, r: UsageRecord) -> bool:
        return (
            (self.token is None or r.token == self.token)
            and self.start <= r.time <= self.end
            and (self.before is None or r.time < self.before)
            and (self.model is None or r.model == self.model)
            and (self.group is None or r.group == self.group)
        )


class UsageLog(Protocol):
    def append(self, record: UsageRecord) -> None: ...
    async def query(self, q: Query) -> list[UsageRecord]: ...
    async def start(self) -> None: ...
    async def aclose(self) -> None: ...


def _newest_first(records: Iterable[UsageRecord], q: Query) -> list[UsageRecord]:
    out: list[UsageRecord] = []
    for r in records:
        if q.matches(r):
            out.append(r)
            if len(out) >= q.limit:
                break
    return out


class MemoryUsageLog:
    """The last `max_records` records of this process."""

    def __init__(self, max_records: int = 100_000) -> None:
        self._records: deque[UsageRecord] = deque(maxlen=max_records)

    def append(self, record: UsageRecord) -> None:
        self._records.append(record)

    async def query(self, q: Query) -> list[UsageRecord]:
        return _newest_first(reversed(self._records), q)

    def export(self) -> list[UsageRecord]:
        return list(self._records)

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


class RedisUsageLog:
    """Records as JSON strings keyed by request id, indexed per token in sorted sets.

    Keys (one hash tag per token, Redis-Cluster friendly):
      {prefix}:usage:{<token>}:idx   zset  request id -> time
      {prefix}:usage:{<token>}:<id>  string  the record, with a TTL of `retention`
      {prefix}:usage:tokens          set   token names (for the admin view)
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "ag",
        retention_seconds: float = 30 * 86400,
        max_buffer: int = 50_000,
        flush_interval: float = 0.2,
        socket_timeout: float = 0.5,
    ) -> None:
        import redis.asyncio as redis

        self._redis = redis.Redis.from_url(
            url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout
        )
        self.prefix = prefix
        self.retention = int(retention_seconds)
        self._buffer: deque[UsageRecord] = deque(maxlen=max_buffer)
        self.flush_interval = flush_interval
        self.dropped = 0  # records lost to a full buffer while Redis was away
        self.failures = 0
        self._task: asyncio.Task[None] | None = None

    def _idx(self, token: str) -> str:
        return f"{self.prefix}:usage:{{{token}}}:idx"

    def _key(self, token: str, rid: str) -> str:
        return f"{self.prefix}:usage:{{{token}}}:{rid}"

    def append(self, record: UsageRecord) -> None:
        if len(self._buffer) == self._buffer.maxlen:
            self.dropped += 1
        self._buffer.append(record)

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            await self.flush()

    async def flush(self) -> bool:
        """Write what is buffered; keep it buffered if Redis fails. True when empty after."""
        if not self._buffer:
            return True
        batch = list(self._buffer)
        pipe = self._redis.pipeline(transaction=False)
        for r in batch:
            # SET NX + ZADD are idempotent: a retried batch cannot count a request twice.
            pipe.set(
                self._key(r.token, r.request_id),
                orjson.dumps(r.to_dict()),
                ex=self.retention,
                nx=True,
            )
            pipe.zadd(self._idx(r.token), {r.request_id: r.time})
            pipe.sadd(f"{self.prefix}:usage:tokens", r.token)
        try:
            await pipe.execute()
        except Exception as exc:  # Redis away or slow: keep the records, try later
            self.failures += 1
            log.warning(
                "usage log: Redis write failed (%s); %d records buffered",
                type(exc).__name__,
                len(batch),
            )
            return False
        for _ in batch:
            self._buffer.popleft()
        return not self._buffer

    async def query(self, q: Query) -> list[UsageRecord]:
        if q.token is not None:
            tokens: Sequence[str] = [q.token]
        else:
            raw = await self._redis.smembers(f"{self.prefix}:usage:tokens")
            tokens = sorted(t.decode() if isinstance(t, bytes) else t for t in raw)
        hi = min(q.end, q.before - 1e-6) if q.before is not None else q.end
        found: list[UsageRecord] = []
        for token in tokens:
            ids = await self._redis.zrevrangebyscore(
                self._idx(token), hi, q.start, start=0, num=q.limit * 4 + 16
            )
            if not ids:
                continue
            keys = [self._key(token, i.decode() if isinstance(i, bytes) else str(i)) for i in ids]
            docs = await self._redis.mget(keys)
            found.extend(UsageRecord(**orjson.loads(d)) for d in docs if d is not None)
        found.sort(key=lambda r: r.time, reverse=True)
        return _newest_first(found, q)

    async def aclose(self) -> None:
        if self._task is not None:
            await background.stop(self._task)
        # Last chance for what is buffered; bounded so shutdown cannot hang on Redis.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await self.flush()
        await self._redis.aclose()
