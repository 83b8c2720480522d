"""Per-account health: cooldowns, outlier ejection with a half-open probe, quarantine, and
a hard cap on the requests in flight to each account.

    healthy      takes traffic
    cooldown     the provider answered 429: no traffic until its Retry-After has passed
    ejected      `eject_after` consecutive failures (5xx, connection errors, timeouts):
                 no traffic for a time that doubles with each ejection in a row; once
                 it has passed, ONE probe request at a time until one succeeds
    quarantined  the provider rejected the account's key (401/403): no traffic until
                 the gateway is reconfigured

Never more than `max_ejected_share` of a pool is ejected, and never all of it: when most
of a pool fails, spreading the load over every account (panic mode) beats concentrating
it on the last survivors.

Local to each process on purpose: every replica sees its own failures first-hand, and
a stale shared verdict would be worse than a few extra attempts.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)


class Admission(enum.IntEnum):
    """What `Health.acquire` granted; falsy when the account must be skipped."""

    REFUSED = 0
    ADMITTED = 1
    PROBE = 2  # the one request allowed to an account whose ejection has expired


@dataclass(slots=True)
class _AccountHealth:
    failures: int = 0  # consecutive
    ejections: int = 0  # consecutive ejections, for the growing back-off
    until: float = 0.0  # unavailable until this monotonic time
    state: str = "healthy"  # healthy | cooldown | ejected | quarantined
    probing: bool = False  # a probe request is in flight
    in_flight: int = 0  # admitted attempts not yet released
    alerts: int = 0  # quarantine alerts raised


class Health:
    def __init__(
        self,
        pools: Mapping[str, Sequence[str]],
        *,
        eject_after: int = 5,
        base_ejection: float = 10.0,
        max_ejection: float = 300.0,
        max_ejected_share: float = 0.5,
        default_cooldown: float = 1.0,
        max_cooldown: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._accounts = {name: _AccountHealth() for members in pools.values() for name in members}
        # Accounts not in the "healthy" state: while there are none, routing skips the
        # per-account availability check.
        self.troubled: set[str] = set()
        self._pools = {pool: tuple(members) for pool, members in pools.items()}
        self._pool_of: dict[str, list[str]] = {}
        for pool, members in self._pools.items():
            for name in members:
                self._pool_of.setdefault(name, []).append(pool)
        self.eject_after = eject_after
        self.base_ejection = base_ejection
        self.max_ejection = max_ejection
        self.max_ejected_share = max_ejected_share
        self.default_cooldown = default_cooldown
        self.max_cooldown = max_cooldown
        self.clock = clock

    def adopt(self, previous: Health) -> None:
        """After a reload: accounts that remain keep their state (a cooling or ejected
        account stays so); new ones start healthy."""
        for name in self._accounts:
            if name in previous._accounts:
                self._accounts[name] = previous._accounts[name]
        self.troubled = {n for n, h in self._accounts.items() if h.state != "healthy"}

    # --- read side: routing and metrics --------------------------------------------------

    def available(self, name: str) -> bool:
        """May the router consider this account? (A hint: `acquire` has the last word.)"""
        h = self._accounts[name]
        if h.state == "healthy":
            return True
        if h.state == "quarantined" or self.clock() < h.until:
            return False
        return not h.probing  # an expired ejection takes one probe at a time

    def state(self, name: str) -> str:
        h = self._accounts[name]
        if h.state == "cooldown" and self.clock() >= h.until:
            return "healthy"
        return h.state  # an ejected account stays ejected until a probe succeeds

    def retry_in(self, names: Iterable[str]) -> float | None:
        """Seconds until the first of these accounts that is waiting out a cooldown or an
        ejection takes traffic again; None when none of them is waiting."""
        now = self.clock()
        waits = [
            h.until - now
            for h in map(self._accounts.__getitem__, names)
            if h.state in ("cooldown", "ejected") and h.until > now
        ]
        return min(waits, default=None)

    def in_flight(self, name: str) -> int:
        return self._accounts[name].in_flight

    def alerts(self, name: str) -> int:
        """Quarantine alerts raised for this account (for a counter exported at scrape time)."""
        return self._accounts[name].alerts

    # --- one attempt: acquire, then succeeded / failed, then release ------------------------

    def acquire(self, name: str, limit: int | None = None) -> Admission:
        """Admit one attempt now, or refuse at once: never a queue.

        `limit` is the account's concurrency cap. The router only ever sees a snapshot,
        so two requests may both pick the last free slot; this is where one of them
        learns it has to skip the account.
        """
        h = self._accounts[name]
        if limit is not None and h.in_flight >= limit:
            return Admission.REFUSED
        admission = Admission.ADMITTED
        if h.state != "healthy":
            if h.state == "quarantined" or self.clock() < h.until:
                return Admission.REFUSED
            if h.state == "cooldown":
                self._set(name, h, "healthy")  # the provider's wait is over; a 429 is no sickness
            elif h.probing:
                return Admission.REFUSED
            else:
                h.probing = True
                admission = Admission.PROBE
        h.in_flight += 1
        return admission

    def release(self, name: str, admission: Admission) -> None:
        """The attempt is over, with or without a verdict (a cancelled probe frees the slot
        for the next one)."""
        h = self._accounts[name]
        h.in_flight -= 1
        if admission is Admission.PROBE:
            h.probing = False

    def succeeded(self, name: str) -> None:
        h = self._accounts[name]
        h.failures = 0
        if h.state in ("quarantined", "cooldown"):
            return  # an answer that started before the verdict does not lift it
        if h.state == "ejected":
            log.info("account %s is healthy again", name)
            self._set(name, h, "healthy")
        h.ejections = 0

    def failed(self, name: str, status: int, retry_after: float | None) -> None:
        """Record a failed attempt. `status` is the provider's, or 0 for a connection error
        or a timeout."""
        h = self._accounts[name]
        now = self.clock()
        if status in (401, 403):
            if h.state != "quarantined":
                h.alerts += 1
                log.error(
                    "ALERT account %s: the provider rejected its credentials (%s);"
                    " quarantined until reconfigured",
                    name,
                    status,
                )
            self._set(name, h, "quarantined")
            return
        if h.state == "quarantined":
            return
        if status == 429:
            # The provider says how long; that is a cooldown, not a sign of sickness.
            wait = self.default_cooldown if retry_after is None else retry_after
            self._set(name, h, "cooldown")
            h.until = max(h.until, now + min(max(wait, 0.0), self.max_cooldown))
            return
        if status and status < 500:
            # The account answered (the request was at fault): the failure streak is over.
            self.succeeded(name)
            return
        h.failures += 1
        if h.state == "ejected":
            if now >= h.until:  # the probe failed: out again, for longer
                self._eject(name, h, now)
            return
        if h.failures >= self.eject_after and self._may_eject(name):
            self._eject(name, h, now)

    def _eject(self, name: str, h: _AccountHealth, now: float) -> None:
        h.ejections += 1
        h.failures = 0
        self._set(name, h, "ejected")
        h.until = now + min(self.max_ejection, self.base_ejection * 2 ** (h.ejections - 1))
        log.warning("account %s ejected for %.0f s", name, h.until - now)

    def _set(self, name: str, h: _AccountHealth, state: str) -> None:
        h.state = state
        if state == "healthy":
            self.troubled.discard(name)
        else:
            self.troubled.add(name)

    def _may_eject(self, name: str) -> bool:
        """Never eject past the share of any pool the account is in (panic threshold)."""
        for pool in self._pool_of.get(name, ()):
            members = self._pools[pool]
            down = sum(1 for m in members if not self.available(m))
            if (down + 1) > self.max_ejected_share * len(members) or down + 1 >= len(members):
                return False
        return True
