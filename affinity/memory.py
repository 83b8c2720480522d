"""In-process affinity state: the default, and Redis's fallback.

Pins: one bounded LRU keyed by block hash, each entry mapping cache domains to the
time the provider's copy expires (sliding: every admitted request pushes it out), plus
an exponentially decayed request rate through that block. A request pins every block
from its first cacheable one, deepest first, so along one chain a shallower block is
never less live, less busy or less recently used than a deeper one; that is what lets
lookups binary-search a chain instead of walking it.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence

from affinity.fingerprint import Fingerprint
from affinity.state import Admitted, HeaderBook, Ledger, counted_input, should_unpin
from affinity.types import IDLE, AccountLoad, AccountSpec, Demand, Loads, Outcome, Snapshot
from affinity.window import SlidingWindow

WINDOW_BUCKETS = 30
_PURGE_PER_REQUEST = 8


class _Pins:
    """The pin index: for each block hash, the cache domain it was first pinned in and
    that copy's expiry, its decayed request rate and the rate's time; further domains
    (rare) in a small dict of their own. ``expires`` is ordered least recently used first.

    Plain numbers and strings in dicts, not an object per block: the plain dicts are never
    tracked by the garbage collector and the ordered one holds no object it must walk (a
    full collection over a million pins: 50 ms, against 159 ms with an object per pin).
    """

    __slots__ = ("domain", "expires", "others", "rate", "rate_at")

    def __init__(self) -> None:
        self.expires: OrderedDict[int, float] = OrderedDict()  # a plain dict's iteration
        # slows down over the holes that moving keys to its end leaves
        self.domain: dict[int, str] = {}
        self.rate: dict[int, float] = {}  # decayed request count, as of rate_at
        self.rate_at: dict[int, float] = {}
        self.others: dict[int, dict[str, float]] = {}

    def __len__(self) -> int:
        return len(self.expires)

    def expiry(self, key: int, domain: str) -> float:
        first = self.domain.get(key)
        if first is None:
            return 0.0
        if first == domain:
            return self.expires[key]
        others = self.others.get(key)
        return others.get(domain, 0.0) if others else 0.0

    def live(self, key: int, now: float) -> dict[str, float]:
        first = self.domain.get(key)
        if first is None:
            return {}
        expires = self.expires[key]
        domains = {first: expires} if expires > now else {}
        others = self.others.get(key)
        if others:
            domains.update((d, e) for d, e in others.items() if e > now)
        return domains

    def expired(self, key: int, now: float) -> bool:
        if self.expires[key] > now:
            return False
        others = self.others.get(key)
        return not (others and any(e > now for e in others.values()))

    def extend_other(self, key: int, domain: str, expires: float) -> None:
        others = self.others.get(key)
        if others is None:
            self.others[key] = {domain: expires}
        elif others.get(domain, 0.0) < expires:
            others[domain] = expires

    def drop(self, key: int, domain: str) -> None:
        first = self.domain.get(key)
        if first is None:
            return
        if first == domain:
            self.expires[key] = 0.0
        else:
            others = self.others.get(key)
            if others:
                others.pop(domain, None)

    def pop_oldest(self) -> None:
        key, _ = self.expires.popitem(last=False)
        del self.domain[key], self.rate[key], self.rate_at[key]
        self.others.pop(key, None)

    def oldest(self) -> int | None:
        return next(iter(self.expires), None)

    def clear(self) -> None:
        for d in (self.expires, self.domain, self.rate, self.rate_at, self.others):
            d.clear()


class MemoryState:
    def __init__(
        self,
        *,
        ttl_seconds: float = 300.0,
        window_seconds: float = 60.0,
        max_pins: int = 1_000_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_seconds = ttl_seconds
        self.window_seconds = window_seconds
        self.max_pins = max_pins
        self._clock = clock
        self._pins = _Pins()
        self._windows: dict[str, SlidingWindow] = {}
        self._in_flight: dict[str, int] = {}
        self._ledger = Ledger()
        self.headers = HeaderBook()  # rate-limit headers seen by this process

    def now(self) -> float:
        return self._clock()

    def pin_count(self) -> int:
        return len(self._pins)

    def last_load(self, name: str) -> AccountLoad | None:
        return self.load_now(name, self.now())  # in process, reading it is cheap

    # --- pins -------------------------------------------------------------------------

    def _live(self, fp: Fingerprint, index: int, domain: str, now: float) -> bool:
        return self._pins.expiry(fp.hashes[index], domain) > now

    def _deepest_live(self, fp: Fingerprint, domain: str, now: float) -> int:
        """Index of the deepest block live in ``domain``, or -1."""
        lo, hi = fp.pin_from, len(fp.hashes) - 1
        if lo > hi or not self._live(fp, lo, domain, now):
            return -1
        while lo < hi:
            mid = (lo + hi + 1) >> 1
            if self._live(fp, mid, domain, now):
                lo = mid
            else:
                hi = mid - 1
        return lo

    def root_holders(self, fp: Fingerprint, now: float) -> dict[str, float]:
        """Cache domains with a live pin on the prompt's first pinned block (its root)."""
        if fp.pin_from >= len(fp.hashes):
            return {}
        return self._pins.live(fp.hashes[fp.pin_from], now)

    def match(self, fp: Fingerprint, domain: str, now: float) -> int:
        """Tokens of ``fp`` the provider should still hold in ``domain``'s cache."""
        index = self._deepest_live(fp, domain, now)
        return fp.tokens[index] if index >= 0 else 0

    def _rate(self, key: int, now: float) -> float:
        rate = self._pins.rate.get(key)
        if rate is None:
            return 0.0
        return rate * math.exp((self._pins.rate_at[key] - now) / self.window_seconds)

    def _rate_at(self, fp: Fingerprint, index: int, now: float) -> float:
        return self._rate(fp.hashes[index], now)

    def _shared_index(self, fp: Fingerprint, root_rate: float, now: float) -> int:
        """Deepest block still carrying half the root's traffic: the end of the shared part."""
        lo, hi = fp.pin_from, len(fp.hashes) - 1
        floor = root_rate / 2.0
        while lo < hi:
            mid = (lo + hi + 1) >> 1
            if self._rate_at(fp, mid, now) >= floor:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _pin(self, fp: Fingerprint, domain: str, expires: float, now: float) -> None:
        pins = self._pins
        expiry, first_domain, rates, rates_at = pins.expires, pins.domain, pins.rate, pins.rate_at
        decay_window = self.window_seconds
        exp = math.exp
        for index in range(len(fp.hashes) - 1, fp.pin_from - 1, -1):
            key = fp.hashes[index]
            first = first_domain.get(key)
            if first is None:
                first_domain[key] = domain
                expiry[key] = expires
                rates[key] = 1.0
            else:
                expiry.move_to_end(key)
                if first != domain:
                    pins.extend_other(key, domain, expires)
                elif expires > expiry[key]:
                    expiry[key] = expires
                rates[key] = rates[key] * exp((rates_at[key] - now) / decay_window) + 1.0
            rates_at[key] = now
        while len(pins) > self.max_pins:
            pins.pop_oldest()
        # The least recently used pins are, TTLs being alike, the first to expire: dropping
        # a few expired ones per request keeps memory in line with what is live.
        for _ in range(_PURGE_PER_REQUEST):
            oldest = pins.oldest()
            if oldest is None or not pins.expired(oldest, now):
                break
            pins.pop_oldest()

    def _unpin(self, fp: Fingerprint, domain: str) -> None:
        for index in range(fp.pin_from, len(fp.hashes)):
            self._pins.drop(fp.hashes[index], domain)

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
        return self.snapshot_now(accounts, fp, now)  # reads each account when asked: whole

    def snapshot_now(
        self, accounts: Sequence[AccountSpec], fp: Fingerprint, now: float
    ) -> Snapshot:
        matched: dict[str, int] = {}
        root_rate = 0.0
        shared = -1
        if fp.pin_from < len(fp.hashes):
            root = fp.hashes[fp.pin_from]
            if root in self._pins.domain:
                by_domain = {
                    domain: tokens
                    for domain in self._pins.live(root, now)
                    if (tokens := self.match(fp, domain, now))
                }
                if by_domain:
                    matched = {
                        a.name: by_domain[a.cache_domain]
                        for a in accounts
                        if a.cache_domain in by_domain
                    }
                # Requests per rate window: the unit the account limits are counted in
                # (per minute in production; a time-compressed replay scales both alike).
                root_rate = self._rate(root, now)
                shared = self._shared_index(fp, root_rate, now)
        load = _WindowLoads(self, accounts, now)
        return Snapshot(
            matched=matched,
            load=load,
            root_rate=root_rate,
            shared_index=shared,
            window_seconds=self.window_seconds,
        )

    def load_now(self, name: str, now: float) -> AccountLoad:
        """One account's window use and latest rate-limit headers."""
        window = self._windows.get(name)
        in_flight = self._in_flight.get(name, 0)
        if window is None:
            load = AccountLoad(0, 0, 0, in_flight) if in_flight else IDLE
        else:
            requests, input_tokens, output_tokens = window.totals(now)
            load = AccountLoad(requests, input_tokens, output_tokens, in_flight)
        if self.headers:
            reading = self.headers.get(name, now)
            if reading is not None:
                load = load._replace(
                    remaining_requests=reading.remaining_requests,
                    remaining_tokens=reading.remaining_tokens,
                    reset_in=reading.until - now,
                )
        return load

    def input_total_now(self, accounts: Iterable[AccountSpec], now: float) -> float:
        windows = self._windows
        total = 0
        for account in accounts:
            window = windows.get(account.name)
            if window is not None:
                total += window.totals(now)[1]
        return total

    def _window(self, name: str) -> SlidingWindow:
        window = self._windows.get(name)
        if window is None:
            window = self._windows[name] = SlidingWindow(self.window_seconds, WINDOW_BUCKETS)
        return window

    async def begin(
        self,
        account: AccountSpec,
        fp: Fingerprint,
        demand: Demand,
        now: float,
        *,
        ttl_seconds: float | None = None,
    ) -> None:
        self.begin_now(account, fp, demand, now, ttl_seconds=ttl_seconds)

    def begin_now(
        self,
        account: AccountSpec,
        fp: Fingerprint,
        demand: Demand,
        now: float,
        *,
        ttl_seconds: float | None = None,
    ) -> None:
        domain = account.cache_domain
        expected = 0 if account.itpm_counts_cached else self.match(fp, domain, now)
        input_tokens = counted_input(account, demand.input_tokens, expected)
        self._window(account.name).add(now, 1, input_tokens, demand.output_tokens)
        self._in_flight[account.name] = self._in_flight.get(account.name, 0) + 1
        self._ledger.push(account.name, fp, Admitted(input_tokens, demand.output_tokens, now))
        ttl = ttl_seconds if ttl_seconds is not None else (fp.cache_ttl or self.ttl_seconds)
        self._pin(fp, domain, now + ttl, now)

    async def end(self, account: AccountSpec, fp: Fingerprint, result: Outcome, now: float) -> None:
        self.end_now(account, fp, result, now)

    def end_now(self, account: AccountSpec, fp: Fingerprint, result: Outcome, now: float) -> None:
        admitted = self._ledger.pop(account.name, fp)
        if admitted is not None:
            self._in_flight[account.name] = max(0, self._in_flight.get(account.name, 0) - 1)
            real_input = counted_input(account, result.input_tokens, result.cached_tokens)
            self._window(account.name).adjust(
                admitted.at,
                now,
                real_input - admitted.input_tokens,
                result.output_tokens - admitted.output_tokens,
            )
        if should_unpin(fp, result):
            self._unpin(fp, account.cache_domain)

    def observe_headers(
        self,
        account: AccountSpec,
        remaining_requests: int | None,
        remaining_tokens: int | None,
        reset_seconds: float | None,
        now: float,
    ) -> None:
        self.headers.observe(account.name, remaining_requests, remaining_tokens, reset_seconds, now)

    async def aclose(self) -> None:
        self._pins.clear()


class _WindowLoads(Loads):
    """The pool's loads as of one decision, each account read on first access.

    A decision reads a handful of accounts (its candidates and any live-match holders)
    and one pool-wide input total, so a pool of a thousand accounts costs no more than
    one of ten. Any account name can be read (an account never seen is idle); iteration
    covers the pool the snapshot was taken for.
    """

    __slots__ = ("_accounts", "_now", "_read", "_state")

    def __init__(self, state: MemoryState, accounts: Sequence[AccountSpec], now: float) -> None:
        self._state = state
        self._accounts = accounts
        self._now = now
        self._read: dict[str, AccountLoad] = {}

    def __getitem__(self, name: str) -> AccountLoad:
        load = self._read.get(name)
        if load is None:
            load = self._read[name] = self._state.load_now(name, self._now)
        return load

    def __iter__(self) -> Iterator[str]:
        return (account.name for account in self._accounts)

    def __len__(self) -> int:
        return len(self._accounts)

    def input_total(self, accounts: Iterable[AccountSpec]) -> float:
        return self._state.input_total_now(accounts, self._now)
