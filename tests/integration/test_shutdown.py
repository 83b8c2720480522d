"""SIGTERM on a real `affinity-gateway serve` process with streams in flight."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest
import yaml

from gateway.emulator import EmulatorServer, LatencySpec, default_config
from gateway.presets import DEMO_KEY, emulated_config
from tests.conftest import Emulator, LoopThread, free_port

DRAIN = 1.5


def write_config(tmp_path: Path, emulator_url: str, port: int) -> Path:
    config = emulated_config(emulator_url, server={"port": port})
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return path


async def wait_ready(url: str, proc: asyncio.subprocess.Process) -> None:
    deadline = time.monotonic() + 20
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            assert proc.returncode is None, "the gateway exited during startup"
            try:
                async with s.get(url + "/readyz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError("the gateway did not become ready")


@pytest.fixture
def slow_emulator(loop_thread: LoopThread) -> Iterator[Emulator]:
    """20 ms per output token: a 4,000-token stream outlives any drain deadline."""
    server = EmulatorServer(
        default_config(4, latency=LatencySpec(base_ms=1, decode_ms_per_token=20))
    )
    loop_thread.run(server.start())
    yield Emulator(server, loop_thread)
    loop_thread.run(server.stop())


async def test_sigterm_drains_streams_and_exits_zero(
    tmp_path: Path, slow_emulator: Emulator
) -> None:
    emulator = slow_emulator
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = await asyncio.create_subprocess_exec(
        *[
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--config",
            str(write_config(tmp_path, emulator.url, port)),
            "--drain-seconds",
            str(DRAIN),
            "--shutdown-delay",
            "0.5",
        ],
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        await wait_ready(url, proc)
        headers = {"authorization": f"Bearer {DEMO_KEY}", "content-type": "application/json"}
        # 18 streams far longer than the drain deadline, 2 that finish inside it.
        bodies = [
            orjson.dumps(
                {
                    "model": "gpt-4o-mini",
                    "messages": [{"role": "user", "content": f"stream {i}"}],
                    "max_tokens": 4000 if i >= 2 else 5,
                    "stream": True,
                }
            )
            for i in range(20)
        ]
        async with aiohttp.ClientSession() as s:
            responses = [
                await s.post(url + "/v1/chat/completions", data=b, headers=headers) for b in bodies
            ]
            for r in responses:
                assert r.status == 200
                assert (await r.content.readline()).startswith(b"data: ")
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            async with aiohttp.ClientSession() as probe, probe.get(url + "/readyz") as ready:
                assert ready.status == 503
            tails = [await r.content.read() for r in responses]
            elapsed = time.monotonic() - signalled
        finished = [t for t in tails if b"data: [DONE]" in t]
        cut = [t for t in tails if b'"error"' in t]
        assert len(finished) == 2
        assert len(cut) == 18
        for t in cut:
            # Exactly one terminal error event, and it is the last thing on the stream.
            assert t.count(b'"error"') == 1
            last = t.strip().rsplit(b"\n\n", 1)[-1]
            assert orjson.loads(last.removeprefix(b"data: "))["error"]["message"].startswith(
                "the gateway is shutting down"
            )
        assert elapsed < DRAIN + 2
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        assert proc.stderr is not None
        err = (await proc.stderr.read()).decode()
        assert "Traceback" not in err, err
