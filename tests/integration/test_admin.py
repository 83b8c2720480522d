"""Operators: runtime tokens (create, rotate, revoke across replicas), budgets, hot reload,
and the admin listener."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from gateway.config import Config, TokenConfig
from gateway.keys import hash_key
from gateway.presets import DEMO_SECRET, emulated_config
from tests.conftest import Emulator, RedisServer, free_port
from tests.procs import GatewayProcess

ADMIN_KEY = "sk-admin-test-key"


def with_admin(config: Config, **extra: Any) -> Config:
    admin = TokenConfig(
        name="ops", key_hash=hash_key(DEMO_SECRET, ADMIN_KEY), group="default", admin=True
    )
    return config.model_copy(update={"tokens": (*config.tokens, admin), **extra})


async def call(
    s: aiohttp.ClientSession, method: str, url: str, key: str, body: Any = None
) -> tuple[int, Any]:
    data = orjson.dumps(body) if body is not None else None
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    async with s.request(method, url, data=data, headers=headers) as r:
        raw = await r.read()
        return r.status, orjson.loads(raw) if raw.startswith((b"{", b"[")) else raw


def chat(text: str = "hello", stream: bool = False, max_tokens: int = 2) -> dict[str, Any]:
    return {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "stream": stream,
    }


async def test_runtime_token_lifecycle_and_revocation_on_another_replica(
    tmp_path: Path, emulator: Emulator, redis_server: RedisServer
) -> None:
    state = {
        "redis_url": redis_server.url,
        "key_prefix": f"adm{free_port()}",
        "redis_socket_timeout": 0.5,
    }
    a = await GatewayProcess(
        with_admin(emulated_config(emulator.url, server={"port": free_port()}, state=state)),
        tmp_path,
    ).start()
    b = await GatewayProcess(
        with_admin(emulated_config(emulator.url, server={"port": free_port()}, state=state)),
        tmp_path,
    ).start()
    try:
        async with aiohttp.ClientSession() as s:
            status, made = await call(
                s,
                "POST",
                a.url + "/admin/tokens",
                ADMIN_KEY,
                {"name": "ci-bot", "group": "default", "rpm": 100},
            )
            assert status == 201, made
            key = made["key"]
            assert "key_hash" not in made
            # Only admins manage tokens.
            assert (await call(s, "GET", a.url + "/admin/tokens", key))[0] == 403
            # The new key works on the other replica once it refreshes (every 2 s).
            deadline = time.monotonic() + 5
            while (await call(s, "POST", b.url + "/v1/chat/completions", key, chat()))[0] != 200:
                assert time.monotonic() < deadline, "replica b never learned the new token"
                await asyncio.sleep(0.2)
            listed = (await call(s, "GET", b.url + "/admin/tokens", ADMIN_KEY))[1]["data"]
            assert [t["name"] for t in listed] == ["ci-bot"]
            # Rotation: the old key stops working, the new one works.
            status, rotated = await call(
                s, "POST", a.url + "/admin/tokens/ci-bot/rotate", ADMIN_KEY
            )
            assert status == 200 and rotated["key"] != key
            assert (await call(s, "POST", a.url + "/v1/chat/completions", key, chat()))[0] == 401
            new_key = rotated["key"]
            assert (await call(s, "POST", a.url + "/v1/chat/completions", new_key, chat()))[
                0
            ] == 200
            # Revocation on a is refused on b within 5 s.
            deadline = time.monotonic() + 5
            while (await call(s, "POST", b.url + "/v1/chat/completions", new_key, chat()))[
                0
            ] != 200:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.2)
            assert (await call(s, "DELETE", a.url + "/admin/tokens/ci-bot", ADMIN_KEY))[0] == 200
            revoked_at = time.monotonic()
            while True:
                status, doc = await call(s, "POST", b.url + "/v1/chat/completions", new_key, chat())
                if status == 401:
                    break
                assert time.monotonic() - revoked_at < 5, (
                    "revocation did not reach replica b in 5 s"
                )
                await asyncio.sleep(0.2)
            assert new_key not in orjson.dumps(doc).decode()
    finally:
        assert "Traceback" not in await a.stop()
        assert "Traceback" not in await b.stop()


async def test_exhausted_budget_is_refused_clearly_and_metered_nowhere(
    tmp_path: Path, emulator: Emulator
) -> None:
    g = await GatewayProcess(
        with_admin(emulated_config(emulator.url, server={"port": free_port()})), tmp_path
    ).start()
    try:
        async with aiohttp.ClientSession() as s:
            status, made = await call(
                s,
                "POST",
                g.url + "/admin/tokens",
                ADMIN_KEY,
                {"name": "tight", "group": "default", "budget_usd_day": 0.000001},
            )
            assert status == 201
            key = made["key"]
            await asyncio.sleep(0.1)
            status, _ = await call(s, "POST", g.url + "/v1/chat/completions", key, chat("x " * 500))
            assert status == 200  # this one spends past the budget
            logs_before = (await call(s, "GET", g.url + "/v1/usage/logs?limit=1000", key))[1][
                "data"
            ]
            status, doc = await call(s, "POST", g.url + "/v1/chat/completions", key, chat())
            assert status == 402
            assert doc["error"]["code"] == "budget_exhausted"
            assert "daily budget" in doc["error"]["message"]
            logs_after = (await call(s, "GET", g.url + "/v1/usage/logs?limit=1000", key))[1]["data"]
            assert logs_after == logs_before  # the refused call is nowhere in the usage log
            async with s.get(g.url + "/metrics") as r:
                metrics = await r.text()
            costs = [x for x in metrics.splitlines() if x.startswith("gateway_cost_usd_total")]
            assert len(costs) == 1  # one priced call, the refused one added no cost series
    finally:
        await g.stop()


def write(path: Path, config: Config) -> None:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))


async def test_sighup_reload_adds_an_account_without_dropping_a_stream(
    tmp_path: Path, emulator: Emulator
) -> None:
    base = with_admin(emulated_config(emulator.url, server={"port": free_port()}, accounts=2))
    g = GatewayProcess(base, tmp_path)
    await g.start()
    assert g.proc is not None
    try:
        async with aiohttp.ClientSession() as s:
            models = (await call(s, "GET", g.url + "/v1/models", "sk-demo"))[1]["data"]
            assert {m["id"] for m in models} == {
                "gpt-4o-mini",
                "text-embedding-3-small",
                "claude-sonnet-4-6",
            }
            stream = await s.post(
                g.url + "/v1/chat/completions",
                data=orjson.dumps(chat("long", stream=True, max_tokens=600)),
                headers={"authorization": "Bearer sk-demo", "content-type": "application/json"},
            )
            assert stream.status == 200
            await stream.content.readline()
            # A valid new config: a third account and a new model.
            bigger = with_admin(
                emulated_config(emulator.url, server={"port": base.server.port}, accounts=3)
            )
            groups = dict(bigger.groups)
            groups["default"] = groups["default"].model_copy(
                update={"models": {**groups["default"].models, "gpt-4.1-mini": "openai"}}
            )
            write(g.path, bigger.model_copy(update={"groups": groups}))
            g.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 5
            while True:
                models = (await call(s, "GET", g.url + "/v1/models", "sk-demo"))[1]["data"]
                if "gpt-4.1-mini" in {m["id"] for m in models}:
                    break
                assert time.monotonic() < deadline, "the new configuration never took effect"
                await asyncio.sleep(0.1)
            seen = set()
            for i in range(30):
                async with s.post(
                    g.url + "/v1/chat/completions",
                    data=orjson.dumps({**chat(f"spread {i} " * 400), "model": "gpt-4.1-mini"}),
                    headers={"authorization": "Bearer sk-demo", "content-type": "application/json"},
                ) as r:
                    assert r.status == 200
                    seen.add(r.headers["x-upstream-account"])
            assert "openai-2" in seen  # the added account takes traffic
            tail = await stream.content.read()  # the stream that was in flight finished
            assert tail.rstrip().endswith(b"data: [DONE]")
            # An invalid config is refused and the gateway keeps serving the old one.
            g.path.write_text("server: {secret: short}\naccounts: []\n")
            g.proc.send_signal(signal.SIGHUP)
            await asyncio.sleep(0.5)
            status, _ = await call(
                s,
                "POST",
                g.url + "/v1/chat/completions",
                "sk-demo",
                {**chat(), "model": "gpt-4.1-mini"},
            )
            assert status == 200
            status, doc = await call(s, "POST", g.url + "/admin/reload", ADMIN_KEY)
            assert status == 400 and "old one stays" in doc["error"]["message"]
    finally:
        err = await g.stop()
        assert "configuration not reloaded" in err
        assert "Traceback" not in err


async def test_admin_routes_and_metrics_only_on_the_admin_port(
    tmp_path: Path, emulator: Emulator
) -> None:
    admin_port = free_port()
    config = with_admin(
        emulated_config(emulator.url, server={"port": free_port(), "admin_port": admin_port})
    )
    g = await GatewayProcess(config, tmp_path).start()
    try:
        async with aiohttp.ClientSession() as s:
            admin = f"http://127.0.0.1:{admin_port}"
            async with s.get(g.url + "/metrics") as r:
                assert r.status == 404
            async with s.get(admin + "/metrics") as r:
                assert r.status == 200 and "gateway_requests_total" in await r.text()
            assert (await call(s, "GET", g.url + "/admin/tokens", ADMIN_KEY))[0] == 404
            assert (await call(s, "GET", admin + "/admin/tokens", ADMIN_KEY))[0] == 200
            assert (await call(s, "POST", admin + "/v1/chat/completions", "sk-demo", chat()))[
                0
            ] == 404
            assert (await call(s, "POST", g.url + "/v1/chat/completions", "sk-demo", chat()))[
                0
            ] == 200
    finally:
        await g.stop()


async def cli(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()


async def test_tokens_cli_drives_the_admin_api(tmp_path: Path, emulator: Emulator) -> None:
    g = await GatewayProcess(
        with_admin(emulated_config(emulator.url, server={"port": free_port()})), tmp_path
    ).start()
    try:
        admin = ("tokens", "--url", g.url, "--admin-key", ADMIN_KEY)
        code, out = await cli(
            *admin, "create", "--name", "cli-made", "--group", "default", "--rpm", "5"
        )
        assert code == 0
        key = orjson.loads(out)["key"]
        async with aiohttp.ClientSession() as s:
            assert (await call(s, "POST", g.url + "/v1/chat/completions", key, chat()))[0] == 200
            code, out = await cli(*admin, "list")
            assert code == 0 and key not in out and "cli-made" in out
            assert (await cli(*admin, "revoke", "cli-made"))[0] == 0
            assert (await call(s, "POST", g.url + "/v1/chat/completions", key, chat()))[0] == 401
        assert (await cli(*admin, "revoke", "cli-made"))[0] == 1  # gone already
    finally:
        await g.stop()
