"""The routing decision: longest live prefix with headroom, else rendezvous on the root.

Pure: everything it knows about the world comes in a Snapshot, so replicas that read
the same state decide the same way, and tests need no back-end.

An account is eligible when its window use plus this request stays within ``alpha`` of
every limit it has (an idle account may take one request up to the full limit, so a
request larger than ``alpha`` of a limit is not refused forever). Among the eligible:

- the longest live match of at least ``min_tokens`` wins (ties: rendezvous order);
- otherwise the root's rendezvous (HRW) order decides, skipping accounts that a new
  prefix would fill past ``(1 - reserve) * alpha`` of a limit, or that already carry
  more than ``balance`` times their weighted share of the pool's window tokens
  (bounded-load consistent hashing: affinity is kept, hot spots are not);
- a hot root - more traffic than ``hot_share`` of one account can take - is spread over
  its top-k rendezvous accounts, each conversation kept on one of them by a second
  hash of its first own block (the block after the part it shares with the crowd).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import xxhash

from affinity.fingerprint import Fingerprint
from affinity.rendezvous import key_of, rank
from affinity.types import IDLE, AccountLoad, AccountSpec, Demand, Limits, Snapshot, input_total

Mode = Literal["prefix", "session", "fixed", "off"]
REASONS = (
    "longest_match",
    "rendezvous",
    "session",
    "fixed",
    "hot_spread",
    "spill_headroom",
    "round_robin",
    "saturated",
)
# With no better estimate, a request slot is expected to free up this soon.
CONCURRENCY_RETRY_SECONDS = 1.0
MIN_RETRY_SECONDS = 0.5


@dataclass(frozen=True, slots=True)
class Choice:
    candidates: tuple[AccountSpec, ...]  # [0] is the pick, then the failover order
    reason: str
    matched_tokens: int  # expected cache read on candidates[0]
    retry_after: float | None  # when saturated: seconds until some account has headroom
    # For providers that route their own cache by a key (OpenAI's prompt_cache_key): the
    # routing key, or for a hot root the conversation's own share of it, so that no one
    # key carries the whole crowd. None when there is no affinity.
    cache_key: int | None = None


class Selector:
    def __init__(
        self,
        *,
        alpha: float = 0.8,
        min_tokens: int = 1024,
        hot_rate_per_account: float | None = None,
        hot_share: float = 0.5,
        balance: float | None = 1.1,
        reserve: float = 0.15,
        max_candidates: int = 16,
    ) -> None:
        """
        hot_rate_per_account: requests per rate window (a minute) of one root that one account
        should take, for accounts whose limits do not say (None: only limits decide).
        hot_share: share of one account's limits a single root may use before spreading.
        balance: bound on an account's window tokens per weight, relative to the pool's
        mean, for placing prefixes no account holds yet (None: no bound).
        reserve: share of alpha that new prefixes leave free on each account.
        max_candidates: accounts with headroom looked for in rendezvous order (the pick,
        then the failover order); accounts holding a live match are always considered.
        """
        self.alpha = alpha
        self.min_tokens = min_tokens
        self.hot_rate_per_account = hot_rate_per_account
        self.hot_share = hot_share
        self.balance = balance
        # New prefixes may fill an account only to this much of its limits: the rest is
        # kept for the conversations it already caches, which would otherwise have to
        # move (and lose their cache) when it fills up.
        self.place_alpha = alpha * (1.0 - reserve)
        self.max_candidates = max_candidates
        self._rr: dict[str, float] = {}  # smooth weighted round-robin credit per account

    def choose(
        self,
        accounts: Sequence[AccountSpec],
        fp: Fingerprint,
        demand: Demand,
        snap: Snapshot,
        *,
        mode: Mode,
        token: str | None = None,
        healthy: Callable[[AccountSpec], bool] | None = None,
        order: list[AccountSpec] | None = None,
    ) -> Choice:
        """Pick the account and the failover order. ``order`` is ``self.order(...)`` for
        the same arguments when the caller already has it (it read the state in it): the
        available pool, ranked, so neither is computed again."""
        if order is not None:
            pool = order
        elif healthy is None:
            pool = list(accounts)
        else:
            pool = [a for a in accounts if healthy(a)]
        if snap.partial:
            # The back-end read only some accounts (the first of the rendezvous order and
            # the live-match holders): decide among those, never on a guess of the rest.
            pool = [a for a in pool if a.name in snap.load]
        if mode == "off":
            eligible = self._eligible(pool, demand, snap)
            if not eligible:
                return self._saturated(pool, demand, snap)
            return self._round_robin(eligible, snap)

        key = self._key(fp, mode, token)
        if order is None:
            order = rank(key, pool)
        elif snap.partial:
            order = pool  # filtered from the order, so still in it
        # Only the first few accounts with headroom matter (the pick and its failover
        # order), plus any that hold a live match: the rest of a large pool is not checked.
        eligible = self._eligible(order, demand, snap, self.max_candidates)
        if not eligible:
            return self._saturated(pool, demand, snap)
        matched = snap.matched
        if matched and len(eligible) < len(order):
            seen = {a.name for a in eligible}
            far = [a for a in order if a.name in matched and a.name not in seen]
            eligible += self._eligible(far, demand, snap)

        if mode == "fixed":
            pick = eligible[0]
            reason = "fixed" if pick is order[0] else "spill_headroom"
            return _choice(pick, eligible, reason, matched.get(pick.name, 0), key)

        best = eligible[0]
        holders = [a for a in eligible if a.name in matched] if matched else None
        if holders:  # first of equals: HRW order
            best = max(holders, key=lambda a: matched[a.name])
        best_tokens = matched.get(best.name, 0)

        if mode == "prefix":
            spread = self._spread(order, eligible, fp, demand, snap, best, best_tokens)
            if spread is not None:
                return spread

        if best_tokens >= self.min_tokens:
            return _choice(best, eligible, "longest_match", best_tokens, key)
        if mode == "session" and fp.session is not None:
            # A conversation stays on its session's rendezvous account while that has
            # headroom: load balancing must not move it turn by turn.
            pick = eligible[0]
        else:
            pick = self._placement(pool, eligible, demand, snap)
        if pick is not order[0]:
            reason = "spill_headroom"
        elif mode == "session" and fp.session is not None:
            reason = "session"
        else:
            reason = "rendezvous"
        return _choice(pick, eligible, reason, matched.get(pick.name, 0), key)

    def order(
        self,
        accounts: Sequence[AccountSpec],
        fp: Fingerprint,
        *,
        mode: Mode,
        token: str | None = None,
        healthy: Callable[[AccountSpec], bool] | None = None,
    ) -> list[AccountSpec] | None:
        """The pool in the order ``choose`` will consider it; None when every account
        counts alike (round-robin), so a state back-end must read them all."""
        if mode == "off":
            return None
        pool = list(accounts) if healthy is None else [a for a in accounts if healthy(a)]
        return rank(self._key(fp, mode, token), pool)

    @staticmethod
    def _key(fp: Fingerprint, mode: Mode, token: str | None) -> int:
        if mode == "fixed" and token is not None:
            return key_of(token)
        if mode == "session" and fp.session is not None:
            return key_of(fp.session)
        return fp.root

    # --- headroom -----------------------------------------------------------------------

    def _eligible(
        self,
        accounts: list[AccountSpec],
        demand: Demand,
        snap: Snapshot,
        limit: int | None = None,
    ) -> list[AccountSpec]:
        """fits() over a pool, in its order, up to `limit` hits; unrolled, as it runs for
        every account."""
        loads = snap.load
        matched = snap.matched
        need_in = demand.input_tokens
        need_out = demand.output_tokens
        alpha = self.alpha
        eligible = []
        for account in accounts:
            need = need_in
            if not account.itpm_counts_cached:
                need = max(0, need_in - matched.get(account.name, 0))
            if _fits(account.limits, loads.get(account.name, IDLE), need, need_out, alpha):
                eligible.append(account)
                if len(eligible) == limit:
                    break
        return eligible

    def fits(
        self, account: AccountSpec, demand: Demand, snap: Snapshot, alpha: float | None = None
    ) -> bool:
        """Would this request keep the account within alpha of every limit it has?"""
        need_in = demand.input_tokens
        if not account.itpm_counts_cached:
            # The live match is the cache read we expect; reads are not counted there.
            need_in = max(0, need_in - snap.matched.get(account.name, 0))
        return _fits(
            account.limits,
            snap.load.get(account.name, IDLE),
            need_in,
            demand.output_tokens,
            self.alpha if alpha is None else alpha,
        )

    @staticmethod
    def _counted(account: AccountSpec, demand: Demand, snap: Snapshot) -> int:
        if account.itpm_counts_cached:
            return demand.input_tokens
        return max(0, demand.input_tokens - snap.matched.get(account.name, 0))

    def _saturated(self, pool: list[AccountSpec], demand: Demand, snap: Snapshot) -> Choice:
        waits = [self._wait(a, demand, snap) for a in pool]
        finite = [w for w in waits if w is not None]
        retry = max(min(finite), MIN_RETRY_SECONDS) if finite else None
        return Choice((), "saturated", 0, retry)

    def _wait(self, account: AccountSpec, demand: Demand, snap: Snapshot) -> float | None:
        """Seconds until the account should fit this request; None if it never will."""
        load = snap.load.get(account.name, IDLE)
        limits = account.limits
        window = snap.window_seconds
        wait = 0.0
        if (load.remaining_requests is not None and load.remaining_requests <= 0) or (
            load.remaining_tokens is not None and load.remaining_tokens <= 0
        ):
            wait = load.reset_in
        for used, need, limit in (
            (load.requests, 1, limits.rpm),
            (load.input_tokens, self._counted(account, demand, snap), limits.itpm),
            (load.output_tokens, demand.output_tokens, limits.otpm),
        ):
            if limit is None or _room(used, need, limit, self.alpha):
                continue
            if need > limit:
                return None
            # Window use decays as its oldest entries age out; assume they are spread evenly.
            excess = min(used + need - self.alpha * limit, used)
            wait = max(wait, window * excess / used)
        if limits.concurrency is not None and not _room(
            load.in_flight, 1, limits.concurrency, self.alpha
        ):
            wait = max(wait, CONCURRENCY_RETRY_SECONDS)
        return wait

    # --- placement ----------------------------------------------------------------------

    def _placement(
        self, pool: list[AccountSpec], eligible: list[AccountSpec], demand: Demand, snap: Snapshot
    ) -> AccountSpec:
        """First eligible account in HRW order with room to spare for a new prefix."""
        if len(eligible) == 1:
            return eligible[0]
        load = snap.load
        ceiling = math.inf
        if self.balance is not None:
            # With a partial read, ``pool`` is the accounts read: a sample of the pool
            # (the first of a pseudo-random order), whose mean stands for the pool's.
            total = input_total(load, pool)
            weight = sum(a.weight for a in pool)
            if total > 0 and weight > 0:
                ceiling = self.balance * total / weight
        for account in eligible:
            if load.get(account.name, IDLE).input_tokens <= ceiling * account.weight and self.fits(
                account, demand, snap, self.place_alpha
            ):
                return account
        return eligible[0]

    def _spread(
        self,
        order: list[AccountSpec],
        eligible: list[AccountSpec],
        fp: Fingerprint,
        demand: Demand,
        snap: Snapshot,
        best: AccountSpec,
        best_tokens: int,
    ) -> Choice | None:
        """For a hot root: the conversation's own account among the root's top k."""
        shared = snap.shared_index
        shared_tokens = fp.tokens[shared] if 0 <= shared < len(fp.tokens) else 0
        k = self._hot_k(order, demand, snap, shared_tokens)
        if k <= 1:
            return None
        allowed = {a.name for a in order[:k]}
        top = [a for a in eligible if a.name in allowed]
        if not top:
            return None  # the whole top k lacks headroom: plain spill
        hashes = fp.hashes
        if fp.session is not None:
            conversation = key_of(fp.session)
        elif 0 <= shared < len(hashes) - 1:
            conversation = hashes[shared + 1]
        else:
            # The whole prompt is the hot part: one busy conversation, not a crowd sharing
            # a prefix. Splitting it would only move its growing history turn by turn.
            return None
        own = rank(conversation, top)[0]
        matched = snap.matched
        own_tokens = matched.get(own.name, 0)
        cache_key = _mix(fp.root, conversation)
        # A conversation whose own history is cached elsewhere stays there.
        if best is not own and best_tokens - max(own_tokens, shared_tokens) >= self.min_tokens:
            return _choice(best, eligible, "longest_match", best_tokens, cache_key)
        return _choice(own, eligible, "hot_spread", own_tokens, cache_key)

    def _hot_k(
        self, order: list[AccountSpec], demand: Demand, snap: Snapshot, shared_tokens: int
    ) -> int:
        """How many accounts the root's recent traffic needs (1: not hot)."""
        rate = snap.root_rate  # per rate window, like the limits it is compared with
        if rate <= 0.0 or len(order) <= 1:
            return 1
        need = 0.0
        if self.hot_rate_per_account:
            need = rate / self.hot_rate_per_account
        share = self.hot_share * self.alpha
        rpm = [a.limits.rpm for a in order if a.limits.rpm]
        if rpm:
            need = max(need, rate * len(rpm) / (share * sum(rpm)))
        itpm = [a.limits.itpm for a in order if a.limits.itpm]
        if itpm:
            # Where cache reads are not counted, the shared part is (or soon will be) cached.
            counts_all = any(a.itpm_counts_cached for a in order)
            tokens = demand.input_tokens if counts_all else demand.input_tokens - shared_tokens
            need = max(need, rate * tokens * len(itpm) / (share * sum(itpm)))
        return min(len(order), math.ceil(need))

    def _round_robin(self, eligible: list[AccountSpec], snap: Snapshot) -> Choice:
        # Smooth weighted round-robin (as in nginx): even interleaving, weights honoured.
        credit = self._rr
        total = 0.0
        pick = eligible[0]
        for account in eligible:
            total += account.weight
            credit[account.name] = credit.get(account.name, 0.0) + account.weight
            if credit[account.name] > credit[pick.name]:
                pick = account
        credit[pick.name] -= total
        return _choice(pick, eligible, "round_robin", snap.matched.get(pick.name, 0))


def _fits(limits: Limits, load: AccountLoad, need_in: int, need_out: int, alpha: float) -> bool:
    # _room() inlined for each limit: this runs for every account of a pool on every request.
    remaining = load.remaining_requests
    if remaining is not None and remaining <= 0:
        return False
    remaining = load.remaining_tokens
    if remaining is not None and remaining < need_in:
        return False
    limit = limits.rpm
    if limit is not None:
        used: float = load.requests
        if used + 1 > alpha * limit and (used > 0 or limit < 1):
            return False
    limit = limits.itpm
    if limit is not None:
        used = load.input_tokens
        if used + need_in > alpha * limit and (used > 0 or need_in > limit):
            return False
    limit = limits.otpm
    if limit is not None:
        used = load.output_tokens
        if used + need_out > alpha * limit and (used > 0 or need_out > limit):
            return False
    limit = limits.concurrency
    if limit is not None:
        used = load.in_flight
        if used + 1 > alpha * limit and (used > 0 or limit < 1):
            return False
    return True


def _mix(root: int, conversation: int) -> int:
    return xxhash.xxh3_64_intdigest(conversation.to_bytes(8, "little"), root)


def _room(used: float, need: float, limit: float, alpha: float) -> bool:
    return used + need <= alpha * limit or (used <= 0 and need <= limit)


def _choice(
    pick: AccountSpec,
    eligible: list[AccountSpec],
    reason: str,
    matched: int,
    cache_key: int | None = None,
) -> Choice:
    rest = tuple(a for a in eligible if a is not pick)
    return Choice((pick, *rest), reason, matched, None, cache_key)
