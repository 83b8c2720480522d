"""One object for the middlewares to hold: snapshot, select, and bracket each attempt.

Times come from the state's own clock (wall clock when state is shared by replicas).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

from affinity.fingerprint import Fingerprint
from affinity.select import Choice, Mode, Selector
from affinity.state import AffinityState
from affinity.types import AccountLoad, AccountSpec, Demand, Outcome

# After a read of a whole pool found no account with headroom, that pool's decisions stop
# at the first two (partial) reads for this long: under overload every request would
# otherwise read every account.
WHOLE_READ_EVERY = 0.25
_SATURATED_MEMO = 64  # pools remembered as saturated


class AffinityRouter:
    def __init__(self, state: AffinityState, selector: Selector) -> None:
        self.state = state
        self.selector = selector
        self.decisions: Counter[str] = Counter()  # reason -> count, for metrics
        # id(pool) -> (pool, until when its whole read is skipped); see WHOLE_READ_EVERY.
        self._saturated: dict[int, tuple[Sequence[AccountSpec], float]] = {}

    async def choose(
        self,
        accounts: Sequence[AccountSpec],
        fp: Fingerprint,
        demand: Demand,
        *,
        mode: Mode,
        token: str | None = None,
        healthy: Callable[[AccountSpec], bool] | None = None,
    ) -> Choice:
        # The order first: a shared back-end reads only as far down it as a decision looks.
        order = self.selector.order(accounts, fp, mode=mode, token=token, healthy=healthy)
        # With no headroom among the accounts a partial read found, look four times as far,
        # and so on to the whole pool, before refusing.
        read_more = 0
        while True:
            now = self.state.now()
            snap = await self.state.snapshot(accounts, fp, now, order=order, read_more=read_more)
            choice = self.selector.choose(
                accounts, fp, demand, snap, mode=mode, token=token, healthy=healthy, order=order
            )
            if choice.candidates:
                break
            if not snap.partial:
                if read_more:
                    self._remember_saturated(accounts, now)
                break
            read_more += 1
            if read_more >= 2 and self._known_saturated(accounts, now):
                break
        self.decisions[choice.reason] += 1
        return choice

    def _known_saturated(self, accounts: Sequence[AccountSpec], now: float) -> bool:
        seen = self._saturated.get(id(accounts))
        return seen is not None and seen[0] is accounts and now < seen[1]

    def _remember_saturated(self, accounts: Sequence[AccountSpec], now: float) -> None:
        if len(self._saturated) >= _SATURATED_MEMO:
            self._saturated.clear()
        self._saturated[id(accounts)] = (accounts, now + WHOLE_READ_EVERY)

    async def begin(
        self,
        account: AccountSpec,
        fp: Fingerprint,
        demand: Demand,
        *,
        ttl_seconds: float | None = None,
    ) -> None:
        await self.state.begin(account, fp, demand, self.state.now(), ttl_seconds=ttl_seconds)

    async def end(self, account: AccountSpec, fp: Fingerprint, result: Outcome) -> None:
        await self.state.end(account, fp, result, self.state.now())

    def observe_headers(
        self,
        account: AccountSpec,
        remaining_requests: int | None,
        remaining_tokens: int | None,
        reset_seconds: float | None,
    ) -> None:
        self.state.observe_headers(
            account, remaining_requests, remaining_tokens, reset_seconds, self.state.now()
        )

    def pin_count(self) -> int:
        return self.state.pin_count()

    def last_load(self, name: str) -> AccountLoad | None:
        """An account's window use as last read, for utilisation gauges at scrape time."""
        return self.state.last_load(name)

    async def aclose(self) -> None:
        await self.state.aclose()
