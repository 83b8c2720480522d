"""Storage for the platform cache: embedded (per process) or Redis (shared by replicas).

Two shapes, each with a memory and a Redis implementation:

- `BlobStore` (the response cache): opaque blobs under a digest, with a TTL. The memory
  store is an LRU bounded in bytes; in Redis each blob is one string with an expiry.
- `KVStore` (the Cache API): per-namespace (tenant) keys with a TTL, tags, listing and a
  storage quota. In Redis every key of one namespace shares its hash tag (one slot), and
  a put, delete or listing is one Lua script, so quota accounting cannot race::

      {p}:kv:{<ns>}:v:<key>   string  the sealed value, expiring at its TTL
      {p}:kv:{<ns>}:m         hash    key -> [size, created_ms, expires_ms, [tags]]
      {p}:kv:{<ns>}:e         zset    key -> expires_ms (expired entries are purged
                                      from the index by the next write or listing)
      {p}:kv:{<ns>}:k         zset    every key, score 0: listing in key order
      {p}:kv:{<ns>}:t:<tag>   zset    keys with that tag, score 0
      {p}:kv:{<ns>}:u         string  bytes used (the quota counter)

Stores hold bytes only: encryption happens before a value gets here. A failing Redis
raises `StoreUnavailable`; callers decide what that means for the request.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

Clock = Callable[[], float]


class StoreUnavailable(Exception):
    """The storage back-end failed or timed out."""


class QuotaExceeded(Exception):
    def __init__(self, used: int, quota: int, size: int) -> None:
        super().__init__(f"{used} + {size} bytes > quota {quota}")
        self.used = used  # bytes used by the namespace without the value being replaced
        self.quota = quota
        self.size = size


@dataclass(slots=True)
class CacheCounters:
    """Process-lifetime counters, read at scrape time (nothing else on the request path)."""

    api_decrypt_failures: int = 0
    response_decrypt_failures: int = 0
    store_errors: int = 0


# --------------------------------------------------------------------------- blobs


class BlobStore(Protocol):
    async def get(self, key: bytes) -> bytes | None: ...
    async def put(self, key: bytes, blob: bytes, ttl: float) -> None: ...
    async def start(self) -> None: ...
    async def aclose(self) -> None: ...


class MemoryBlobs:
    """An LRU of blobs bounded by their total size."""

    def __init__(self, *, max_bytes: int = 256 << 20, clock: Clock = time.monotonic) -> None:
        self.max_bytes = max_bytes
        self.clock = clock
        self._items: OrderedDict[bytes, tuple[float, bytes]] = OrderedDict()
        self.used_bytes = 0

    async def get(self, key: bytes) -> bytes | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item[0] <= self.clock():
            self._drop(key)
            return None
        self._items.move_to_end(key)
        return item[1]

    async def put(self, key: bytes, blob: bytes, ttl: float) -> None:
        if len(blob) > self.max_bytes:
            return
        if key in self._items:
            self._drop(key)
        self._items[key] = (self.clock() + ttl, blob)
        self.used_bytes += len(blob)
        while self.used_bytes > self.max_bytes:
            self._drop(next(iter(self._items)))

    def _drop(self, key: bytes) -> None:
        _, blob = self._items.pop(key)
        self.used_bytes -= len(blob)

    def __len__(self) -> int:
        return len(self._items)

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


def _redis_client(url: str, socket_timeout: float | None, connect_timeout: float) -> Any:
    import redis.asyncio as redis  # only replicated setups need it

    return redis.Redis.from_url(
        url, socket_timeout=socket_timeout, socket_connect_timeout=connect_timeout
    )


def _store_errors() -> tuple[type[BaseException], ...]:
    from redis.exceptions import RedisError

    return (RedisError, OSError, TimeoutError)


class RedisBlobs:
    """One Redis string per blob: ``{prefix}:rc:<hex digest>``, expiring with the entry.

    On the request path: each call has one deadline of its own, and the client no socket
    timeout (redis-py wraps every send in a task of its own when it has one)."""

    def __init__(self, url: str, *, prefix: str = "ag", socket_timeout: float = 0.25) -> None:
        self._redis = _redis_client(url, None, socket_timeout)
        self._timeout = socket_timeout
        self._prefix = f"{prefix}:rc:"
        self._errors = _store_errors()

    async def get(self, key: bytes) -> bytes | None:
        try:
            async with asyncio.timeout(self._timeout):
                value: bytes | None = await self._redis.get(self._prefix + key.hex())
        except self._errors as exc:
            raise StoreUnavailable(type(exc).__name__) from None
        return value

    async def put(self, key: bytes, blob: bytes, ttl: float) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await self._redis.set(self._prefix + key.hex(), blob, px=max(1, int(ttl * 1000)))
        except self._errors as exc:
            raise StoreUnavailable(type(exc).__name__) from None

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        await self._redis.aclose()


# ------------------------------------------------------------------------ key-value


@dataclass(frozen=True, slots=True)
class Entry:
    blob: bytes  # as stored (sealed)
    created_at: float  # unix seconds
    expires_at: float
    tags: tuple[str, ...]

    @property
    def size(self) -> int:
        return len(self.blob)


@dataclass(frozen=True, slots=True)
class Listed:
    key: str
    size: int
    created_at: float
    expires_at: float
    tags: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Page:
    items: list[Listed]
    total: int  # live keys matching the listing's tag, all pages together
    used_bytes: int  # the namespace's storage in use
    next_cursor: str | None


class KVStore(Protocol):
    async def get(self, ns: str, key: str) -> Entry | None: ...

    async def put(
        self,
        ns: str,
        key: str,
        blob: bytes,
        *,
        ttl: float,
        tags: Sequence[str] = (),
        quota: int | None = None,
    ) -> int:
        """Store; return the namespace's bytes used after. Raises QuotaExceeded."""
        ...

    async def delete(self, ns: str, key: str) -> bool: ...
    async def page(
        self, ns: str, *, tag: str | None = None, limit: int = 100, cursor: str | None = None
    ) -> Page: ...
    async def start(self) -> None: ...
    async def aclose(self) -> None: ...


class MemoryKV:
    """Namespaces in one process, an LRU across them bounded by `max_bytes` (a cache may
    forget; a quota is per namespace)."""

    def __init__(self, *, max_bytes: int = 256 << 20, clock: Clock = time.time) -> None:
        self.max_bytes = max_bytes
        self.clock = clock
        self._items: OrderedDict[tuple[str, str], Entry] = OrderedDict()
        self._keys: dict[str, set[str]] = {}
        self._used: dict[str, int] = {}
        self._total = 0

    async def get(self, ns: str, key: str) -> Entry | None:
        entry = self._items.get((ns, key))
        if entry is None:
            return None
        if entry.expires_at <= self.clock():
            self._drop(ns, key)
            return None
        self._items.move_to_end((ns, key))
        return entry

    async def put(
        self,
        ns: str,
        key: str,
        blob: bytes,
        *,
        ttl: float,
        tags: Sequence[str] = (),
        quota: int | None = None,
    ) -> int:
        now = self.clock()
        old = self._items.get((ns, key))
        if quota is not None:
            without = self._used.get(ns, 0) - (old.size if old else 0)
            if without + len(blob) > quota:
                self._purge(ns, now)
                old = self._items.get((ns, key))
                without = self._used.get(ns, 0) - (old.size if old else 0)
                if without + len(blob) > quota:
                    raise QuotaExceeded(without, quota, len(blob))
        if old is not None:
            self._drop(ns, key)
        self._items[(ns, key)] = Entry(blob, now, now + ttl, tuple(tags))
        self._keys.setdefault(ns, set()).add(key)
        self._used[ns] = self._used.get(ns, 0) + len(blob)
        self._total += len(blob)
        while self._total > self.max_bytes and len(self._items) > 1:
            self._drop(*next(iter(self._items)))
        return self._used.get(ns, 0)

    async def delete(self, ns: str, key: str) -> bool:
        entry = self._items.get((ns, key))
        if entry is None:
            return False
        self._drop(ns, key)
        return entry.expires_at > self.clock()

    async def page(
        self, ns: str, *, tag: str | None = None, limit: int = 100, cursor: str | None = None
    ) -> Page:
        self._purge(ns, self.clock())
        items = self._items
        keys = sorted(
            k for k in self._keys.get(ns, ()) if tag is None or tag in items[(ns, k)].tags
        )
        start = bisect.bisect_right(keys, cursor) if cursor is not None else 0
        chosen = keys[start : start + limit]
        listed = []
        for k in chosen:
            e = items[(ns, k)]
            listed.append(Listed(k, e.size, e.created_at, e.expires_at, e.tags))
        more = start + limit < len(keys)
        return Page(listed, len(keys), self._used.get(ns, 0), chosen[-1] if more else None)

    def _purge(self, ns: str, now: float) -> None:
        items = self._items
        for k in [k for k in self._keys.get(ns, ()) if items[(ns, k)].expires_at <= now]:
            self._drop(ns, k)

    def _drop(self, ns: str, key: str) -> None:
        entry = self._items.pop((ns, key))
        keys = self._keys[ns]
        keys.discard(key)
        self._total -= entry.size
        used = self._used[ns] - entry.size
        if keys:
            self._used[ns] = used
        else:
            del self._keys[ns], self._used[ns]

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


# Shared head of the scripts: KEYS meta, exp, keys, used; ARGV value prefix, tag prefix,
# now (ms). `drop` removes one key everywhere; expired keys are purged first.
_LUA_HEAD = """
local meta, exp, keys, used = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local vpre, tpre = ARGV[1], ARGV[2]
local function drop(k)
  local m = redis.call('HGET', meta, k)
  if m then
    local d = cjson.decode(m)
    redis.call('DECRBY', used, d[1])
    for _, t in ipairs(d[4]) do redis.call('ZREM', tpre .. t, k) end
    redis.call('HDEL', meta, k)
  end
  redis.call('ZREM', exp, k)
  redis.call('ZREM', keys, k)
  redis.call('DEL', vpre .. k)
end
for _, k in ipairs(redis.call('ZRANGEBYSCORE', exp, '-inf', ARGV[3], 'LIMIT', 0, 1000)) do
  drop(k)
end
"""

# ARGV[4] key, [5] blob, [6] meta JSON, [7] expires_ms, [8] size, [9] quota (-1: none),
# [10..] tags. Returns {1, used after} or {0, used without the replaced value}.
_LUA_PUT = (
    _LUA_HEAD
    + """
local k, size, quota = ARGV[4], tonumber(ARGV[8]), tonumber(ARGV[9])
local old = redis.call('HGET', meta, k)
local oldsize = 0
if old then oldsize = cjson.decode(old)[1] end
local u = tonumber(redis.call('GET', used) or '0')
if quota >= 0 and u - oldsize + size > quota then return {0, u - oldsize} end
if old then drop(k) end
redis.call('SET', vpre .. k, ARGV[5])
redis.call('PEXPIREAT', vpre .. k, ARGV[7])
redis.call('HSET', meta, k, ARGV[6])
redis.call('ZADD', exp, ARGV[7], k)
redis.call('ZADD', keys, 0, k)
for i = 10, #ARGV do redis.call('ZADD', tpre .. ARGV[i], 0, k) end
return {1, redis.call('INCRBY', used, size)}
"""
)

# ARGV[4] key. Returns 1 when a live key was deleted.
_LUA_DELETE = (
    _LUA_HEAD
    + """
local existed = redis.call('HEXISTS', meta, ARGV[4])
drop(ARGV[4])
return existed
"""
)

# KEYS[5] the index to list (every key, or one tag's); ARGV[4] cursor ('' = start),
# [5] limit. Returns {total, used, keys, metas}.
_LUA_LIST = (
    _LUA_HEAD
    + """
local lo = '-'
if ARGV[4] ~= '' then lo = '(' .. ARGV[4] end
local ks = redis.call('ZRANGEBYLEX', KEYS[5], lo, '+', 'LIMIT', 0, tonumber(ARGV[5]))
local ms = {}
if #ks > 0 then ms = redis.call('HMGET', meta, unpack(ks)) end
return {redis.call('ZCARD', KEYS[5]), tonumber(redis.call('GET', used) or '0'), ks, ms}
"""
)


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


class RedisKV:
    """The Cache API's store in Redis (see the module docstring for the layout)."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "ag",
        socket_timeout: float = 0.5,
        clock: Clock = time.time,
    ) -> None:
        self._redis = _redis_client(url, socket_timeout, socket_timeout)
        self._prefix = prefix
        self.clock = clock
        self._errors = _store_errors()
        self._put = self._redis.register_script(_LUA_PUT)
        self._delete = self._redis.register_script(_LUA_DELETE)
        self._list = self._redis.register_script(_LUA_LIST)

    def _base(self, ns: str) -> str:
        # Hex keeps any namespace name ({, }, :) out of the hash tag's syntax.
        return f"{self._prefix}:kv:{{{ns.encode().hex()}}}:"

    def _keys(self, base: str) -> list[str]:
        return [base + "m", base + "e", base + "k", base + "u"]

    def _argv(self, base: str) -> list[Any]:
        return [base + "v:", base + "t:", int(self.clock() * 1000)]

    async def get(self, ns: str, key: str) -> Entry | None:
        base = self._base(ns)
        pipe = self._redis.pipeline(transaction=False)
        pipe.get(base + "v:" + key)
        pipe.hget(base + "m", key)
        try:
            blob, meta = await pipe.execute()
        except self._errors as exc:
            raise StoreUnavailable(type(exc).__name__) from None
        if blob is None or meta is None:
            return None
        _, created, expires, tags = orjson.loads(meta)
        if expires <= self.clock() * 1000:
            return None
        return Entry(blob, created / 1000, expires / 1000, tuple(tags))

    async def put(
        self,
        ns: str,
        key: str,
        blob: bytes,
        *,
        ttl: float,
        tags: Sequence[str] = (),
        quota: int | None = None,
    ) -> int:
        base = self._base(ns)
        now_ms = int(self.clock() * 1000)
        expires_ms = now_ms + max(1, int(ttl * 1000))
        meta = orjson.dumps([len(blob), now_ms, expires_ms, list(tags)])
        args = [
            *self._argv(base),
            key,
            blob,
            meta,
            expires_ms,
            len(blob),
            -1 if quota is None else quota,
            *tags,
        ]
        try:
            ok, used = await self._put(keys=self._keys(base), args=args)
        except self._errors as exc:
            raise StoreUnavailable(type(exc).__name__) from None
        if not ok:
            assert quota is not None
            raise QuotaExceeded(int(used), quota, len(blob))
        return int(used)

    async def delete(self, ns: str, key: str) -> bool:
        base = self._base(ns)
        try:
            existed = await self._delete(keys=self._keys(base), args=[*self._argv(base), key])
        except self._errors as exc:
            raise StoreUnavailable(type(exc).__name__) from None
        return bool(existed)

    async def page(
        self, ns: str, *, tag: str | None = None, limit: int = 100, cursor: str | None = None
    ) -> Page:
        base = self._base(ns)
        index = base + "k" if tag is None else base + "t:" + tag
        args = [*self._argv(base), cursor or "", limit + 1]  # one more: is there a next page?
        try:
            total, used, keys, metas = await self._list(keys=[*self._keys(base), index], args=args)
        except self._errors as exc:
            raise StoreUnavailable(type(exc).__name__) from None
        more = len(keys) > limit
        keys, metas = keys[:limit], metas[:limit]
        items = []
        for raw_key, raw_meta in zip(keys, metas, strict=True):
            if raw_meta is None:
                continue
            size, created, expires, tags = orjson.loads(raw_meta)
            items.append(Listed(_text(raw_key), size, created / 1000, expires / 1000, tuple(tags)))
        next_cursor = _text(keys[-1]) if more and keys else None
        return Page(items, int(total), int(used), next_cursor)

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        await self._redis.aclose()
