"""Per-account health: cooldowns, outlier ejection with growing back-off, quarantine.

Local to each process on purpose: every replica sees its own failures first-hand, and
a stale shared verdict would be worse than a few extra attempts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _AccountHealth:
    failures: int = 0  # consecutive
    ejections: int = 0  # consecutive ejections, for the growing back-off
    until: float = 0.0  # unavailable until this monotonic time
    state: str = "healthy"  # healthy | cooldown | ejected | quarantined


class Health:
    def __init__(
        self,
        pools: Mapping[str, Sequence[str]],
        *,
        eject_after: int = 5,
        base_ejection: float = 10.0,
        max_ejection: float = 300.0,
        max_ejected_share: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._accounts = {name: _AccountHealth() for members in pools.values() for name in members}
        self._pools = {pool: tuple(members) for pool, members in pools.items()}
        self._pool_of: dict[str, list[str]] = {}
        for pool, members in self._pools.items():
            for name in members:
                self._pool_of.setdefault(name, []).append(pool)
        self.eject_after = eject_after
        self.base_ejection = base_ejection
        self.max_ejection = max_ejection
        self.max_ejected_share = max_ejected_share
        self.clock = clock

    def available(self, name: str) -> bool:
        h = self._accounts[name]
        if h.state == "healthy":
            return True
        if h.state == "quarantined":
            return False
        return self.clock() >= h.until  # past it: half-open, the next try decides

    def state(self, name: str) -> str:
        h = self._accounts[name]
        if h.state in ("cooldown", "ejected") and self.clock() >= h.until:
            return "healthy"
        return h.state

    def succeeded(self, name: str) -> None:
        h = self._accounts[name]
        if h.state != "healthy":
            log.info("account %s is healthy again", name)
        h.failures = h.ejections = 0
        h.state = "healthy"

    def failed(self, name: str, status: int, retry_after: float | None) -> None:
        h = self._accounts[name]
        now = self.clock()
        if status in (401, 403):
            if h.state != "quarantined":
                log.error("account %s answered %s: quarantined until reconfigured", name, status)
            h.state = "quarantined"
            return
        if status == 429:
            # The provider says how long; that is a cooldown, not a sign of sickness.
            h.state = "cooldown"
            h.until = max(h.until, now + (retry_after if retry_after is not None else 1.0))
            return
        if status and status < 500:
            return
        h.failures += 1
        if h.failures >= self.eject_after and self._may_eject(name):
            h.ejections += 1
            h.failures = 0
            h.state = "ejected"
            h.until = now + min(self.max_ejection, self.base_ejection * 2 ** (h.ejections - 1))
            log.warning("account %s ejected for %.0f s", name, h.until - now)

    def _may_eject(self, name: str) -> bool:
        """Never eject past the share of any pool the account is in (panic threshold)."""
        for pool in self._pool_of.get(name, ()):
            members = self._pools[pool]
            down = sum(1 for m in members if not self.available(m))
            if (down + 1) > self.max_ejected_share * len(members) or down + 1 >= len(members):
                return False
        return True
