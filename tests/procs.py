"""Gateways as real `affinity-gateway serve` processes, for replica and signal tests."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import aiohttp
import yaml

from gateway.config import Config


class GatewayProcess:
    def __init__(
        self, config: Config, workdir: Path, *extra: str, options: tuple[str, ...] = ()
    ) -> None:
        self.config = config
        self.port = config.server.port
        self.url = f"http://127.0.0.1:{self.port}"
        self.path = workdir / f"gateway-{self.port}.yaml"
        self.path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
        self.extra = extra
        self.options = options  # before the subcommand, e.g. ("--log-level", "debug")
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> GatewayProcess:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            *self.options,
            "serve",
            "--config",
            str(self.path),
            *self.extra,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.monotonic() + 20
        async with aiohttp.ClientSession() as s:
            while time.monotonic() < deadline:
                assert self.proc.returncode is None, "the gateway exited during startup"
                try:
                    async with s.get(self.url + "/readyz") as r:
                        if r.status == 200:
                            return self
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise AssertionError("the gateway did not become ready")

    async def stop(self) -> str:
        """Stop it (if still running) and return what it wrote to stderr."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        assert self.proc.stderr is not None
        return (await self.proc.stderr.read()).decode()
