"""One object for the middlewares to hold: snapshot, select, and bracket each attempt.

Times come from the state's own clock (wall clock when state is shared by replicas).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

from affinity.fingerprint import Fingerprint
from affinity.select import Choice, Mode, Selector
from affinity.state import AffinityState
from affinity.types import AccountLoad, AccountSpec, Demand, Outcome, PoolMemo

# After a read of a whole pool found no account with headroom, that pool's decisions stop
# at the first two (partial) reads for this long: under overload every request would
# otherwise read every account.
WHOLE_READ_EVERY = 0.25


class AffinityRouter:
    def __init__(self, state: AffinityState, selector: Selector) -> None:
        self.state = state
        self.selector = selector
        self.decisions: Counter[str] = Counter()  # reason -> count, for metrics
        # Per pool: until when its whole read is skipped (see WHOLE_READ_EVERY).
        self._saturated: PoolMemo[float] = PoolMemo()

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
                    self._saturated.put(accounts, now + WHOLE_READ_EVERY)
                break
            read_more += 1
            if read_more >= 2 and now < (self._saturated.get(accounts) or 0.0):
                break
        self.decisions[choice.reason] += 1
        return choice

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
