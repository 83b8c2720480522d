"""Affinity state shared by gateway replicas through Redis, with an in-process fallback.

Each call is one pipelined round trip of Lua scripts (see affinity.redis_scripts).
Keys carry hash tags so each script's keys share one slot: a request's pins are tagged
with its root block, an account's window with the account; replicas agree on time by
using the wall clock.

A begin or an end is queued, not awaited: the writes of all requests go out together on
the next loop iteration (or with the next snapshot), so a request waits for one round
trip, its snapshot. Redis is never on the critical failure path. Every begin/end is
mirrored into an embedded MemoryState, so local pins and windows are warm when Redis
goes away; a timeout or connection error makes the call answer from that local state,
opens a circuit breaker for a short cool-down (no further waiting on a dead server), and
a single probe afterwards closes it again when Redis is back. No Redis exception reaches
the caller.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import struct
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from hiredis import pack_command
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from affinity import redis_scripts
from affinity.breaker import CircuitBreaker
from affinity.fingerprint import Fingerprint
from affinity.memory import WINDOW_BUCKETS, MemoryState
from affinity.state import Admitted, Ledger, counted_input, should_unpin
from affinity.types import AccountLoad, AccountSpec, Demand, Outcome, PoolMemo, Snapshot

log = logging.getLogger(__name__)

T = TypeVar("T")
_Call = tuple[str, Sequence[str], Sequence[Any]]  # script name, keys, arguments
_SCRIPTS = {
    name: getattr(redis_scripts, name)
    for name in (
        "PINS_READ",
        "PINS_BEGIN",
        "PINS_DROP",
        "WINDOW_READ",
        "WINDOW_BEGIN",
        "WINDOW_END",
    )
}
# Recent snapshot matches kept to know a request's expected cache read at begin().
_MATCH_MEMO = 4096
# When the head of the order had no account with headroom, each further read is this many
# times longer than the last (the router bounds how often a read reaches the whole pool).
_READ_MORE = 4


class RedisState:
    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "ag",
        socket_timeout: float = 0.05,
        ttl_seconds: float = 300.0,
        window_seconds: float = 60.0,
        max_pins: int = 1_000_000,
        max_request_seconds: float = 900.0,
        cooldown: float = 2.0,
        read_ahead: int = 32,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """read_ahead: in a larger pool, how many accounts of the decision's order a
        snapshot reads (twice the selector's candidate list: room for accounts without
        headroom); only when none of them has headroom does the router ask for more."""
        self.key_prefix = key_prefix
        self.read_ahead = read_ahead
        self.socket_timeout = socket_timeout
        self.ttl_seconds = ttl_seconds
        self.window_seconds = window_seconds
        self.max_request_seconds = max_request_seconds
        self._clock = clock
        # No socket_timeout for redis-py: with one it wraps every send in asyncio.wait_for,
        # a task of its own and three loop iterations per call (~5 ms under load); each
        # call has one deadline of its own instead (_guarded).
        self._redis: Redis = Redis.from_url(
            url,
            socket_timeout=None,  # said outright: redis-py 8 defaults to 5 s
            socket_connect_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 0),  # the breaker decides about retrying, not the client
        )
        self._shas: dict[str, str] = {}
        self._window_key_memo: dict[str, tuple[str, str]] = {}
        self._domain_memo: PoolMemo[dict[str, list[AccountSpec]]] = PoolMemo()
        self._local = MemoryState(
            ttl_seconds=ttl_seconds, window_seconds=window_seconds, max_pins=max_pins, clock=clock
        )
        self._ledger = Ledger()
        self._read: dict[str, AccountLoad] = {}  # the latest window reading per account
        self._matches: OrderedDict[int, dict[str, int]] = OrderedDict()
        self._replica = uuid.uuid4().hex[:12]
        self._tickets = itertools.count()
        self.breaker = CircuitBreaker(cooldown=cooldown)
        # Writes (begins and ends) not sent yet: they ride on the next snapshot's round
        # trip, or a flush of their own on the next loop iteration; no request waits.
        self._pending: list[_Call] = []
        self._flusher: asyncio.Task[None] | None = None
        self.fallbacks_total = 0  # calls answered from local state
        self.errors_total = 0  # Redis errors and timeouts

    @property
    def circuit_open(self) -> bool:
        return self.breaker.open

    def now(self) -> float:
        return self._clock()

    def pin_count(self) -> int:
        """Pins this replica knows of (counting shared keys would cost a scan)."""
        return self._local.pin_count()

    def last_load(self, name: str) -> AccountLoad | None:
        if self.breaker.open:
            return self._local.last_load(name)
        return self._read.get(name)

    # --- keys -------------------------------------------------------------------------

    def _pin_chain(self, fp: Fingerprint) -> tuple[list[str], str]:
        """The pin scripts' KEYS (the first pin key, whose hash tag the chain shares) and
        their first argument (the chain's block hashes, 16 hex digits each)."""
        hashes = fp.hashes[fp.pin_from :]
        chain = struct.pack(f">{len(hashes)}Q", *hashes).hex()
        first = chain[:16]
        return [f"{self.key_prefix}:{{{first}}}:p:{first}"], chain

    def _pin_keys(self, fp: Fingerprint) -> list[str]:
        """Every pin key of the chain, as the scripts build them."""
        (first,), chain = self._pin_chain(fp)
        prefix = first[:-16]
        return [prefix + chain[i : i + 16] for i in range(0, len(chain), 16)]

    def _window_keys(self, account: str) -> tuple[str, str]:
        keys = self._window_key_memo.get(account)
        if keys is None:  # accounts come from the configuration: the memo stays small
            base = f"{self.key_prefix}:{{a:{account}}}"
            keys = self._window_key_memo[account] = (f"{base}:w", f"{base}:f")
        return keys

    def _window_args(self, now: float) -> tuple[int, int, int]:
        return _ms(now), _ms(self.window_seconds / WINDOW_BUCKETS), WINDOW_BUCKETS + 1

    # --- Redis calls --------------------------------------------------------------------

    async def _load_scripts(self) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for source in _SCRIPTS.values():
            pipe.script_load(source)
        self._shas = dict(zip(_SCRIPTS, await pipe.execute(), strict=True))

    async def _pipeline(self, calls: Sequence[_Call]) -> list[Any]:
        """One round trip of EVALSHAs, after any writes still pending (their replies are
        dropped); scripts are (re)loaded when the server lacks them."""
        if not self._pending:
            return await self._pipeline_now(calls)
        pending, self._pending = self._pending, []
        replies = await self._pipeline_now([*pending, *calls], requeue=pending)
        return replies[len(pending) :]

    async def _pipeline_now(
        self, calls: Sequence[_Call], requeue: Sequence[_Call] = ()
    ) -> list[Any]:
        # One connection from the pool, the commands in one write, the replies read in
        # order. redis-py's Pipeline would do the same with a task of its own for the
        # release (asyncio.shield) and resets around it: loop iterations that cost
        # milliseconds per call on a busy loop.
        if not calls:
            return []
        pool = self._redis.connection_pool
        for attempt in range(2):
            try:
                if not self._shas:
                    await self._load_scripts()
                conn = await pool.get_connection()  # type: ignore[no-untyped-call]
            except asyncio.CancelledError:
                # The caller went away (its client did) before anything left: writes that
                # other requests queued are still due, and wait for the next round trip.
                self._requeue(requeue)
                raise
            # hiredis packs in C what redis-py's encoder packs argument by argument in
            # Python (35 calls: 27 against 204 µs); the arguments are str, bytes and int.
            commands = [
                pack_command(("EVALSHA", self._shas[name], len(keys), *keys, *args))
                for name, keys, args in calls
            ]
            missing = False
            try:
                await conn.send_packed_command(commands, check_health=False)
                replies: list[Any] = []
                for _ in commands:
                    try:
                        replies.append(await conn.read_response())
                    except NoScriptError:  # the server restarted empty; read on
                        missing = True
                        replies.append(None)
            except BaseException:
                await conn.disconnect(nowait=True)  # replies may be left unread on it
                raise
            finally:
                await pool.release(conn)
            if not missing:
                return replies
            if attempt:
                raise NoScriptError("the scripts are missing after a reload")
            self._shas.clear()  # refused unrun: the writes go again after the reload
        raise AssertionError("unreachable")

    async def _guarded(self, call: Callable[[], Awaitable[T]]) -> T | None:
        """The call's result, or None when Redis is unavailable (and the caller falls back)."""
        if not self.breaker.allow():
            self.fallbacks_total += 1
            return None
        try:
            async with asyncio.timeout(self.socket_timeout * 2):
                result = await call()
        except asyncio.CancelledError:
            self.breaker.abandon()
            raise
        except (RedisError, OSError, TimeoutError) as exc:
            self.errors_total += 1
            self.fallbacks_total += 1
            if not self.breaker.open:
                log.warning("redis unavailable, serving affinity from local state: %r", exc)
            self.breaker.failure()
            # Writes still queued would land late, in windows that have moved on: the
            # local mirror has them, and Redis ages out what it missed.
            self._pending.clear()
            return None
        if self.breaker.open:
            log.info("redis is back, affinity state shared again")
        self.breaker.success()
        return result

    # --- the protocol -----------------------------------------------------------------

    async def snapshot(
        self,
        accounts: Sequence[AccountSpec],
        fp: Fingerprint,
        now: float,
        *,
        order: Sequence[AccountSpec] | None = None,
        read_more: int = 0,
    ) -> Snapshot:
        has_pins = fp.pin_from < len(fp.hashes)
        now_ms, bucket_ms, slots = self._window_args(now)
        window_args = (now_ms, bucket_ms, slots)
        # A large pool: the windows of the head of the decision's order only (one script
        # call per account; at a thousand accounts reading them all took 35 ms).
        read = self.read_ahead * _READ_MORE**read_more
        partial = order is not None and len(order) > read
        head = order[:read] if order is not None and partial else accounts
        if partial and has_pins:
            # Holders of the prefix that this replica pinned itself: their windows come in
            # the same round trip. Holders only Redis knows of cost a second one (below).
            known = self._local.root_holders(fp, now)
            if known:
                domains = self._domains(accounts)
                ahead = {a.name for a in head}
                extra = [a for d in known for a in domains.get(d, ()) if a.name not in ahead]
                head = [*head, *extra[:read]]
        calls: list[_Call] = []
        if has_pins:
            keys, chain = self._pin_chain(fp)
            calls.append(("PINS_READ", keys, (chain, now_ms, _ms(self.window_seconds))))
        calls.extend(("WINDOW_READ", self._window_keys(a.name), window_args) for a in head)

        replies = await self._guarded(lambda: self._pipeline(calls))
        if replies is None:
            return self._local.snapshot_now(accounts, fp, now)

        matched: dict[str, int] = {}
        by_domain: dict[str, int] = {}
        root_rate = 0.0
        shared = -1
        if has_pins:
            pins = replies[0]
            root_rate = float(pins[0])  # per rate window, the unit of the account limits
            if int(pins[1]):
                shared = fp.pin_from + int(pins[1]) - 1
            by_domain = {
                _text(pins[j]): fp.tokens[fp.pin_from + int(pins[j + 1]) - 1]
                for j in range(2, len(pins), 2)
                if int(pins[j + 1])
            }
            if by_domain:
                domains = self._domains(accounts)
                matched = {
                    a.name: tokens for d, tokens in by_domain.items() for a in domains.get(d, ())
                }
            self._remember(fp, by_domain)
        windows = replies[1:] if has_pins else replies
        load = {
            account.name: self._load(account.name, window, now)
            for account, window in zip(head, windows, strict=True)
        }
        if partial and matched:
            # Accounts holding the prefix further down the order: read them too (a second
            # round trip, when there are any), so that a live match is never passed over.
            domains = self._domains(accounts)
            held = [a for d in by_domain for a in domains.get(d, ()) if a.name not in load]
            if held:
                more = await self._guarded(
                    lambda: self._pipeline(
                        [("WINDOW_READ", self._window_keys(a.name), window_args) for a in held]
                    )
                )
                if more is None:
                    return self._local.snapshot_now(accounts, fp, now)
                for account, window in zip(held, more, strict=True):
                    load[account.name] = self._load(account.name, window, now)
        self._read.update(load)
        return Snapshot(matched, load, root_rate, shared, self.window_seconds, partial)

    def _domains(self, accounts: Sequence[AccountSpec]) -> dict[str, list[AccountSpec]]:
        """A pool's accounts by cache domain, built once per pool object, not per request
        (at a thousand accounts a pass over the pool is tens of microseconds)."""
        index = self._domain_memo.get(accounts)
        if index is None:
            index = {}
            for account in accounts:
                index.setdefault(account.cache_domain, []).append(account)
            self._domain_memo.put(accounts, index)
        return index

    def _load(self, name: str, window: Sequence[Any], now: float) -> AccountLoad:
        requests, input_tokens, output_tokens, in_flight = (int(v) for v in window)
        reading = self._local.headers.get(name, now)
        if reading is None:
            return AccountLoad(requests, input_tokens, output_tokens, in_flight)
        return AccountLoad(
            requests,
            input_tokens,
            output_tokens,
            in_flight,
            reading.remaining_requests,
            reading.remaining_tokens,
            reading.until - now,
        )

    def _remember(self, fp: Fingerprint, by_domain: dict[str, int]) -> None:
        self._matches[fp.full] = by_domain
        self._matches.move_to_end(fp.full)
        if len(self._matches) > _MATCH_MEMO:
            self._matches.popitem(last=False)

    async def begin(
        self,
        account: AccountSpec,
        fp: Fingerprint,
        demand: Demand,
        now: float,
        *,
        ttl_seconds: float | None = None,
    ) -> None:
        self._local.begin_now(account, fp, demand, now, ttl_seconds=ttl_seconds)
        # The expected cache read is what the snapshot just before this saw.
        expected = self._matches.get(fp.full, {}).get(account.cache_domain, 0)
        input_tokens = counted_input(account, demand.input_tokens, expected)
        ticket = f"{self._replica}:{next(self._tickets)}"
        self._ledger.push(
            account.name, fp, Admitted(input_tokens, demand.output_tokens, now, ticket)
        )
        now_ms, bucket_ms, slots = self._window_args(now)
        deadline_ms = _ms(now + self.max_request_seconds)
        key_ttl_ms = _ms(self.max_request_seconds + 2 * self.window_seconds)
        calls: list[_Call] = [
            (
                "WINDOW_BEGIN",
                self._window_keys(account.name),
                (
                    now_ms,
                    bucket_ms,
                    slots,
                    input_tokens,
                    demand.output_tokens,
                    ticket,
                    deadline_ms,
                    key_ttl_ms,
                ),
            )
        ]
        if fp.pin_from < len(fp.hashes):
            ttl = ttl_seconds if ttl_seconds is not None else (fp.cache_ttl or self.ttl_seconds)
            keys, chain = self._pin_chain(fp)
            args = (chain, now_ms, _ms(self.window_seconds), account.cache_domain, _ms(now + ttl))
            calls.append(("PINS_BEGIN", keys, args))
        self._send_soon(calls)

    async def end(self, account: AccountSpec, fp: Fingerprint, result: Outcome, now: float) -> None:
        """Counted locally at once; sent to Redis like a begin (no request waits for it)."""
        self._local.end_now(account, fp, result, now)
        calls: list[_Call] = []
        admitted = self._ledger.pop(account.name, fp)
        if admitted is not None:
            now_ms, bucket_ms, slots = self._window_args(now)
            real_input = counted_input(account, result.input_tokens, result.cached_tokens)
            args = (
                now_ms,
                bucket_ms,
                slots,
                _ms(admitted.at),
                real_input - admitted.input_tokens,
                result.output_tokens - admitted.output_tokens,
                admitted.ticket,
            )
            calls.append(("WINDOW_END", self._window_keys(account.name), args))
        if should_unpin(fp, result):
            keys, chain = self._pin_chain(fp)
            calls.append(("PINS_DROP", keys, (chain, account.cache_domain)))
        if calls:
            self._send_soon(calls)

    def _send_soon(self, calls: list[_Call]) -> None:
        """Queue writes for the next round trip: the next snapshot's, or a flush started
        now that runs on the next loop iteration (and takes whatever queued meanwhile)."""
        if self.breaker.cooling:  # Redis is away: the local state has it, Redis ages it out
            self.fallbacks_total += 1
            return
        self._pending.extend(calls)
        self._start_flusher()

    def _requeue(self, calls: Sequence[_Call]) -> None:
        """Writes that never left go back to the front of the queue, in their order."""
        if calls:
            self._pending[:0] = calls
            self._start_flusher()

    def _start_flusher(self) -> None:
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_soon())

    async def flush(self) -> None:
        """Send the pending writes now (when no snapshot has taken them)."""
        if self._pending:
            await self._guarded(lambda: self._pipeline([]))

    async def _flush_soon(self) -> None:
        try:
            # Writes queued while a flush is on the wire go in the next one, not with
            # whichever request happens to come next.
            while self._pending and not self.breaker.cooling:
                await self.flush()
        finally:
            self._flusher = None

    def observe_headers(
        self,
        account: AccountSpec,
        remaining_requests: int | None,
        remaining_tokens: int | None,
        reset_seconds: float | None,
        now: float,
    ) -> None:
        self._local.observe_headers(
            account, remaining_requests, remaining_tokens, reset_seconds, now
        )

    async def aclose(self) -> None:
        if self._flusher is not None:
            await self._flusher
        await self.flush()
        try:
            await self._redis.aclose()
        except (RedisError, OSError) as exc:
            log.debug("closing redis: %r", exc)
        await self._local.aclose()


def _ms(seconds: float) -> int:
    return math.floor(seconds * 1000.0)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
