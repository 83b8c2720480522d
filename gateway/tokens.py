"""API tokens: the configured ones, the ones made at runtime, and their spend.

Runtime tokens are stored as keyed hashes in the state store (Redis when configured,
so every replica sees them) and refreshed every `refresh_seconds`: a revocation takes
effect everywhere within that time. Spend per token and UTC day/month accumulates
locally and, with Redis, is shared; budgets are enforced against the freshest figure
this replica has (at most one refresh behind the others).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

import orjson

from gateway import background
from gateway.context import Principal
from gateway.keys import hash_key, new_key

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TokenSpec:
    """A runtime token as stored: everything but the key itself."""

    name: str
    key_hash: str
    group: str
    user: str = ""
    user_group: str = "default"
    fallback_groups: tuple[str, ...] = ()
    rpm: int | None = None
    tpm: int | None = None
    budget_usd_day: float | None = None
    budget_usd_month: float | None = None
    admin: bool = False  # configured tokens only: the admin API never makes one
    created: float = field(default_factory=time.time)

    def principal(self) -> Principal:
        return Principal(
            token=self.name,
            user=self.user or self.name,
            user_group=self.user_group,
            group=self.group,
            fallback_groups=self.fallback_groups,
            rpm=self.rpm,
            tpm=self.tpm,
            budget_usd_day=self.budget_usd_day,
            budget_usd_month=self.budget_usd_month,
            admin=self.admin,
        )

    def public(self) -> dict[str, Any]:
        doc = asdict(self)
        del doc["key_hash"]
        return doc

    @staticmethod
    def load(raw: bytes | str) -> TokenSpec:
        doc = orjson.loads(raw)
        doc["fallback_groups"] = tuple(doc.get("fallback_groups", ()))
        return TokenSpec(**doc)


class TokenStore(Protocol):
    async def put(self, spec: TokenSpec) -> None: ...
    async def delete(self, name: str) -> bool: ...
    async def all(self) -> dict[str, TokenSpec]: ...
    async def add_spend(self, spent: Mapping[str, float], day: str, month: str) -> None: ...
    async def spend(self, day: str, month: str) -> dict[str, tuple[float, float]]: ...
    async def aclose(self) -> None: ...


class MemoryTokenStore:
    def __init__(self) -> None:
        self._specs: dict[str, TokenSpec] = {}
        self._spend: dict[tuple[str, str], float] = {}

    async def put(self, spec: TokenSpec) -> None:
        self._specs[spec.name] = spec

    async def delete(self, name: str) -> bool:
        return self._specs.pop(name, None) is not None

    async def all(self) -> dict[str, TokenSpec]:
        return dict(self._specs)

    async def add_spend(self, spent: Mapping[str, float], day: str, month: str) -> None:
        for token, usd in spent.items():
            for period in (day, month):
                self._spend[token, period] = self._spend.get((token, period), 0.0) + usd

    async def spend(self, day: str, month: str) -> dict[str, tuple[float, float]]:
        tokens = {t for t, _ in self._spend}
        return {
            t: (self._spend.get((t, day), 0.0), self._spend.get((t, month), 0.0)) for t in tokens
        }

    async def aclose(self) -> None:
        return None


class RedisTokenStore:
    def __init__(self, url: str, *, prefix: str = "ag", socket_timeout: float = 0.5) -> None:
        import redis.asyncio as redis

        self._redis = redis.Redis.from_url(
            url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout
        )
        self._tokens = f"{prefix}:tokens"
        self._spend_prefix = f"{prefix}:spend"

    async def put(self, spec: TokenSpec) -> None:
        await self._redis.hset(self._tokens, spec.name, orjson.dumps(asdict(spec)))

    async def delete(self, name: str) -> bool:
        return bool(await self._redis.hdel(self._tokens, name))

    async def all(self) -> dict[str, TokenSpec]:
        raw = await self._redis.hgetall(self._tokens)
        return {
            (k.decode() if isinstance(k, bytes) else str(k)): TokenSpec.load(v)
            for k, v in raw.items()
        }

    async def add_spend(self, spent: Mapping[str, float], day: str, month: str) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for period, ttl in ((day, 3 * 86400), (month, 70 * 86400)):
            key = f"{self._spend_prefix}:{period}"
            for token, usd in spent.items():
                pipe.hincrbyfloat(key, token, usd)
            pipe.expire(key, ttl)
        await pipe.execute()

    async def spend(self, day: str, month: str) -> dict[str, tuple[float, float]]:
        pipe = self._redis.pipeline(transaction=False)
        pipe.hgetall(f"{self._spend_prefix}:{day}")
        pipe.hgetall(f"{self._spend_prefix}:{month}")
        by_day, by_month = await pipe.execute()

        def decode(raw: Mapping[Any, Any]) -> dict[str, float]:
            return {
                (k.decode() if isinstance(k, bytes) else str(k)): float(v) for k, v in raw.items()
            }

        d, m = decode(by_day), decode(by_month)
        return {t: (d.get(t, 0.0), m.get(t, 0.0)) for t in d.keys() | m.keys()}

    async def aclose(self) -> None:
        await self._redis.aclose()


# Spend is added to the shared store in batches: one round trip per this many seconds,
# not one per request. Other replicas read it with their token refresh anyway.
SHARE_DELAY = 0.25


def periods(now: float | None = None) -> tuple[str, str]:
    t = time.gmtime(now)
    return time.strftime("day:%Y%m%d", t), time.strftime("month:%Y%m", t)


class Tokens:
    """What auth asks: who holds this key digest, and has that token spent its budget."""

    def __init__(
        self,
        secret: str,
        configured: Mapping[str, Principal],
        store: TokenStore,
        *,
        refresh_seconds: float = 2.0,
    ) -> None:
        self._secret = secret.encode()
        self._configured = {bytes.fromhex(h): p for h, p in configured.items()}
        self._runtime: dict[bytes, Principal] = {}
        self._names: set[str] = {p.token for p in configured.values()}
        self.store = store
        self.refresh_seconds = refresh_seconds
        self._spent: dict[str, tuple[float, float]] = {}
        self._unshared: dict[str, float] = {}  # counted here, not yet added to the store
        self._sharing: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None

    def digest(self, key: bytes) -> bytes:
        return hmac.new(self._secret, key, hashlib.sha256).digest()

    def lookup(self, digest: bytes) -> Principal | None:
        return self._configured.get(digest) or self._runtime.get(digest)

    def over_budget(self, p: Principal) -> str | None:
        """Which budget (day or month) the token has used up, if any."""
        if p.budget_usd_day is None and p.budget_usd_month is None:
            return None
        day, month = self._spent.get(p.token, (0.0, 0.0))
        if p.budget_usd_day is not None and day >= p.budget_usd_day:
            return "daily"
        if p.budget_usd_month is not None and month >= p.budget_usd_month:
            return "monthly"
        return None

    async def spent(self, token: str, usd: float) -> None:
        """Counted here at once (this replica refuses an exhausted token from now on);
        added to the shared store with whatever else is spent within SHARE_DELAY."""
        if usd <= 0:
            return
        day, month = self._spent.get(token, (0.0, 0.0))
        self._spent[token] = (day + usd, month + usd)
        self._unshared[token] = self._unshared.get(token, 0.0) + usd
        if self._sharing is None:
            self._sharing = asyncio.get_running_loop().create_task(self._share_soon())

    async def _share_soon(self) -> None:
        try:
            await asyncio.sleep(SHARE_DELAY)
            await self.share()
        finally:
            self._sharing = None

    async def share(self) -> None:
        """Add what was spent here since the last share to the store, in one call."""
        pending, self._unshared = self._unshared, {}
        if not pending:
            return
        try:
            await self.store.add_spend(pending, *periods())
        except Exception as exc:  # counted locally; shared with the next batch
            log.warning("token spend not shared (%s)", type(exc).__name__)
            for token, usd in pending.items():
                self._unshared[token] = self._unshared.get(token, 0.0) + usd

    def reconfigure(self, secret: str, configured: Mapping[str, Principal]) -> None:
        self._secret = secret.encode()
        self._configured = {bytes.fromhex(h): p for h, p in configured.items()}
        self._names = {p.token for p in configured.values()}

    async def refresh(self) -> None:
        try:
            specs = await self.store.all()
            spend = await self.store.spend(*periods())
        except Exception as exc:
            log.warning(
                "token refresh failed (%s); keeping the last known tokens", type(exc).__name__
            )
            return
        self._runtime = {bytes.fromhex(s.key_hash): s.principal() for s in specs.values()}
        # Shared figures win; a local figure higher than them has not been shared yet.
        self._spent = {
            t: (
                max(d, self._spent.get(t, (0.0, 0.0))[0]),
                max(m, self._spent.get(t, (0.0, 0.0))[1]),
            )
            for t, (d, m) in spend.items()
        } | {t: v for t, v in self._spent.items() if t not in spend}

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_seconds)
            await self.refresh()

    async def aclose(self) -> None:
        if self._task is not None:
            await background.stop(self._task)
        if self._sharing is not None:
            await background.stop(self._sharing)
        await self.share()
        await self.store.aclose()

    # Admin operations -----------------------------------------------------------------

    async def create(self, spec: TokenSpec) -> tuple[TokenSpec, str]:
        existing = await self.store.all()
        if spec.name in existing or spec.name in self._names:
            raise ValueError(f"a token named {spec.name!r} exists already")
        key = new_key()
        stored = replace(spec, key_hash=hash_key(self._secret.decode(), key))
        await self.store.put(stored)
        await self.refresh()
        return stored, key

    async def rotate(self, name: str) -> tuple[TokenSpec, str] | None:
        spec = (await self.store.all()).get(name)
        if spec is None:
            return None
        key = new_key()
        stored = replace(spec, key_hash=hash_key(self._secret.decode(), key))
        await self.store.put(stored)
        await self.refresh()
        return stored, key

    async def revoke(self, name: str) -> bool:
        gone = await self.store.delete(name)
        await self.refresh()
        return gone

    async def list(self) -> list[TokenSpec]:
        return sorted((await self.store.all()).values(), key=lambda s: s.name)
