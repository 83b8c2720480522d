"""Synthetic multi-tenant chat workloads, replayed over real HTTP.

Several apps, each with its own long system prompt, run multi-turn sessions whose
history grows turn by turn: the prefix structure that provider prompt caches reward.
Used by the demo and the benchmarks.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

_WORDS = (
    *("cache", "prefix", "account", "token", "stream", "latency", "gateway", "policy"),
    *("tenant", "session", "window", "limit", "budget", "prompt", "system", "answer"),
    *("question", "context", "history", "model", "route", "pool", "shard", "replica"),
    *("failover", "usage", "metric", "health", "probe", "quota", "region"),
)


def text(seed: int, words: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(_WORDS) for _ in range(words))


@dataclass(frozen=True, slots=True)
class Call:
    """One request of the workload: when (seconds from start) and what."""

    at: float
    session: str
    path: str  # /v1/chat/completions or /v1/messages
    body: bytes
    stream: bool


def multi_tenant(
    *,
    apps: int = 16,
    sessions_per_app: int = 3,
    turns: int = 4,
    system_words: tuple[int, int] = (1500, 4000),
    anthropic_share: float = 0.25,
    stream_share: float = 0.5,
    seed: int = 7,
) -> list[Call]:
    """Apps with long system prompts; sessions whose history grows each turn."""
    rng = random.Random(seed)
    calls: list[Call] = []
    for app in range(apps):
        system = f"App {app} instructions. " + text(seed * 1000 + app, rng.randint(*system_words))
        anthropic = rng.random() < anthropic_share
        for s in range(sessions_per_app):
            history: list[dict[str, Any]] = []
            start = rng.uniform(0, 2.0)
            for turn in range(turns):
                history.append(
                    {
                        "role": "user",
                        "content": f"Q{turn}: " + text(app * 10_000 + s * 100 + turn, 30),
                    }
                )
                stream = rng.random() < stream_share
                if anthropic:
                    body: dict[str, Any] = {
                        "model": "claude-sonnet-4-6",
                        "max_tokens": 24,
                        "system": [
                            {"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}
                        ],
                        "messages": list(history),
                    }
                    path = "/v1/messages"
                else:
                    body = {
                        "model": "gpt-4o-mini",
                        "max_tokens": 24,
                        "messages": [{"role": "system", "content": system}, *history],
                    }
                    path = "/v1/chat/completions"
                if stream:
                    body["stream"] = True
                calls.append(
                    Call(start + turn * 0.6, f"{app}-{s}", path, orjson.dumps(body), stream)
                )
                history.append(
                    {"role": "assistant", "content": f"A{turn}: " + text(turn + 17 * s, 20)}
                )
    calls.sort(key=lambda c: c.at)
    return calls


@dataclass(slots=True)
class RunResult:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return 0.0
        if len(self.latencies) == 1:
            return self.latencies[0]
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[int(q) - 1]


def _sessions(calls: list[Call]) -> Iterator[list[Call]]:
    by: dict[str, list[Call]] = {}
    for c in calls:
        by.setdefault(c.session, []).append(c)
    yield from by.values()


async def replay(base_url: str, key: str, calls: list[Call], *, concurrency: int = 8) -> RunResult:
    """Send every call over HTTP; a session's turns go in order, sessions in parallel."""
    result = RunResult()
    gate = asyncio.Semaphore(concurrency)
    started = time.monotonic()
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}

    async def one(session: aiohttp.ClientSession, call: Call) -> None:
        delay = call.at - (time.monotonic() - started)
        if delay > 0:
            await asyncio.sleep(delay)
        async with gate:
            t0 = time.monotonic()
            try:
                async with session.post(base_url + call.path, data=call.body, headers=headers) as r:
                    async for _ in r.content.iter_any():
                        pass
                    result.statuses[r.status] = result.statuses.get(r.status, 0) + 1
                    if r.status != 200:
                        result.errors += 1
                        return
            except aiohttp.ClientError:
                result.errors += 1
                return
            result.latencies.append(time.monotonic() - t0)

    async def run_session(session: aiohttp.ClientSession, turns: list[Call]) -> None:
        for call in turns:
            await one(session, call)

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(run_session(session, s) for s in _sessions(calls)))
    return result
