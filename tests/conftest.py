"""Shared fixtures: real servers on 127.0.0.1, run on a background event loop so that
blocking SDK clients in the tests can talk to them."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import pytest

from gateway.app import Gateway, create_app
from gateway.config import Config
from gateway.emulator import EmulatorConfig, EmulatorServer, LatencySpec, default_config
from gateway.presets import DEMO_KEY, emulated_config
from gateway.serving import AppServer

T = TypeVar("T")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="run benchmark-grade tests")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


class LoopThread:
    """An event loop on a daemon thread; `run` executes a coroutine there and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@dataclass
class Emulator:
    server: EmulatorServer
    lt: LoopThread

    @property
    def url(self) -> str:
        return self.server.url

    def call(self, method: str, path: str, payload: Any = None) -> Any:
        async def go() -> Any:
            async with (
                aiohttp.ClientSession() as s,
                s.request(method, self.url + path, json=payload) as r,
            ):
                r.raise_for_status()
                return await r.json()

        return self.lt.run(go())

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call("GET", "/stats")
        return result

    def requests(self) -> list[dict[str, Any]]:
        result: Any = self.call("GET", "/debug/requests")
        return list(result["requests"] if isinstance(result, dict) else result)

    def faults(self, account: str, **spec: Any) -> None:
        self.call("POST", "/control/faults", {"account": account, **spec})

    def reset(self, accounts: int) -> None:
        for i in range(accounts):
            self.faults(f"acct-{i}")
        self.call("POST", "/stats/reset")


def emulator_config(accounts: int = 4, **kw: Any) -> EmulatorConfig:
    return default_config(
        accounts,
        latency=LatencySpec(base_ms=2.0, prefill_ms_per_1k_uncached=0.5, decode_ms_per_token=1.0),
        **kw,
    )


@pytest.fixture(scope="session")
def emulator(loop_thread: LoopThread) -> Iterator[Emulator]:
    server = EmulatorServer(emulator_config())
    loop_thread.run(server.start())
    yield Emulator(server, loop_thread)
    loop_thread.run(server.stop())


@dataclass
class GatewayHandle:
    server: AppServer
    app: Gateway
    lt: LoopThread
    key: str = DEMO_KEY

    @property
    def url(self) -> str:
        return self.server.url

    def stop(self) -> None:
        self.lt.run(self.server.stop())


def start_gateway(lt: LoopThread, config: Config) -> GatewayHandle:
    app = create_app(config)
    server = AppServer(app)
    lt.run(server.start())
    return GatewayHandle(server, app, lt)


@pytest.fixture(scope="session")
def gateway(loop_thread: LoopThread, emulator: Emulator) -> Iterator[GatewayHandle]:
    handle = start_gateway(
        loop_thread, emulated_config(emulator.url, tokens={"demo": DEMO_KEY, "other": "sk-other"})
    )
    yield handle
    handle.stop()


@pytest.fixture
def clean_emulator(emulator: Emulator) -> Iterator[Emulator]:
    emulator.reset(4)
    yield emulator
    emulator.reset(4)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RedisServer:
    proc: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def start_redis() -> RedisServer:
    """A private redis-server on a free port (no persistence); the caller stops it."""
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is required in CI")
        pytest.skip("redis-server is not installed")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            time.sleep(0.05)
    return RedisServer(proc, port)


def stop_redis(server: RedisServer) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGCONT)  # in case a test left it frozen
        server.proc.terminate()
    server.proc.wait(5)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = start_redis()
    yield server
    stop_redis(server)


@pytest.fixture(autouse=True)
def close_sdk_clients(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Close every sync openai / anthropic client a test made, so their pooled sockets
    are not left for the garbage collector (a ResourceWarning at interpreter exit)."""
    import anthropic
    import openai

    made: list[Any] = []
    for cls in (openai.OpenAI, anthropic.Anthropic):
        original = cls.__init__

        def init(self: Any, *args: Any, _original: Any = original, **kwargs: Any) -> None:
            _original(self, *args, **kwargs)
            made.append(self)

        monkeypatch.setattr(cls, "__init__", init)
    yield
    for client in made:
        client.close()
