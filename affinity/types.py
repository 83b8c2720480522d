"""Value types shared by the affinity core: accounts, demands, outcomes and state snapshots."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, NamedTuple, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Limits:
    """Provider limits of one account; None means the provider sets no such limit."""

    rpm: int | None = None
    itpm: int | None = None
    otpm: int | None = None
    concurrency: int | None = None


@dataclass(frozen=True, slots=True)
class AccountSpec:
    name: str
    # Accounts sharing one provider organisation share its prompt cache; "" means the name.
    cache_domain: str = ""
    weight: float = 1.0
    limits: Limits = Limits()
    # Anthropic does not count cache reads against input TPM; most others do.
    itpm_counts_cached: bool = True
    # The name as bytes, hashed for every account of the pool on every decision.
    name_bytes: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.cache_domain:
            object.__setattr__(self, "cache_domain", self.name)
        object.__setattr__(self, "name_bytes", self.name.encode())


@dataclass(frozen=True, slots=True)
class Demand:
    """What one request is expected to cost, for admission against the windows."""

    input_tokens: int
    output_tokens: int


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the provider reported for one admitted request."""

    ok: bool
    input_tokens: int  # whole prompt: uncached + cache read + cache write
    cached_tokens: int
    cache_write_tokens: int
    output_tokens: int
    expected_cached_tokens: int  # 0 when the caller expected no hit or cannot tell


class AccountLoad(NamedTuple):
    """One account's use of its sliding window, plus what its provider last told us.

    A named tuple rather than a frozen dataclass: one is built per account a decision
    reads, and a frozen dataclass costs several times more to build.
    """

    requests: float = 0.0
    input_tokens: float = 0.0  # as counted against input TPM (uncached only where applicable)
    output_tokens: float = 0.0
    in_flight: int = 0
    # From rate-limit headers, while their reset time has not passed.
    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    reset_in: float = 0.0


IDLE = AccountLoad()


class Loads(Mapping[str, AccountLoad]):
    """Window use per account, for back-ends that read an account only when asked.

    A decision reads the loads of its few candidates and one pool-wide sum, so a
    back-end whose windows are in process need not build a load for every account.
    """

    __slots__ = ()

    @abstractmethod
    def input_total(self, accounts: Iterable[AccountSpec]) -> float:
        """Window input tokens summed over ``accounts``, without building their loads."""


def input_total(load: Mapping[str, AccountLoad], accounts: Iterable[AccountSpec]) -> float:
    """Window input tokens summed over ``accounts``, whatever mapping holds the loads."""
    if isinstance(load, Loads):
        return load.input_total(accounts)
    return sum(load.get(a.name, IDLE).input_tokens for a in accounts)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything selection needs from shared state, read in one round trip."""

    matched: Mapping[str, int]  # account name -> live matched tokens; absent means none
    load: Mapping[str, AccountLoad]  # account name -> window use; absent means idle
    # Requests through the root block per rate window (per minute with the default 60 s
    # window): the unit the account limits are counted in.
    root_rate: float = 0.0
    # Deepest block index still carrying at least half of the root's traffic: the end of the
    # shared (hot) prefix; the block after it is the conversation's own. -1 when unknown.
    shared_index: int = -1
    window_seconds: float = 60.0
    # True when ``load`` covers only some of the pool (a shared back-end read the first
    # accounts of the decision's order and the live-match holders): the rest are unknown,
    # not idle, and are left out of the decision.
    partial: bool = False


class PoolMemo(Generic[T]):
    """A value per pool object, by identity: the pinning middleware prepares one tuple per
    pool and the router passes it as is, and a pool is never changed in place. Each entry
    holds its pool, so an id is not reused while it is kept; a caller that builds its pool
    per call only fills the memo, which then starts again."""

    __slots__ = ("_entries", "_size")

    def __init__(self, size: int = 64) -> None:
        self._size = size
        self._entries: dict[int, tuple[Sequence[AccountSpec], T]] = {}

    def get(self, pool: Sequence[AccountSpec]) -> T | None:
        entry = self._entries.get(id(pool))
        return entry[1] if entry is not None and entry[0] is pool else None

    def put(self, pool: Sequence[AccountSpec], value: T) -> None:
        if len(self._entries) >= self._size:
            self._entries.clear()
        self._entries[id(pool)] = (pool, value)
