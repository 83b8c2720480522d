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


class AffinityRouter:
    def __init__(self, state: AffinityState, selector: Selector) -> None:
        self.state = state
        self.selector = selector
        self.decisions: Counter[str] = Counter()  # reason -> count, for metrics

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
        # With no headroom among the accounts a partial read found, look further down once
        # before refusing.
        for read_more in (False, True):
            snap = await self.state.snapshot(
                accounts, fp, self.state.now(), order=order, read_more=read_more
            )
            choice = self.selector.choose(
                accounts, fp, demand, snap, mode=mode, token=token, healthy=healthy, order=order
            )
            if choice.candidates or not snap.partial:
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
