"""Redis faults under traffic, and a canary run: no key in any log, metric or error."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from gateway.presets import DEMO_KEY, emulated_config
from tests.conftest import Emulator, RedisServer, free_port, start_redis, stop_redis
from tests.procs import GatewayProcess

HEADERS = {"authorization": f"Bearer {DEMO_KEY}", "content-type": "application/json"}


def body(i: int) -> bytes:
    system = f"Tenant {i % 5}. " + "Follow the house style. " * 300
    return orjson.dumps(
        {
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": f"q{i}"},
            ],
            "max_tokens": 2,
        }
    )


async def metric(url: str, name: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        text = await r.text()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


async def traffic(url: str, n: int, concurrency: int = 8) -> list[tuple[int, float]]:
    gate = asyncio.Semaphore(concurrency)

    async def one(s: aiohttp.ClientSession, i: int) -> tuple[int, float]:
        async with gate:
            t0 = time.monotonic()
            async with s.post(url + "/v1/chat/completions", data=body(i), headers=HEADERS) as r:
                await r.read()
                return r.status, time.monotonic() - t0

    async with aiohttp.ClientSession() as s:
        return await asyncio.gather(*(one(s, i) for i in range(n)))


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = start_redis()
    yield server
    stop_redis(server)


async def test_frozen_redis_costs_at_most_a_timeout_and_recovers(
    tmp_path: Path, emulator: Emulator, own_redis: RedisServer
) -> None:
    config = emulated_config(
        emulator.url, server={"port": free_port()}, state={"redis_url": own_redis.url}
    )
    g = await GatewayProcess(config, tmp_path).start()
    try:
        before = await traffic(g.url, 40)
        assert {s for s, _ in before} == {200}
        own_redis.proc.send_signal(signal.SIGSTOP)  # frozen: connections hang, nothing answers
        frozen = await traffic(g.url, 80)
        assert {s for s, _ in frozen} == {200}  # no error caused by Redis
        # The circuit opens after the first timeouts: no request waits on Redis for long.
        assert max(t for _, t in frozen) < 2.0
        assert await metric(g.url, "gateway_redis_fallbacks_total") > 0
        assert await metric(g.url, "gateway_redis_circuit_open") == 1.0
        own_redis.proc.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 15
        while await metric(g.url, "gateway_redis_circuit_open") != 0.0:
            assert time.monotonic() < deadline, "the circuit never closed after SIGCONT"
            await traffic(g.url, 4)
            await asyncio.sleep(0.2)
        after = await traffic(g.url, 20)
        assert {s for s, _ in after} == {200}
    finally:
        own_redis.proc.send_signal(signal.SIGCONT)
        assert "Traceback" not in await g.stop()


async def test_gateway_started_with_redis_down_serves(tmp_path: Path, emulator: Emulator) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    config = emulated_config(emulator.url, server={"port": free_port()}, state={"redis_url": dead})
    g = await GatewayProcess(config, tmp_path).start()
    try:
        results = await traffic(g.url, 20)
        assert {s for s, _ in results} == {200}
        assert await metric(g.url, "gateway_redis_fallbacks_total") > 0
    finally:
        assert "Traceback" not in await g.stop()


async def test_canary_no_key_in_logs_metrics_or_error_bodies(
    tmp_path: Path, emulator: Emulator
) -> None:
    canaries = [DEMO_KEY, "sk-emu-0", "sk-emu-1", "sk-emu-2", "sk-emu-3", "sk-guess-canary-9f3"]
    config = emulated_config(emulator.url, server={"port": free_port()})
    g = await GatewayProcess(config, tmp_path, options=("--log-level", "debug")).start()
    bodies: list[bytes] = []
    try:
        # Provider errors that quote the account key: they must be redacted.
        for i in range(4):
            emulator.faults(
                f"acct-{i}",
                error_rate=1.0,
                status=400,
                body='{"error":{"message":"Incorrect API key provided: '
                f'sk-emu-{i}","type":"invalid_request_error"}}}}',
            )
        async with aiohttp.ClientSession() as s:
            for i in range(12):
                async with s.post(
                    g.url + "/v1/chat/completions", data=body(i), headers=HEADERS
                ) as r:
                    bodies.append(await r.read())
            for path, key, data in (
                ("/v1/chat/completions", "sk-guess-canary-9f3", body(0)),  # a wrong key
                ("/v1/messages", DEMO_KEY, b"{broken"),
                ("/v1/chat/completions", DEMO_KEY, b'{"model":"nope","messages":[]}'),
            ):
                headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
                async with s.post(g.url + path, data=data, headers=headers) as r:
                    assert r.status >= 400
                    bodies.append(await r.read())
            async with s.get(g.url + "/metrics") as r:
                bodies.append(await r.read())
        assert any(b'"error"' in b for b in bodies)
    finally:
        for i in range(4):
            emulator.faults(f"acct-{i}")
        logs = await g.stop()
    seen = b"".join(bodies).decode(errors="replace") + logs
    assert "DEBUG" in logs or "INFO" in logs  # the logs were really captured
    for canary in canaries:
        assert canary not in seen, f"{canary} leaked"
