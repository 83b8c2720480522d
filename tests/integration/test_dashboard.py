"""GET /v1/cache/stats and the /dashboard page that renders it, in headless Chromium."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path

import aiohttp
import openai
import orjson
import pytest

from tests.conftest import GatewayHandle

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
SYSTEM = "You answer questions about prompt caching. " * 300


def _warm(gw: GatewayHandle, key: str, n: int) -> None:
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)
    for i in range(n):
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"q{i}"}],
            max_tokens=2,
        )


async def _stats(gw: GatewayHandle, key: str) -> dict[str, object]:
    async with (
        aiohttp.ClientSession() as s,
        s.get(gw.url + "/v1/cache/stats", headers={"authorization": f"Bearer {key}"}) as r,
    ):
        assert r.status == 200
        doc: dict[str, object] = orjson.loads(await r.read())
        return doc


async def test_cache_stats_count_this_tokens_cached_and_uncached(gateway: GatewayHandle) -> None:
    before = await _stats(gateway, "sk-other")
    _warm(gateway, "sk-other", 3)
    after = await _stats(gateway, "sk-other")
    t0, t1 = before["totals"], after["totals"]
    assert isinstance(t0, dict) and isinstance(t1, dict)
    assert t1["requests"] == t0["requests"] + 3
    assert t1["cached_tokens"] > t0["cached_tokens"]  # the 2nd and 3rd calls hit the cache
    assert t1["savings_usd"] > t0["savings_usd"]
    model = after["by_model"]["gpt-4o-mini"]  # type: ignore[index]
    assert 0 < model["hit_ratio"] < 1
    assert model["cached_tokens"] + model["uncached_tokens"] == model["prompt_tokens"]


async def test_cache_stats_need_a_key(gateway: GatewayHandle) -> None:
    async with aiohttp.ClientSession() as s, s.get(gateway.url + "/v1/cache/stats") as r:
        assert r.status == 401


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    if os.environ.get("CI"):
        pytest.fail("chromium is required in CI")
    pytest.skip("chromium is not installed")


async def _run_chromium(*args: str) -> tuple[bytes, bytes]:
    with tempfile.TemporaryDirectory() as profile:
        proc = await asyncio.create_subprocess_exec(
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=10000",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    return out, err


async def test_dashboard_renders_in_headless_chromium(gateway: GatewayHandle) -> None:
    _warm(gateway, "sk-demo", 2)
    url = f"{gateway.url}/dashboard#key={gateway.key}"
    dom, log = await _run_chromium("--dump-dom", url)
    assert b'data-loaded="true"' in dom, log.decode(errors="replace")[-2000:]
    assert b"token hit ratio" in dom
    assert b"gpt-4o-mini" in dom
    console = [line for line in log.decode(errors="replace").splitlines() if "CONSOLE" in line]
    assert console == [], console
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    shot.unlink(missing_ok=True)
    await _run_chromium(f"--screenshot={shot}", "--window-size=1200,900", url)
    assert shot.stat().st_size > 10_000
