"""End-to-end replay of the Mooncake conversation trace through the real gateway.

    .venv/bin/python -m bench.replay [--trace PATH] [--accounts 8] [--time-scale 60]
                                     [--limit N] [--policies round_robin,affinity,ideal]

For each policy: a fresh provider emulator (cold caches; ``--accounts`` accounts with a
5-minute cache TTL, a 60-second rate window, a 1,024-token minimum and 128-token
blocks; in a child process) and a fresh gateway in front of it (uvicorn in this
process, like the demo). A client process sends the trace over HTTP, open loop,
time-compressed by ``--time-scale`` (the emulator's and the gateway's TTL and window are
compressed alike); each 512-token block id becomes a deterministic 2,048-character
text, so prompts share prefixes exactly as the trace says. Every account gets rpm and
itpm limits under which the pool runs at ``--load`` (70 %) of its capacity in the
trace's busiest minute, on the emulator (which answers 429 past them) and in the
gateway (whose admission respects them).

Policies: ``round_robin`` (the gateway's affinity mode "off"), ``affinity`` (mode
"prefix") and ``ideal`` (one account holding the whole pool's limits, so one cache sees
every request: the bound); on request, ``random`` (the gateway has no random mode: its
"fixed" mode with a client key drawn at random per request).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import (
    CACHE_TTL_SECONDS,
    DEFAULT_POLICIES,
    MAX_OUTPUT_TOKENS,
    MIN_CACHE_TOKENS,
    MOONCAKE_TRACE,
    POLICIES,
    WINDOW_SECONDS,
    Row,
    Setup,
    checked_args,
    limits_for,
    load_trace,
    peak_minute,
    run_and_report,
)

DEFAULT_TIME_SCALE = 60.0
DEFAULT_CONCURRENCY = 64

# What the issue asks of the gateway on this trace.
TARGET_HIT_RATE = 0.25
TARGET_PEAK_RATIO = 1.25


def targets(rows: Sequence[Row]) -> list[str]:
    """The issue's targets, checked against the affinity row."""
    row = next((r for r in rows if r.policy == "affinity"), None)
    if row is None:
        return []

    def mark(ok: bool) -> str:
        return "met" if ok else "NOT met"

    return [
        f"affinity hit rate >= {TARGET_HIT_RATE:.0%}: {row.hit_rate:.1%}, "
        f"{mark(row.hit_rate >= TARGET_HIT_RATE)}",
        f"no request over an account's limit: {row.upstream_429} 429s from the provider, "
        f"{row.over_limit} over a limit in the client's count, "
        f"{mark(row.upstream_429 == 0 and row.over_limit == 0)}",
        f"peak-minute load <= {TARGET_PEAK_RATIO} x mean: {row.peak_ratio:.2f}, "
        f"{mark(row.peak_ratio <= TARGET_PEAK_RATIO)}",
    ]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.replay",
        description="Replay the Mooncake trace over HTTP through the gateway, per policy.",
    )
    p.add_argument("--trace", type=Path, default=MOONCAKE_TRACE, help="Mooncake-format JSONL")
    p.add_argument("--accounts", type=int, default=8, help="accounts in the pool (default 8)")
    p.add_argument(
        "--time-scale",
        type=float,
        default=DEFAULT_TIME_SCALE,
        help=f"emulated seconds per real second (default {DEFAULT_TIME_SCALE:g})",
    )
    p.add_argument("--limit", type=int, help="replay only the first N requests")
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
    p.add_argument(
        "--concurrency",
        type=int,
        default=DEFAULT_CONCURRENCY,
        help=f"requests in flight at most (default {DEFAULT_CONCURRENCY})",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    policies = checked_args(parser(), args)

    t0 = time.monotonic()
    requests = load_trace(args.trace, limit=args.limit)
    if not requests:
        parser().error(f"{args.trace}: no requests")
    peak = peak_minute(requests)
    limits = limits_for(peak, args.accounts, args.load)
    setup = Setup(
        accounts=args.accounts,
        limits=limits,
        time_scale=args.time_scale,
        concurrency=args.concurrency,
    )
    span = requests[-1].at - requests[0].at
    tokens = sum(r.input_tokens for r in requests)
    print(
        f"trace {args.trace.name}: {len(requests):,} requests, {tokens / 1e6:.1f} M input tokens "
        f"over {span:,.0f} s; busiest minute {peak.requests} requests, "
        f"{peak.input_tokens / 1e6:.2f} M input tokens\n"
        f"{args.accounts} accounts, each rpm {limits.rpm}, itpm {limits.itpm:,} "
        f"(pool at {args.load:.0%} in the busiest minute); cache TTL {CACHE_TTL_SECONDS:g} s, "
        f"window {WINDOW_SECONDS:g} s, minimum {MIN_CACHE_TOKENS} tokens; output capped at "
        f"{MAX_OUTPUT_TOKENS} tokens; time scale {args.time_scale:g} "
        f"(~{span / args.time_scale:.0f} s a policy)\n",
        flush=True,
    )

    return run_and_report(policies, requests, setup, targets, quiet=args.quiet, started=t0)


if __name__ == "__main__":
    sys.exit(main())
