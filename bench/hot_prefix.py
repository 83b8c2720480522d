"""End-to-end benchmark of a hot prefix: one system prompt carries half of all input.

    .venv/bin/python -m bench.hot_prefix [--accounts 8] [--time-scale 30] [--minutes 20]
                                         [--policies round_robin,affinity,ideal]

The workload: one big tenant whose many conversations all start with the same long
system prompt (the hot root), and a crowd of smaller tenants, each with its own shorter
system prompt. Conversations are multi-turn; every turn resends the whole history, so
each turn's prompt extends the previous one. The hot system prompt carries about half
of all input tokens, and the pool's limits are set as in ``bench.replay`` (70 % load in
the busiest minute), so the hot root alone needs several accounts: a router that pins
it to one account must either overload it or give up the cache.

Everything else (emulator, gateway, policies, columns) is as in ``bench.replay``.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Sequence

from bench.common import (
    DEFAULT_POLICIES,
    POLICIES,
    TRACE_BLOCK_TOKENS,
    AccountLimits,
    PeakMinute,
    Row,
    Setup,
    TraceRequest,
    checked_args,
    limits_for,
    peak_minute,
    run_and_report,
)

DEFAULT_TIME_SCALE = 30.0
DEFAULT_MINUTES = 20.0
TARGET_POINTS_FROM_IDEAL = 0.10

# Block-id namespaces (top bits), so that the workload's prompts never collide.
_HOT, _TENANT, _TURN = 1 << 60, 2 << 60, 3 << 60


def workload(
    *,
    minutes: float = DEFAULT_MINUTES,
    hot_system_blocks: int = 20,
    hot_conversations_per_minute: float = 9.0,
    tenants: int = 24,
    tenant_system_blocks: tuple[int, int] = (2, 8),
    other_conversations_per_minute: float = 12.0,
    turns: tuple[int, int] = (3, 8),
    think_seconds: tuple[float, float] = (10.0, 40.0),
    blocks_per_turn: tuple[int, int] = (1, 3),
    seed: int = 11,
) -> tuple[list[TraceRequest], tuple[int, ...]]:
    """Timed requests (sorted) and the hot system prompt's block ids.

    Conversations start as Poisson processes over ``minutes``; each runs ``turns``
    turns ``think_seconds`` apart, adding ``blocks_per_turn`` 512-token blocks of its own
    (the user's message and the answer) to its history each turn.
    """
    rng = random.Random(seed)
    hot = tuple(_HOT + i for i in range(hot_system_blocks))
    systems = [
        tuple(_TENANT + (t << 16) + i for i in range(rng.randint(*tenant_system_blocks)))
        for t in range(tenants)
    ]
    horizon = minutes * 60.0
    out: list[TraceRequest] = []

    def arrivals(per_minute: float) -> list[float]:
        at = 0.0
        times: list[float] = []
        while True:
            at += rng.expovariate(per_minute / 60.0)
            if at >= horizon:
                return times
            times.append(at)

    starts = [(at, hot) for at in arrivals(hot_conversations_per_minute)]
    starts += [(at, rng.choice(systems)) for at in arrivals(other_conversations_per_minute)]
    for conversation, (start, system) in enumerate(sorted(starts), 1):
        history: list[int] = []
        at = start
        for _ in range(rng.randint(*turns)):
            if at >= horizon:
                break
            for _ in range(rng.randint(*blocks_per_turn)):
                history.append(_TURN + (conversation << 16) + len(history))
            blocks = system + tuple(history)
            # The last block of each turn is partial, as in a real prompt.
            tokens = len(blocks) * TRACE_BLOCK_TOKENS - rng.randrange(TRACE_BLOCK_TOKENS)
            out.append(TraceRequest(at, tokens, rng.randint(16, 400), blocks))
            at += rng.uniform(*think_seconds)
    out.sort(key=lambda r: r.at)
    return out, hot


def hot_share(requests: Sequence[TraceRequest], hot: tuple[int, ...]) -> float:
    """Share of all input tokens that are the hot system prompt."""
    total = sum(r.input_tokens for r in requests)
    shared = sum(len(hot) * TRACE_BLOCK_TOKENS for r in requests if r.blocks[: len(hot)] == hot)
    return shared / total if total else 0.0


def hot_peak(requests: Sequence[TraceRequest], hot: tuple[int, ...]) -> PeakMinute:
    """The hot root's own busiest minute."""
    return peak_minute([r for r in requests if r.blocks[: len(hot)] == hot])


def targets(rows: Sequence[Row]) -> list[str]:
    """The issue's targets for this workload, checked against the affinity row."""
    row = next((r for r in rows if r.policy == "affinity"), None)
    if row is None:
        return []

    def mark(ok: bool) -> str:
        return "met" if ok else "NOT met"

    lines = [
        f"every account under its limits: {row.over_limit} over a limit in the client's "
        f"count, {mark(row.over_limit == 0)}",
        f"no 429 from the provider: {row.upstream_429}, {mark(row.upstream_429 == 0)}",
    ]
    if row.ideal_hit_rate is not None:
        gap = row.ideal_hit_rate - row.hit_rate
        lines.append(
            f"hit rate within {TARGET_POINTS_FROM_IDEAL * 100:.0f} points of ideal: "
            f"{row.hit_rate:.1%} vs {row.ideal_hit_rate:.1%} ({gap * 100:+.1f} points), "
            f"{mark(gap <= TARGET_POINTS_FROM_IDEAL)}"
        )
    return lines


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.hot_prefix",
        description="One system prompt with half of all input tokens, through the gateway.",
    )
    p.add_argument("--accounts", type=int, default=8, help="accounts in the pool (default 8)")
    p.add_argument(
        "--time-scale",
        type=float,
        default=DEFAULT_TIME_SCALE,
        help=f"emulated seconds per real second (default {DEFAULT_TIME_SCALE:g})",
    )
    p.add_argument(
        "--minutes",
        type=float,
        default=DEFAULT_MINUTES,
        help=f"emulated minutes of traffic (default {DEFAULT_MINUTES:g})",
    )
    p.add_argument(
        "--policies",
        default=",".join(DEFAULT_POLICIES),
        help=f"comma-separated, from {','.join(POLICIES)} (default: %(default)s)",
    )
    p.add_argument(
        "--load",
        type=float,
        default=0.7,
        help="pool load in the busiest minute that sets the limits (default 0.7)",
    )
    p.add_argument("--seed", type=int, default=11, help="workload seed (default 11)")
    p.add_argument("--concurrency", type=int, default=64, help="requests in flight at most")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def describe(
    requests: Sequence[TraceRequest], hot: tuple[int, ...], limits: AccountLimits, load: float
) -> str:
    peak = peak_minute(requests)
    root = hot_peak(requests, hot)
    # How many accounts the hot root needs at the gateway's default alpha (0.8).
    need = max(root.requests / (0.8 * limits.rpm), root.input_tokens / (0.8 * limits.itpm))
    tokens = sum(r.input_tokens for r in requests)
    return (
        f"hot-prefix workload: {len(requests):,} requests, {tokens / 1e6:.1f} M input tokens; "
        f"the hot system prompt ({len(hot) * TRACE_BLOCK_TOKENS:,} tokens) carries "
        f"{hot_share(requests, hot):.0%} of them\n"
        f"busiest minute {peak.requests} requests, {peak.input_tokens / 1e6:.2f} M tokens; "
        f"each account rpm {limits.rpm}, itpm {limits.itpm:,} (pool at {load:.0%}); "
        f"the hot root's busiest minute ({root.requests} requests, "
        f"{root.input_tokens / 1e6:.2f} M tokens) needs {need:.1f} accounts at 80 % of "
        "their limits\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    policies = checked_args(parser(), args)

    t0 = time.monotonic()
    requests, hot = workload(minutes=args.minutes, seed=args.seed)
    limits = limits_for(peak_minute(requests), args.accounts, args.load)
    setup = Setup(
        accounts=args.accounts,
        limits=limits,
        time_scale=args.time_scale,
        concurrency=args.concurrency,
    )
    print(describe(requests, hot, limits, args.load), flush=True)

    return run_and_report(policies, requests, setup, targets, quiet=args.quiet, started=t0)


if __name__ == "__main__":
    sys.exit(main())
