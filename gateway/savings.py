"""Usage export and the savings report.

`affinity-gateway usage export` pages through `GET /v1/usage/logs` of a running gateway
(an admin key sees every token) and writes JSONL or CSV. `affinity-gateway savings`
reads such an export and prints, per model and group, cached vs uncached input tokens,
what was paid, what the same calls would have cost without caching, the savings and a
30-day projection; `--what-if-round-robin` estimates what an account pool without
affinity would have cost, from the measured hit rate divided as a pool of N accounts
divides it.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import orjson

from gateway.table import render
from gateway.usagelog import UsageRecord

_COLUMNS = [f.name for f in fields(UsageRecord)]


async def fetch_all(url: str, key: str, page: int = 1000) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    cursor: str | None = None
    headers = {"authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession() as s:
        while True:
            params = {"limit": str(page)}
            if cursor is not None:
                params["cursor"] = cursor
            async with s.get(
                url.rstrip("/") + "/v1/usage/logs", params=params, headers=headers
            ) as r:
                doc = orjson.loads(await r.read())
                if r.status != 200:
                    raise SystemExit(
                        f"usage export: {r.status} {doc.get('error', {}).get('message')}"
                    )
            out.extend(doc["data"])
            cursor = doc.get("next_cursor")
            if not cursor:
                return out


def write_records(records: Sequence[dict[str, Any]], fmt: str, stream: TextIO) -> None:
    if fmt == "jsonl":
        for r in records:
            stream.write(orjson.dumps(r).decode() + "\n")
        return
    writer = csv.DictWriter(stream, fieldnames=_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(records)


def read_records(path: Path) -> list[UsageRecord]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".csv":
        rows: Iterable[dict[str, Any]] = csv.DictReader(io.StringIO(text))
        return [_from_csv(row) for row in rows]
    return [UsageRecord(**orjson.loads(line)) for line in text.splitlines() if line.strip()]


def _from_csv(row: dict[str, Any]) -> UsageRecord:
    types = {f.name: f.type for f in fields(UsageRecord)}
    values: dict[str, Any] = {}
    for name, raw in row.items():
        kind = str(types[name])
        if raw == "" and "None" in kind:
            values[name] = None
        elif kind.startswith("int"):
            values[name] = int(raw)
        elif kind.startswith("float"):
            values[name] = float(raw)
        elif kind == "bool":
            values[name] = raw == "True"
        else:
            values[name] = raw
    return UsageRecord(**values)


@dataclass(slots=True)
class Savings:
    requests: int = 0
    prompt: int = 0
    cached: int = 0
    cost: float = 0.0
    saved: float = 0.0
    start: float = float("inf")
    end: float = 0.0

    def add(self, r: UsageRecord) -> None:
        self.requests += 1
        self.prompt += r.prompt_tokens
        self.cached += r.cached_tokens
        self.cost += r.cost
        self.saved += r.cache_discount
        self.start = min(self.start, r.time)
        self.end = max(self.end, r.time)

    @property
    def hit_rate(self) -> float:
        return self.cached / self.prompt if self.prompt else 0.0

    def round_robin_cost(self, accounts: int) -> float:
        """Cost had a pool of `accounts` spread these calls without affinity: each call
        finds its prefix cached on the account it lands on 1/N as often."""
        if self.cached == 0:
            return self.cost
        kept = 1.0 / accounts
        return self.cost + self.saved * (1.0 - kept)


def savings_rows(records: Iterable[UsageRecord], by: str, accounts: int | None) -> list[list[str]]:
    groups: dict[str, Savings] = {}
    total = Savings()
    for r in records:
        if r.status >= 400:
            continue
        groups.setdefault(str(getattr(r, by)), Savings()).add(r)
        total.add(r)
    rows = []
    for name, s in [*sorted(groups.items()), ("total", total)]:
        span = max(s.end - s.start, 1.0)
        monthly = s.saved * (30 * 86400) / span
        row = [
            name,
            str(s.requests),
            str(s.cached),
            str(s.prompt - s.cached),
            f"{s.hit_rate:.1%}",
            f"{s.cost:.4f}",
            f"{s.cost + s.saved:.4f}",
            f"{s.saved:.4f}",
            f"{monthly:.2f}",
        ]
        if accounts:
            row.append(f"{s.round_robin_cost(accounts):.4f}")
        rows.append(row)
    return rows


def savings_table(records: Sequence[UsageRecord], by: str, accounts: int | None) -> str:
    head = [
        by,
        "requests",
        "cached tokens",
        "uncached tokens",
        "hit rate",
        "paid USD",
        "without cache USD",
        "saved USD",
        "saved per 30 days",
    ]
    if accounts:
        head.append(f"round-robin x{accounts} USD")
    return render(head, savings_rows(records, by, accounts))


def cmd_export(args: argparse.Namespace) -> int:
    records = asyncio.run(fetch_all(args.url, args.key))
    if args.output == "-":
        write_records(records, args.format, sys.stdout)
    else:
        with open(args.output, "w", encoding="utf-8", newline="") as f:
            write_records(records, args.format, f)
    print(f"{len(records)} records", file=sys.stderr)
    return 0


def cmd_savings(args: argparse.Namespace) -> int:
    records = read_records(Path(args.file))
    accounts = args.accounts if args.what_if_round_robin else None
    for by in ("model", "group"):
        print(savings_table(records, by, accounts))
        print()
    return 0
