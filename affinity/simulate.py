"""Offline replay of a prompt-block trace through the real selector and state.

The trace format is Mooncake's: one JSON object a line with ``timestamp`` (ms),
``input_length``, ``output_length`` and ``hash_ids`` (one id per 512-token block,
chained: two requests share a prefix exactly as far as their ids agree). Each account is
emulated as the provider would behave: an exact-prefix cache per account with a sliding
TTL and a minimum cacheable length, and exact sliding-minute rate windows that count
every admission over a limit. No HTTP: a policy over the whole trace takes seconds, so
the selector can be tuned here before anyone runs the slow end-to-end replay.

Policies: ``affinity`` (Selector + MemoryState, as the gateway runs them),
``round_robin`` and ``random`` (both with the same headroom rule), and ``ideal`` (one
unlimited cache shared by all requests: the upper bound).
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import sys
import time
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import xxhash

from affinity.fingerprint import Fingerprint
from affinity.memory import MemoryState
from affinity.select import Choice, Mode, Selector
from affinity.state import Outcome
from affinity.types import AccountSpec, Demand, Limits

POLICIES = ("round_robin", "random", "affinity", "ideal")
TRACE_BLOCK_TOKENS = 512
MAX_RETRIES = 20
# Ids for a synthetic shared system prompt; far above any id a trace uses.
HOT_ID_BASE = 1 << 62


@dataclass(frozen=True, slots=True)
class Request:
    at: float  # seconds from the start
    input_tokens: int
    output_tokens: int
    blocks: tuple[int, ...]


@dataclass(slots=True)
class Result:
    policy: str
    requests: int = 0
    served: int = 0
    dropped: int = 0  # still saturated after every retry
    deferred: int = 0  # saturated answers (each retried later)
    input_tokens: int = 0
    cached_tokens: int = 0
    over_limit: int = 0  # admissions that took an account past a provider limit
    peak_spread: float = 0.0  # max / mean over accounts of their busiest minute's tokens
    total_spread: float = 0.0  # max / mean over accounts of all their tokens
    decisions: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.input_tokens if self.input_tokens else 0.0


def load_trace(path: Path, *, limit: int | None = None) -> list[Request]:
    requests: list[Request] = []
    with path.open("rb") as lines:
        for line in lines:
            if limit is not None and len(requests) >= limit:
                break
            row = orjson.loads(line)
            requests.append(
                Request(
                    row["timestamp"] / 1000.0,
                    row["input_length"],
                    row["output_length"],
                    tuple(row["hash_ids"]),
                )
            )
    return requests


def with_hot_prefix(requests: Sequence[Request], share: float) -> list[Request]:
    """Every request behind one shared system prompt carrying ``share`` of all tokens."""
    if share <= 0.0:
        return list(requests)
    total = sum(r.input_tokens for r in requests)
    tokens = share / (1.0 - share) * total / len(requests)
    blocks = max(1, round(tokens / TRACE_BLOCK_TOKENS))
    prefix = tuple(HOT_ID_BASE + i for i in range(blocks))
    extra = blocks * TRACE_BLOCK_TOKENS
    return [
        Request(r.at, r.input_tokens + extra, r.output_tokens, prefix + r.blocks) for r in requests
    ]


def trace_fingerprint(request: Request, *, min_tokens: int) -> Fingerprint:
    """The chain a real request with these blocks would fingerprint to."""
    h = 0
    hashes = [h]
    tokens = [0]
    for index, block in enumerate(request.blocks, 1):
        h = xxhash.xxh3_64_intdigest(block.to_bytes(8, "little"), h)
        hashes.append(h)
        tokens.append(min(index * TRACE_BLOCK_TOKENS, request.input_tokens))
    pin_from = next((i for i, t in enumerate(tokens) if i and t >= min_tokens), len(tokens))
    root = hashes[min(max(pin_from, 1), len(hashes) - 1)]
    return Fingerprint(tuple(hashes), tuple(tokens), root, request.input_tokens, None, h, pin_from)


class ProviderCache:
    """One account's (or one organisation's) exact-prefix prompt cache with a sliding TTL."""

    __slots__ = ("_entries", "_writes", "min_tokens", "ttl")

    def __init__(self, ttl: float, min_tokens: int) -> None:
        self._entries: dict[int, float] = {}
        self._writes = 0
        self.ttl = ttl
        self.min_tokens = min_tokens

    def serve(self, fp: Fingerprint, now: float) -> int:
        """Cached tokens for this prompt; the prompt is then cached (or refreshed) whole."""
        entries = self._entries
        # Every request writes its whole chain with one expiry, so liveness is monotone
        # along a chain: binary search for the deepest live block.
        lo, hi, deepest = 1, len(fp.hashes) - 1, 0
        while lo <= hi:
            mid = (lo + hi) >> 1
            if entries.get(fp.hashes[mid], 0.0) > now:
                deepest, lo = mid, mid + 1
            else:
                hi = mid - 1
        cached = fp.tokens[deepest]
        expires = now + self.ttl
        for h in fp.hashes[1:]:
            entries[h] = expires
        self._writes += 1
        if self._writes % 4096 == 0:
            self._entries = {h: e for h, e in entries.items() if e > now}
        return cached if cached >= self.min_tokens else 0


class ProviderWindow:
    """Exact sliding-minute accounting of one account, as a provider enforces it."""

    __slots__ = ("events", "in_flight", "input", "output", "requests")

    def __init__(self) -> None:
        self.events: deque[tuple[float, int, int]] = deque()
        self.requests = 0
        self.input = 0
        self.output = 0
        self.in_flight = 0

    def admit(self, now: float, input_tokens: int, output_tokens: int, limits: Limits) -> bool:
        """Count one admission; False when it takes the account past a limit."""
        events = self.events
        while events and events[0][0] <= now - 60.0:
            _, i, o = events.popleft()
            self.requests -= 1
            self.input -= i
            self.output -= o
        events.append((now, input_tokens, output_tokens))
        self.requests += 1
        self.input += input_tokens
        self.output += output_tokens
        self.in_flight += 1
        return not (
            (limits.rpm is not None and self.requests > limits.rpm)
            or (limits.itpm is not None and self.input > limits.itpm)
            or (limits.otpm is not None and self.output > limits.otpm)
            or (limits.concurrency is not None and self.in_flight > limits.concurrency)
        )


@dataclass(frozen=True, slots=True)
class Setup:
    accounts: tuple[AccountSpec, ...]
    ttl: float
    min_tokens: int
    alpha: float
    latency: float  # seconds before the first token
    tokens_per_second: float
    seed: int
    balance: float | None = 1.1
    hot_share: float = 0.5
    reserve: float = 0.15


def derive_limits(requests: Sequence[Request], accounts: int, headroom: float) -> Limits:
    """Limits that give the pool ``headroom`` times the trace's busiest minute."""
    minutes: Counter[int] = Counter()
    tokens_in: Counter[int] = Counter()
    tokens_out: Counter[int] = Counter()
    for r in requests:
        minute = int(r.at // 60)
        minutes[minute] += 1
        tokens_in[minute] += r.input_tokens
        tokens_out[minute] += r.output_tokens

    def per_account(counter: Counter[int]) -> int:
        return math.ceil(headroom * max(counter.values()) / accounts)

    return Limits(
        rpm=per_account(minutes), itpm=per_account(tokens_in), otpm=per_account(tokens_out)
    )


def run_policy(policy: str, requests: Sequence[Request], setup: Setup) -> Result:
    started = time.perf_counter()
    result = Result(policy)
    if policy == "ideal":
        cache = ProviderCache(setup.ttl, setup.min_tokens)
        for request in requests:
            fp = trace_fingerprint(request, min_tokens=setup.min_tokens)
            result.requests += 1
            result.served += 1
            result.input_tokens += request.input_tokens
            result.cached_tokens += cache.serve(fp, request.at)
        result.seconds = time.perf_counter() - started
        return result
    _Replay(policy, setup, result).run(requests)
    result.seconds = time.perf_counter() - started
    return result


@dataclass(frozen=True, slots=True)
class _End:
    account: AccountSpec
    fp: Fingerprint
    outcome: Outcome


@dataclass(frozen=True, slots=True)
class _Retry:
    request: Request
    tries: int


class _Replay:
    def __init__(self, policy: str, setup: Setup, result: Result) -> None:
        self.policy = policy
        self.setup = setup
        self.result = result
        self.now = 0.0
        self.state = MemoryState(ttl_seconds=setup.ttl, clock=lambda: self.now)
        self.selector = Selector(
            alpha=setup.alpha,
            min_tokens=setup.min_tokens,
            balance=setup.balance,
            hot_share=setup.hot_share,
            reserve=setup.reserve,
        )
        self.mode: Mode = "prefix" if policy == "affinity" else "off"
        self.rng = random.Random(setup.seed)
        domains = {a.cache_domain for a in setup.accounts}
        self.caches = {d: ProviderCache(setup.ttl, setup.min_tokens) for d in domains}
        self.windows = {a.name: ProviderWindow() for a in setup.accounts}
        self.minute_tokens: dict[str, Counter[int]] = {a.name: Counter() for a in setup.accounts}
        # (time, sequence, event): completions and retries in time order.
        self.events: list[tuple[float, int, _End | _Retry]] = []
        self.sequence = 0

    def _push(self, at: float, event: _End | _Retry) -> None:
        self.sequence += 1
        heapq.heappush(self.events, (at, self.sequence, event))

    def run(self, requests: Iterable[Request]) -> None:
        for request in requests:
            self._until(request.at)
            self.result.requests += 1
            self._arrive(request, request.at, 0)
        self._until(math.inf)
        self._spreads()

    def _until(self, t: float) -> None:
        while self.events and self.events[0][0] <= t:
            at, _, event = heapq.heappop(self.events)
            self.now = at
            if isinstance(event, _End):
                self.state.end_now(event.account, event.fp, event.outcome, at)
                self.windows[event.account.name].in_flight -= 1
            else:
                self._arrive(event.request, at, event.tries)

    def _choose(self, fp: Fingerprint, demand: Demand) -> Choice:
        accounts = self.setup.accounts
        snap = self.state.snapshot_now(accounts, fp, self.now)
        if self.policy == "random":
            eligible = [a for a in accounts if self.selector.fits(a, demand, snap)]
            if not eligible:
                return self.selector.choose(accounts, fp, demand, snap, mode="off")
            pick = self.rng.choice(eligible)
            return Choice((pick,), "random", snap.matched.get(pick.name, 0), None)
        return self.selector.choose(accounts, fp, demand, snap, mode=self.mode)

    def _arrive(self, request: Request, at: float, tries: int) -> None:
        self.now = at
        setup = self.setup
        fp = trace_fingerprint(request, min_tokens=setup.min_tokens)
        demand = Demand(request.input_tokens, request.output_tokens)
        choice = self._choose(fp, demand)
        self.result.decisions[choice.reason] += 1
        if not choice.candidates:
            self.result.deferred += 1
            if tries >= MAX_RETRIES:
                self.result.dropped += 1
            else:
                self._push(at + (choice.retry_after or 1.0), _Retry(request, tries + 1))
            return
        account = choice.candidates[0]
        cached = self.caches[account.cache_domain].serve(fp, at)
        counted = (
            request.input_tokens if account.itpm_counts_cached else request.input_tokens - cached
        )
        if not self.windows[account.name].admit(at, counted, request.output_tokens, account.limits):
            self.result.over_limit += 1
        self.minute_tokens[account.name][int(at // 60)] += request.input_tokens
        self.state.begin_now(account, fp, demand, at)
        self.result.served += 1
        self.result.input_tokens += request.input_tokens
        self.result.cached_tokens += cached
        outcome = Outcome(
            ok=True,
            input_tokens=request.input_tokens,
            cached_tokens=cached,
            cache_write_tokens=request.input_tokens - cached,
            output_tokens=request.output_tokens,
            expected_cached_tokens=choice.matched_tokens,
        )
        done = at + setup.latency + request.output_tokens / setup.tokens_per_second
        self._push(done, _End(account, fp, outcome))

    def _spreads(self) -> None:
        peaks = [max(m.values(), default=0) for m in self.minute_tokens.values()]
        totals = [sum(m.values()) for m in self.minute_tokens.values()]
        self.result.peak_spread = _spread(peaks)
        self.result.total_spread = _spread(totals)


def _spread(values: Sequence[float]) -> float:
    mean = sum(values) / len(values) if values else 0.0
    return max(values) / mean if mean else 0.0


def run(
    trace: Path,
    *,
    policies: Sequence[str] = POLICIES,
    accounts: int = 8,
    ttl: float = 300.0,
    min_tokens: int = 1024,
    alpha: float = 0.8,
    limits: Limits | None = None,
    headroom: float = 1.5,
    hot_prefix_share: float = 0.0,
    itpm_counts_cached: bool = True,
    balance: float | None = 1.1,
    hot_share: float = 0.5,
    reserve: float = 0.15,
    latency: float = 0.5,
    tokens_per_second: float = 50.0,
    seed: int = 0,
    limit: int | None = None,
) -> list[Result]:
    """Replay the trace under each policy; limits default to ``headroom`` x the busiest minute."""
    requests = with_hot_prefix(load_trace(trace, limit=limit), hot_prefix_share)
    if limits is None:
        limits = derive_limits(requests, accounts, headroom)
    setup = Setup(
        accounts=tuple(
            AccountSpec(f"acct-{i}", limits=limits, itpm_counts_cached=itpm_counts_cached)
            for i in range(accounts)
        ),
        ttl=ttl,
        min_tokens=min_tokens,
        alpha=alpha,
        latency=latency,
        tokens_per_second=tokens_per_second,
        seed=seed,
        balance=balance,
        hot_share=hot_share,
        reserve=reserve,
    )
    return [run_policy(policy, requests, setup) for policy in policies]


def format_table(results: Sequence[Result]) -> str:
    header = (
        f"{'policy':<12} {'hit rate':>8} {'over limit':>10} {'peak spread':>11} "
        f"{'total spread':>12} {'deferred':>8} {'dropped':>7} {'secs':>6}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        spreads = (
            ("-", "-") if r.policy == "ideal" else (f"{r.peak_spread:.2f}", f"{r.total_spread:.2f}")
        )
        lines.append(
            f"{r.policy:<12} {r.hit_rate:>8.1%} {r.over_limit:>10} {spreads[0]:>11} "
            f"{spreads[1]:>12} {r.deferred:>8} {r.dropped:>7} {r.seconds:>6.1f}"
        )
    for r in results:
        if r.decisions:
            reasons = ", ".join(f"{k}={v}" for k, v in r.decisions.most_common())
            lines.append(f"{r.policy} decisions: {reasons}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="affinity-gateway simulate",
        description="Replay a prompt-block trace offline through the affinity selector.",
    )
    parser.add_argument("trace", type=Path, help="JSON-lines trace (Mooncake format)")
    parser.add_argument("--policy", action="append", choices=POLICIES, help="repeatable")
    parser.add_argument("--accounts", type=int, default=8)
    parser.add_argument("--ttl", type=float, default=300.0, help="provider cache TTL, seconds")
    parser.add_argument("--min-tokens", type=int, default=1024)
    parser.add_argument("--alpha", type=float, default=0.8)
    parser.add_argument("--rpm", type=int)
    parser.add_argument("--itpm", type=int)
    parser.add_argument("--otpm", type=int)
    parser.add_argument("--concurrency", type=int)
    parser.add_argument(
        "--headroom",
        type=float,
        default=1.5,
        help="without explicit limits: pool capacity as a multiple of the busiest minute",
    )
    parser.add_argument(
        "--hot-prefix",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="put every request behind one system prompt carrying this share of all tokens",
    )
    parser.add_argument(
        "--cache-reads-free",
        action="store_true",
        help="cache reads do not count against input TPM (Anthropic)",
    )
    parser.add_argument("--balance", type=float, default=1.1, help="0: no load bound")
    parser.add_argument("--hot-share", type=float, default=0.5)
    parser.add_argument("--reserve", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, help="replay only the first N requests")
    args = parser.parse_args(argv)
    if not args.trace.is_file():
        parser.error(f"no such trace file: {args.trace}")
    explicit = (args.rpm, args.itpm, args.otpm, args.concurrency)
    limits = None if all(v is None for v in explicit) else Limits(*explicit)
    results = run(
        args.trace,
        policies=args.policy or POLICIES,
        accounts=args.accounts,
        ttl=args.ttl,
        min_tokens=args.min_tokens,
        alpha=args.alpha,
        limits=limits,
        headroom=args.headroom,
        hot_prefix_share=args.hot_prefix,
        itpm_counts_cached=not args.cache_reads_free,
        balance=args.balance if args.balance > 0 else None,
        hot_share=args.hot_share,
        reserve=args.reserve,
        seed=args.seed,
        limit=args.limit,
    )
    print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
