"""What routing needs from shared state, and the process-local parts every back-end shares.

A back-end keeps, per cache domain, which block hashes are live (the pin index), per
account the sliding-window use of its limits and its in-flight count, and per block a
recent request rate (to spot hot prefixes). ``snapshot`` reads what one decision needs in
one round trip; ``begin``/``end`` bracket one upstream attempt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

from affinity.fingerprint import Fingerprint
from affinity.types import AccountLoad, AccountSpec, Demand, Snapshot
from affinity.types import Outcome as Outcome  # re-exported: the middlewares build it from here

# A rate-limit header without a reset time is trusted this long.
HEADER_DEFAULT_TTL = 1.0


class AffinityState(Protocol):
    def now(self) -> float:
        """The clock the back-end keeps its times in (wall clock when shared)."""
        ...

    async def snapshot(
        self,
        accounts: Sequence[AccountSpec],
        fp: Fingerprint,
        now: float,
        *,
        order: Sequence[AccountSpec] | None = None,
        read_more: int = 0,
    ) -> Snapshot:
        """What one decision needs. ``order`` is the pool in the order the decision will
        look at it (None: all alike); a back-end may read only its head (and the accounts
        holding a live match), and then says so with ``Snapshot.partial``. ``read_more``
        counts the reads of this decision that left no account with headroom: each asks
        for a longer head, as far as the whole pool."""
        ...

    async def begin(
        self,
        account: AccountSpec,
        fp: Fingerprint,
        demand: Demand,
        now: float,
        *,
        ttl_seconds: float | None = None,
    ) -> None: ...

    async def end(
        self, account: AccountSpec, fp: Fingerprint, result: Outcome, now: float
    ) -> None: ...

    def observe_headers(
        self,
        account: AccountSpec,
        remaining_requests: int | None,
        remaining_tokens: int | None,
        reset_seconds: float | None,
        now: float,
    ) -> None: ...

    def pin_count(self) -> int: ...

    def last_load(self, name: str) -> AccountLoad | None:
        """One account's window use as last read (None: never), for gauges at scrape time."""
        ...

    async def aclose(self) -> None: ...


def counted_input(account: AccountSpec, input_tokens: int, cached_tokens: int) -> int:
    """Input tokens as the account's provider counts them against input TPM."""
    if account.itpm_counts_cached:
        return input_tokens
    return max(0, input_tokens - cached_tokens)


def should_unpin(fp: Fingerprint, result: Outcome) -> bool:
    """We expected a cache hit the provider did not have, and it did not write one either.

    A reported cache write means the provider holds the prefix again, so the pins are
    right as they stand.
    """
    if not result.ok or result.cached_tokens or result.cache_write_tokens:
        return False
    return fp.pin_from < len(fp.tokens) and result.expected_cached_tokens >= fp.tokens[fp.pin_from]


class Admitted(NamedTuple):
    """What begin() counted in the windows, so end() can swap it for the real figures."""

    input_tokens: int
    output_tokens: int
    at: float
    ticket: str = ""  # names the request in shared in-flight sets


class Ledger:
    """This process's admitted requests, by (account, request).

    begin and end always run in the same process, so this stays local even when the
    windows are shared; identical concurrent requests are interchangeable.
    """

    __slots__ = ("_open",)

    def __init__(self) -> None:
        self._open: dict[tuple[str, int], list[Admitted]] = {}

    def push(self, account: str, fp: Fingerprint, admitted: Admitted) -> None:
        self._open.setdefault((account, fp.full), []).append(admitted)

    def pop(self, account: str, fp: Fingerprint) -> Admitted | None:
        key = (account, fp.full)
        entries = self._open.get(key)
        if not entries:
            return None
        admitted = entries.pop()
        if not entries:
            del self._open[key]
        return admitted


class HeaderReading(NamedTuple):
    remaining_requests: int | None
    remaining_tokens: int | None
    until: float


class HeaderBook:
    """The latest rate-limit headers per account, valid until their reset time.

    Kept per process: each replica learns from the responses it relays.
    """

    __slots__ = ("_readings",)

    def __init__(self) -> None:
        self._readings: dict[str, HeaderReading] = {}

    def observe(
        self,
        account: str,
        remaining_requests: int | None,
        remaining_tokens: int | None,
        reset_seconds: float | None,
        now: float,
    ) -> None:
        if remaining_requests is None and remaining_tokens is None:
            return
        ttl = reset_seconds if reset_seconds is not None else HEADER_DEFAULT_TTL
        self._readings[account] = HeaderReading(remaining_requests, remaining_tokens, now + ttl)

    def __bool__(self) -> bool:
        return bool(self._readings)

    def get(self, account: str, now: float) -> HeaderReading | None:
        reading = self._readings.get(account)
        if reading is None:
            return None
        if reading.until <= now:
            del self._readings[account]
            return None
        return reading
