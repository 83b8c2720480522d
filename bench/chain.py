"""The gateway's own work per request: the whole ASGI chain in process, no sockets.

Every middleware and the upstream app run as in `affinity-gateway serve`; only the
aiohttp session is replaced by one that replays answers recorded once from an in-process
emulator (the same bytes, one message per SSE event, as the provider sends them), and
uvicorn by a loop that calls the app. What is left out - uvicorn, aiohttp, the sockets -
is the `asgi-floor` row of `bench.overhead`; what this measures is the rest of the
gateway's CPU per request, exactly, on a machine too noisy for wall-clock latencies.

    .venv/bin/python -m bench.chain [--requests 600] [--repeat 5] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import pstats
import statistics
import sys
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy
from starlette.types import Message

from bench.overhead import ANTHROPIC_VERSION, OUTPUT_TOKENS, Request, complete_answer, workload
from gateway.app import Gateway
from gateway.emulator.app import EmulatorApp
from gateway.emulator.config import LatencySpec, default_config
from gateway.presets import DEMO_KEY, emulated_config
from gateway.table import render
from gateway.upstream import UpstreamApp

EMULATOR_URL = "http://emulator.invalid"


@dataclass(slots=True)
class Recorded:
    status: int
    headers: list[tuple[bytes, bytes]]
    chunks: list[bytes]  # one per ASGI body message the emulator sent


class _Content:
    def __init__(self, chunks: Sequence[bytes]) -> None:
        self._chunks = chunks
        self._eof = False

    async def iter_any(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks:
            yield chunk
        self._eof = True

    async def read(self, n: int = -1) -> bytes:
        self._eof = True
        return b"".join(self._chunks)

    def at_eof(self) -> bool:
        return self._eof


class _Response:
    """What UpstreamApp reads of an aiohttp ClientResponse."""

    def __init__(self, recorded: Recorded) -> None:
        self.status = recorded.status
        self.raw_headers = tuple(recorded.headers)
        self.headers = CIMultiDictProxy(
            CIMultiDict((k.decode(), v.decode()) for k, v in recorded.headers)
        )
        self.content = _Content(recorded.chunks)

    async def read(self) -> bytes:
        return await self.content.read()

    def release(self) -> None:
        pass

    def close(self) -> None:
        pass


class ReplaySession:
    """Stands in for the aiohttp session: the first request of each shape (endpoint,
    streamed) goes to an in-process emulator and is recorded; every later one of that
    shape gets the recording back."""

    def __init__(self) -> None:
        config = default_config(
            accounts=4,
            latency=LatencySpec(base_ms=0, prefill_ms_per_1k_uncached=0, decode_ms_per_token=0),
            default_output_tokens=OUTPUT_TOKENS,
        )
        self.emulator = EmulatorApp(config)
        self.recorded: dict[tuple[str, bool], Recorded] = {}

    async def post(self, url: str, *, data: bytes, headers: Sequence[tuple[str, str]]) -> _Response:
        path = url[len(EMULATOR_URL) :]
        shape = (path, b'"stream":true' in data)
        if shape not in self.recorded:
            self.recorded[shape] = await self._record(path, data, headers)
        return _Response(self.recorded[shape])

    async def _record(self, path: str, body: bytes, headers: Sequence[tuple[str, str]]) -> Recorded:
        scope = {
            "type": "http",
            "method": "POST",
            "path": path,
            "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
        }
        sent: list[Message] = []
        done = False

        async def receive() -> Message:
            nonlocal done
            if done:
                await asyncio.Event().wait()
            done = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: Message) -> None:
            sent.append(message)

        await self.emulator(scope, receive, send)
        start = sent[0]
        chunks = [m["body"] for m in sent[1:] if m.get("body")]
        return Recorded(start["status"], list(start.get("headers", ())), chunks)


class _Client:
    """The UpstreamClient's face: a session and the timeouts."""

    def __init__(self, real: Any, session: ReplaySession) -> None:
        self.timeouts = real.timeouts
        self.session = session


async def _call(app: Gateway, request: Request) -> tuple[int, bytes]:
    headers = [
        (b"host", b"gateway"),
        (b"authorization", b"Bearer " + DEMO_KEY.encode()),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(request.body)).encode()),
    ]
    if request.path == "/v1/messages":
        headers.append((b"anthropic-version", ANTHROPIC_VERSION.encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8080),
        "state": {},
    }
    delivered = False
    status = 0
    body: list[bytes] = []

    async def receive() -> Message:
        nonlocal delivered
        if delivered:
            await asyncio.Event().wait()  # the client stays; the watcher is cancelled
        delivered = True
        return {"type": "http.request", "body": request.body, "more_body": False}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        else:
            body.append(message.get("body", b""))

    await app(scope, receive, send)
    return status, b"".join(body)


async def build() -> Gateway:
    config = emulated_config(EMULATOR_URL, accounts=4)
    app = Gateway(config)
    await app.start()
    session = ReplaySession()
    # Only the terminal app's session changes; the chain is the configured one.
    terminal = _terminal(app)
    terminal.client = _Client(terminal.client, session)  # type: ignore[assignment]
    return app


def _terminal(app: Gateway) -> UpstreamApp:
    layer: Any = app.proxy
    while not isinstance(layer, UpstreamApp):
        layer = layer.app
    return layer


async def run(requests: Sequence[Request], repeat: int, profile: bool) -> list[float]:
    """Microseconds of CPU per request, one figure per repeat (a fresh gateway each)."""
    out = []
    profiler = cProfile.Profile() if profile else None
    for _ in range(repeat):
        app = await build()
        shapes = {(r.path, r.stream): r for r in requests}
        for request in shapes.values():  # record every shape outside the measurement
            await _call(app, request)
        gc.collect()
        t0 = time.process_time()
        if profiler is not None:
            profiler.enable()
        for request in requests:
            status, body = await _call(app, request)
            if status != 200 or not complete_answer(request, body):
                raise RuntimeError(f"{request.path}: status {status}, {body[-160:]!r}")
        if profiler is not None:
            profiler.disable()
        out.append((time.process_time() - t0) / len(requests) * 1e6)
        await app.aclose()
    if profiler is not None:
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(40)
    return out


def _run(main: Coroutine[Any, Any, list[float]]) -> list[float]:
    """On uvloop when it is installed, as `affinity-gateway serve` runs."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.chain", description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=600)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="cProfile (slows it), to stderr")
    a = p.parse_args(argv)
    requests = workload(a.requests)
    by_shape: dict[str, list[Request]] = {}
    for r in requests:
        kind = "messages" if r.path == "/v1/messages" else "chat"
        by_shape.setdefault(f"{kind} {'stream' if r.stream else 'json'}", []).append(r)
    rows: list[list[object]] = []
    for name, subset in [("all", requests), *sorted(by_shape.items())]:
        figures = _run(run(subset, a.repeat, a.profile and name == "all"))
        rows.append([name, len(subset), f"{statistics.median(figures):.0f}", f"{min(figures):.0f}"])
    print(f"the gateway's chain in process, {a.repeat} repeats (a fresh gateway each)")
    print(render(["requests", "n", "CPU µs/req (median)", "min"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
