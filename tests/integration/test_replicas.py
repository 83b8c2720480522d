"""Several gateway processes: sharing Redis they pin alike; without it they still agree
on new prefixes (rendezvous hashing); losing Redis mid-run loses no request."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from gateway.config import Config
from gateway.presets import DEMO_KEY, emulated_config
from gateway.workload import text
from tests.conftest import Emulator, RedisServer, free_port, start_redis, stop_redis
from tests.procs import GatewayProcess

HEADERS = {"authorization": f"Bearer {DEMO_KEY}", "content-type": "application/json"}


def conversation(i: int, turns: int) -> list[bytes]:
    """One conversation's requests: a long system prompt of its own, a growing history."""
    system = f"Tenant {i % 7} conversation {i}. " + text(i, 900)
    history: list[dict[str, str]] = []
    bodies = []
    for t in range(turns):
        history.append({"role": "user", "content": f"turn {t}: " + text(i * 100 + t, 40)})
        messages = [{"role": "system", "content": system}, *history]
        bodies.append(orjson.dumps({"model": "gpt-4o-mini", "messages": messages, "max_tokens": 2}))
        history.append({"role": "assistant", "content": text(i * 1000 + t, 20)})
    return bodies


async def post(s: aiohttp.ClientSession, url: str, body: bytes) -> tuple[int, str]:
    async with s.post(url + "/v1/chat/completions", data=body, headers=HEADERS) as r:
        await r.read()
        return r.status, r.headers.get("x-upstream-account", "")


def config(emulator: Emulator, redis_url: str = "", prefix: str = "ag") -> Config:
    # A generous Redis timeout: these tests are about agreement, not about a loaded
    # machine's scheduling delays tripping the 50 ms default into local fallback.
    state = (
        {"redis_url": redis_url, "key_prefix": prefix, "redis_socket_timeout": 0.5}
        if redis_url
        else {}
    )
    return emulated_config(emulator.url, server={"port": free_port()}, state=state)


async def run_rounds(
    urls: list[str], convs: list[list[bytes]], before_round: Callable[[int], None] | None = None
) -> list[list[tuple[int, str]]]:
    """Turn t of every conversation, then turn t+1; turn t of conversation i goes to
    replica (i + t) mod N, so every conversation moves between replicas each turn."""
    rounds = []
    async with aiohttp.ClientSession() as s:
        for t, turns in enumerate(zip(*convs, strict=True)):
            if before_round is not None:
                before_round(t)
            rounds.append(
                await asyncio.gather(
                    *(post(s, urls[(i + t) % len(urls)], body) for i, body in enumerate(turns))
                )
            )
    return rounds


async def redis_fallbacks(url: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        metrics = await r.text()
    return next(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("gateway_redis_fallbacks_total")
    )


def agreement(rounds: list[list[tuple[int, str]]]) -> float:
    homes = [acct for _, acct in rounds[0]]
    later = [acct == home for r in rounds[1:] for (_, acct), home in zip(r, homes, strict=True)]
    return sum(later) / len(later)


async def test_two_replicas_sharing_redis_pin_alike(
    tmp_path: Path, emulator: Emulator, redis_server: RedisServer
) -> None:
    prefix = f"rep{free_port()}"
    a = await GatewayProcess(config(emulator, redis_server.url, prefix), tmp_path).start()
    b = await GatewayProcess(config(emulator, redis_server.url, prefix), tmp_path).start()
    try:
        rounds = await run_rounds([a.url, b.url], [conversation(i, 5) for i in range(40)])
        assert all(status == 200 for r in rounds for status, _ in r)
        fallbacks = [await redis_fallbacks(g.url) for g in (a, b)]
        assert agreement(rounds) >= 0.99, f"redis fallbacks: {fallbacks}"
    finally:
        assert "Traceback" not in await a.stop()
        assert "Traceback" not in await b.stop()


async def test_without_redis_replicas_agree_on_new_prefixes(
    tmp_path: Path, emulator: Emulator
) -> None:
    a = await GatewayProcess(config(emulator), tmp_path).start()
    b = await GatewayProcess(config(emulator), tmp_path).start()
    try:
        firsts = [conversation(1000 + i, 1)[0] for i in range(60)]
        async with aiohttp.ClientSession() as s:
            on_a = [await post(s, a.url, body) for body in firsts]
            on_b = [await post(s, b.url, body) for body in firsts]
        assert all(status == 200 for status, _ in on_a + on_b)
        same = sum(x[1] == y[1] for x, y in zip(on_a, on_b, strict=True))
        assert same / len(firsts) >= 0.95
        assert len({acct for _, acct in on_a}) >= 3  # and the prefixes are spread out
    finally:
        await a.stop()
        await b.stop()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = start_redis()
    yield server
    stop_redis(server)


async def test_killing_redis_mid_run_loses_no_request(
    tmp_path: Path, emulator: Emulator, own_redis: RedisServer
) -> None:
    a = await GatewayProcess(config(emulator, own_redis.url), tmp_path).start()
    b = await GatewayProcess(config(emulator, own_redis.url), tmp_path).start()
    try:
        convs = [conversation(2000 + i, 6) for i in range(20)]

        def kill_at_round_3(t: int) -> None:
            if t == 3:  # pins and windows are in Redis by now
                own_redis.proc.kill()

        rounds = await run_rounds([a.url, b.url], convs, kill_at_round_3)
        assert own_redis.proc.poll() is not None
        statuses = [status for r in rounds for status, _ in r]
        assert statuses == [200] * len(statuses)
        assert await redis_fallbacks(a.url) > 0
    finally:
        assert "Traceback" not in await a.stop()
        assert "Traceback" not in await b.stop()
