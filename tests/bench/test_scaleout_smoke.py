"""Smoke test of the scale-out benchmark: the first 200 requests of the Mooncake trace
through one gateway process, one on Redis, and replicas behind a real load balancer (one
of them killed mid-run), every row side by side. Behaviour, not timings.

Needs nginx or haproxy and redis-server: skipped without them, failed under CI.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from bench import scaleout
from bench.common import AccountLimits, EmulatorProcess, Setup, emulator_config
from gateway.presets import DEMO_KEY

REQUESTS = 200  # ~72 emulated seconds of the trace
TIME_SCALE = 30  # ~2.5 s a row
INSTALL = "apt-get install -y --no-install-recommends nginx haproxy redis-server"


def _need(binary: str) -> None:
    if scaleout.find_binary(binary) is not None:
        return
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"{binary} is required in CI ({INSTALL})")
    pytest.skip(f"{binary} is not installed ({INSTALL})")


def _run(tmp_path: Path, *args: str) -> tuple[int, dict[str, dict[str, Any]], str]:
    out = tmp_path / "scaleout.json"
    code = scaleout.main(
        [
            *("--limit", str(REQUESTS), "--time-scale", str(TIME_SCALE)),
            *("--json", str(out), "--quiet", *args),
        ]
    )
    doc = orjson.loads(out.read_bytes()) if out.exists() else {"rows": []}
    return code, {row["row"]: row for row in doc["rows"]}, str(doc.get("lb", ""))


def test_every_row_with_three_replicas(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _need("nginx")
    _need("redis-server")
    code, rows, _ = _run(tmp_path, "--replicas", "3", "--lb", "nginx")
    printed = capsys.readouterr().out
    assert set(rows) == set(scaleout.ROWS), printed
    table = printed.split("\n\n")[1]
    for name in scaleout.ROWS:
        assert any(line.split()[:1] == [name] for line in table.splitlines()), printed

    for name in ("single", "single-redis", "replicas"):
        row = rows[name]
        assert row["requests"] == REQUESTS, printed
        assert row["errors"] == 0, f"{name} had errors:\n{printed}"
        assert row["prompt_tokens"] > 0, printed
    # Round robin: every replica answered its share.
    per_replica = rows["replicas"]["per_replica"]
    assert len(per_replica) == 3 and min(per_replica) > 0, printed

    # The killed replica costs at most the requests it had in flight, each named by the
    # load balancer's log.
    killed = rows["replicas-kill"]
    kill = killed["kill"]
    assert isinstance(kill, dict), printed
    assert killed["requests"] == REQUESTS
    assert killed["lost"] == 0 and kill["unlogged"] == 0, printed
    assert killed["errors"] == kill["failed_in_flight"] <= kill["in_flight"], printed
    assert code == 0, printed


@pytest.mark.parametrize("kind", scaleout.LB_KINDS)
def test_kill_row_with_two_replicas_behind(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _need(kind)
    _need("redis-server")
    code, rows, lb = _run(tmp_path, "--replicas", "2", "--lb", kind, "--rows", "replicas-kill")
    printed = capsys.readouterr().out
    assert lb == kind
    assert set(rows) == {"replicas-kill"}, printed
    row = rows["replicas-kill"]
    kill = row["kill"]
    assert row["requests"] == REQUESTS, printed
    assert row["errors"] == kill["failed_in_flight"] + kill["failed_beyond"], printed
    # Nothing is lost but requests the dying replica had: named by the LB's log as in
    # flight on it, or (haproxy closes the client connection of a request in flight on a
    # dying replica without a log line) absent from the log and in flight at the kill.
    assert kill["failed_beyond"] == kill["unlogged_in_flight"], printed
    if kind == "nginx":
        assert kill["unlogged"] == 0 and row["lost"] == 0 and code == 0, printed


async def _stream_through(lb: scaleout.LoadBalancer, session: aiohttp.ClientSession) -> list[float]:
    """When each SSE event of one streamed completion reached the client."""
    body = {
        "model": "gpt-4o-mini",
        "stream": True,
        "max_tokens": 48,
        "messages": [{"role": "user", "content": "stream through the load balancer"}],
    }
    headers = {"authorization": f"Bearer {DEMO_KEY}"}
    async with session.post(lb.url + "/v1/chat/completions", json=body, headers=headers) as r:
        assert r.status == 200, await r.text()
        assert r.headers["content-type"].startswith("text/event-stream")
        t0 = time.monotonic()
        return [time.monotonic() - t0 async for line in r.content if line.startswith(b"data:")]


@pytest.mark.parametrize("kind", scaleout.LB_KINDS)
async def test_lb_passes_sse_unbuffered(kind: str, tmp_path: Path) -> None:
    """Through the generated configuration a stream arrives event by event, not at once."""
    _need(kind)
    binary = scaleout.find_binary(kind)
    assert binary is not None
    setup = Setup(accounts=2, limits=AccountLimits(rpm=1000, itpm=10_000_000), time_scale=1.0)
    async with EmulatorProcess(emulator_config(setup, 2, setup.limits)) as emulator:
        port = scaleout.free_port()
        path = tmp_path / "gateway.yaml"
        scaleout.write_gateway_config(path, emulator.url, setup, {})
        argv = scaleout.gateway_argv(path, port)
        gateway = scaleout.Child("gw0", argv, tmp_path, cwd=scaleout.ROOT)
        lb = scaleout.LoadBalancer(kind, binary, tmp_path, [f"127.0.0.1:{port}"])
        try:
            async with aiohttp.ClientSession() as session:
                gateway.start()
                addr = f"127.0.0.1:{port}"
                await scaleout.wait_ready(gateway, scaleout.readyz_check(session, addr))
                await lb.start(session)
                arrivals = await asyncio.wait_for(_stream_through(lb, session), 30)
        finally:
            lb.stop()
            gateway.stop()
    # 48 tokens at the emulator's 4 ms each: ~0.2 s between the first and the last event.
    assert len(arrivals) >= 10, arrivals
    assert arrivals[-1] - arrivals[0] > 0.1, arrivals
