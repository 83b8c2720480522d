"""Failover, health, streams and cancellation end to end: real uvicorn, the provider
emulator with injected faults, a fresh gateway per test (health is per process).

Every test checks what the client sees and what the gateway counted."""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import orjson
import pytest
from starlette.types import Message, Receive, Scope, Send

from gateway.config import Config, FailoverConfig, Timeouts
from gateway.context import Endpoint
from gateway.presets import emulated_config
from gateway.serving import AppServer
from gateway.sse import SSEEvent, SSEParser
from gateway.upstream import Account, UpstreamApp, UpstreamClient
from tests.asgi import make_ctx, make_scope
from tests.conftest import Emulator, GatewayHandle, LoopThread, start_gateway

LONG_SYSTEM = "You answer questions about failover, briefly and exactly. " * 250  # ~3.5k tokens

FAMILIES = {
    "openai": ("/v1/chat/completions", "openai"),
    "anthropic": ("/v1/messages", "anthropic"),
}


def body(family: str, question: str, *, stream: bool = False, max_tokens: int = 8) -> bytes:
    if family == "anthropic":
        doc: dict[str, Any] = {
            "model": "claude-sonnet-4-6",
            "system": LONG_SYSTEM,
            "messages": [{"role": "user", "content": question}],
        }
    else:
        doc = {
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": LONG_SYSTEM},
                {"role": "user", "content": question},
            ],
        }
    return orjson.dumps({**doc, "max_tokens": max_tokens, "stream": stream})


def emu(account: str) -> str:
    """The emulator account behind a gateway account (openai-2 and anthropic-2 are acct-2)."""
    return "acct-" + account.rsplit("-", 1)[1]


class Reply:
    def __init__(self, status: int, headers: dict[str, str], raw: bytes, seconds: float) -> None:
        self.status = status
        self.headers = headers
        self.raw = raw
        self.seconds = seconds

    def json(self) -> Any:
        return orjson.loads(self.raw)

    def events(self) -> list[SSEEvent]:
        return [e for e in SSEParser().feed(self.raw) if e.data]


def served(gw: GatewayHandle) -> float:
    """Requests the gateway has finished with (metering counts them last)."""
    return sum(
        s.value
        for metric in gw.app.metrics.registry.collect()
        if metric.name == "gateway_requests"
        for s in metric.samples
        if s.name.endswith("_total")
    )


async def post(gw: GatewayHandle, family: str, payload: bytes) -> Reply:
    """One request; returns once the gateway has also finished its accounting."""
    path = FAMILIES[family][0]
    before = served(gw)
    t0 = time.monotonic()
    async with (
        aiohttp.ClientSession() as s,
        s.post(gw.url + path, data=payload, headers=_auth(gw)) as r,
    ):
        raw = await r.read()
        headers = {k.lower(): v for k, v in r.headers.items()}
        reply = Reply(r.status, headers, raw, time.monotonic() - t0)
    await until(lambda: served(gw) > before)
    return reply


def _auth(gw: GatewayHandle) -> dict[str, str]:
    return {"authorization": f"Bearer {gw.key}", "content-type": "application/json"}


def attempts(gw: GatewayHandle) -> dict[tuple[str, str], float]:
    """(account, outcome) -> upstream attempts, from the gateway's metrics registry."""
    out: dict[tuple[str, str], float] = {}
    for metric in gw.app.metrics.registry.collect():
        if metric.name == "gateway_upstream_attempts":
            for s in metric.samples:
                if s.name.endswith("_total") and s.value:
                    out[s.labels["account"], s.labels["outcome"]] = s.value
    return out


def emu_requests(emulator: Emulator) -> dict[str, int]:
    return {n: a["requests"] for n, a in emulator.stats()["accounts"].items()}


StartGateway = Callable[..., GatewayHandle]


@pytest.fixture
def new_gateway(loop_thread: LoopThread, clean_emulator: Emulator) -> Iterator[StartGateway]:
    """Start gateways over the emulator (any config); all are stopped after the test."""
    handles: list[GatewayHandle] = []

    def start(config: Config | None = None, **kw: Any) -> GatewayHandle:
        handle = start_gateway(loop_thread, config or emulated_config(clean_emulator.url, **kw))
        handles.append(handle)
        return handle

    yield start
    for handle in handles:
        handle.stop()


async def first_pick(gw: GatewayHandle, emulator: Emulator, family: str, question: str) -> str:
    """The account this prompt is pinned to (it will be the first candidate next time)."""
    reply = await post(gw, family, body(family, question))
    assert reply.status == 200
    emulator.call("POST", "/stats/reset")
    return reply.headers["x-upstream-account"]


# --- retry before the first byte, on the next candidate ----------------------------------


@pytest.mark.parametrize("family", ["openai", "anthropic"])
async def test_503_then_200_on_another_account(
    new_gateway: StartGateway, clean_emulator: Emulator, family: str
) -> None:
    gw = new_gateway()
    pick = await first_pick(gw, clean_emulator, family, "fail over")
    before = attempts(gw)
    clean_emulator.faults(emu(pick), error_rate=1.0, status=503)
    reply = await post(gw, family, body(family, "fail over"))
    assert reply.status == 200
    other = reply.headers["x-upstream-account"]
    assert other != pick and other.startswith(family)
    counted = attempts(gw)
    assert counted[pick, "status_503"] == before.get((pick, "status_503"), 0) + 1
    assert counted[other, "ok"] == before.get((other, "ok"), 0) + 1
    seen = emu_requests(clean_emulator)
    assert seen[emu(pick)] == 1 and seen[emu(other)] == 1 and sum(seen.values()) == 2


@pytest.mark.parametrize("status", [400, 404, 413, 422])
async def test_caller_errors_are_not_retried(
    new_gateway: StartGateway, clean_emulator: Emulator, status: int
) -> None:
    gw = new_gateway()
    pick = await first_pick(gw, clean_emulator, "openai", "client error")
    clean_emulator.faults(emu(pick), error_rate=1.0, status=status)
    reply = await post(gw, "openai", body("openai", "client error"))
    assert reply.status == status
    assert sum(emu_requests(clean_emulator).values()) == 1
    counted = attempts(gw)
    assert counted[pick, f"status_{status}"] == 1
    assert sum(v for (_, outcome), v in counted.items() if outcome != "ok") == 1


async def test_connection_refused_fails_over(
    new_gateway: StartGateway, clean_emulator: Emulator
) -> None:
    probe = new_gateway()
    pick = await first_pick(probe, clean_emulator, "openai", "refused")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    config = emulated_config(clean_emulator.url)
    accounts = [
        a.model_copy(update={"base_url": dead}) if a.name == pick else a for a in config.accounts
    ]
    gw = new_gateway(config.model_copy(update={"accounts": accounts}))
    reply = await post(gw, "openai", body("openai", "refused"))  # same HRW order, no pins
    assert reply.status == 200
    assert reply.headers["x-upstream-account"] != pick
    counted = attempts(gw)
    assert counted[pick, "connect_error"] == 1
    assert sum(counted.values()) == 2


async def test_first_byte_timeout_fails_over_and_closes_the_slow_attempt(
    new_gateway: StartGateway, clean_emulator: Emulator
) -> None:
    gw = new_gateway(server={"timeouts": {"first_byte": 0.3}})
    pick = await first_pick(gw, clean_emulator, "openai", "slow one")
    clean_emulator.faults(emu(pick), stall_seconds=3)
    reply = await post(gw, "openai", body("openai", "slow one"))
    assert reply.status == 200 and reply.seconds < 2
    assert reply.headers["x-upstream-account"] != pick
    assert attempts(gw)[pick, "timeout"] == 1
    await until(lambda: clean_emulator.stats()["accounts"][emu(pick)]["disconnects"] == 1)


async def test_no_retry_starts_after_the_configured_deadline(
    new_gateway: StartGateway, clean_emulator: Emulator
) -> None:
    config = emulated_config(clean_emulator.url, server={"timeouts": {"first_byte": 0.4}})
    gw = new_gateway(config.model_copy(update={"failover": FailoverConfig(deadline=0.2)}))
    for i in range(4):
        clean_emulator.faults(f"acct-{i}", stall_seconds=3)
    reply = await post(gw, "openai", body("openai", "deadline"))
    assert reply.status == 504 and reply.seconds < 1.0
    assert [outcome for _, outcome in attempts(gw)] == ["timeout"]


async def until(predicate: Callable[[], bool], within: float = 1.0) -> float:
    """Poll until true; the seconds it took. Fails the test after `within` seconds."""
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < within, "condition not met in time"
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


# --- 429: cooldowns, and every account rate limited ---------------------------------------


async def test_429_cools_the_account_down_for_its_retry_after(
    new_gateway: StartGateway, clean_emulator: Emulator
) -> None:
    gw = new_gateway()
    pick = await first_pick(gw, clean_emulator, "openai", "cool down")
    clean_emulator.faults(emu(pick), error_rate=1.0, status=429, retry_after=2)
    t0 = time.monotonic()
    reply = await post(gw, "openai", body("openai", "cool down"))
    t1 = time.monotonic()  # the 429 arrived between t0 and t1
    assert reply.status == 200 and reply.headers["x-upstream-account"] != pick
    assert attempts(gw)[pick, "status_429"] == 1
    health = gw.app.health
    assert health.state(pick) == "cooldown"
    wait = health.retry_in([pick])
    assert wait is not None and 1.5 < wait <= 2.0
    # Meanwhile the account gets nothing, though the prompt is pinned to it.
    clean_emulator.faults(emu(pick))
    for i in range(5):
        r = await post(gw, "openai", body("openai", "cool down"))
        assert r.status == 200 and r.headers["x-upstream-account"] != pick, i
    assert clean_emulator.stats()["accounts"][emu(pick)]["requests"] == 1
    assert health.state(pick) == "cooldown"
    await until(lambda: health.state(pick) == "healthy", within=2.5)
    ended = time.monotonic()
    assert ended - t0 >= 1.95 and ended - t1 <= 2.3
    back = await post(gw, "openai", body("openai", "cool down"))
    assert back.status == 200 and back.headers["x-upstream-account"] == pick


@pytest.mark.parametrize("family", ["openai", "anthropic"])
async def test_every_account_429_is_a_fast_429_with_retry_after(
    new_gateway: StartGateway, clean_emulator: Emulator, family: str
) -> None:
    gw = new_gateway()
    for i in range(4):
        clean_emulator.faults(f"acct-{i}", error_rate=1.0, status=429, retry_after=2)
    reply = await post(gw, family, body(family, "all limited"))
    assert reply.status == 429 and reply.seconds < 1.0
    assert reply.headers["retry-after"] == "2"
    doc = reply.json()
    if family == "anthropic":
        assert doc["type"] == "error" and doc["error"]["type"] == "rate_limit_error"
    else:
        assert doc["error"]["code"] == "upstream_rate_limited"
    counted = attempts(gw)
    assert sorted(counted) == [(f"{family}-{i}", "status_429") for i in range(4)]
    # While they cool down, nobody is asked and the answer is immediate.
    again = await post(gw, family, body(family, "all limited"))
    assert again.status == 429 and again.seconds < 0.5
    assert again.headers["retry-after"] == "2"  # the shortest cooldown left, rounded up
    assert sum(emu_requests(clean_emulator).values()) == 4


# --- the retry budget ---------------------------------------------------------------------


async def test_total_outage_does_not_multiply_the_load(
    new_gateway: StartGateway, clean_emulator: Emulator
) -> None:
    gw = new_gateway()
    for i in range(4):
        clean_emulator.faults(f"acct-{i}", error_rate=1.0, status=503)
    n = 100
    async with aiohttp.ClientSession() as s:

        async def one(i: int) -> int:
            payload = body("openai", f"outage {i}")
            async with s.post(
                gw.url + "/v1/chat/completions", data=payload, headers=_auth(gw)
            ) as r:
                await r.read()
                return r.status

        statuses = await asyncio.gather(*(one(i) for i in range(n)))
    assert statuses == [503] * n
    upstream = sum(emu_requests(clean_emulator).values())
    counted = sum(attempts(gw).values())
    assert counted == upstream
    assert n < upstream <= 1.2 * n  # some retries, within 20 %


# --- concurrency caps ---------------------------------------------------------------------


async def test_accounts_at_their_concurrency_cap_are_refused_fast_not_queued(
    new_gateway: StartGateway, clean_emulator: Emulator
) -> None:
    gw = new_gateway(limits={"concurrency": 1})
    for i in range(4):
        clean_emulator.faults(f"acct-{i}", stall_seconds=1.0)
    replies = await asyncio.gather(
        *(post(gw, "openai", body("openai", f"capped {i}")) for i in range(8))
    )
    ok = [r for r in replies if r.status == 200]
    refused = [r for r in replies if r.status == 429]
    assert len(ok) == 4 and len(refused) == 4
    assert {r.headers["x-upstream-account"] for r in ok} == {f"openai-{i}" for i in range(4)}
    assert all(r.seconds < 0.5 and int(r.headers["retry-after"]) >= 1 for r in refused)
    assert sum(emu_requests(clean_emulator).values()) == 4  # one at a time per account
    assert all(gw.app.health.in_flight(a) == 0 for a in gw.app.accounts)


# --- streams ------------------------------------------------------------------------------


def is_preamble(family: str, event: SSEEvent) -> bool:
    if family == "anthropic":
        return event.event == "message_start"
    doc = orjson.loads(event.data) if event.data != b"[DONE]" else {}
    return any("role" in c.get("delta", {}) for c in doc.get("choices", ()))


def content_of(family: str, event: SSEEvent) -> str | None:
    if family == "anthropic":
        if event.event != "content_block_delta":
            return None
        return str(orjson.loads(event.data)["delta"]["text"])
    if event.data == b"[DONE]":
        return None
    choices = orjson.loads(event.data).get("choices") or [{}]
    text = choices[0].get("delta", {}).get("content")
    return str(text) if text else None


@pytest.mark.parametrize("family", ["openai", "anthropic"])
async def test_stream_cut_after_content_ends_with_one_error_event_and_no_retry(
    new_gateway: StartGateway, clean_emulator: Emulator, family: str
) -> None:
    gw = new_gateway()
    question = "cut me"
    pick = await first_pick(gw, clean_emulator, family, question)
    before = attempts(gw)
    clean_emulator.faults(emu(pick), cut_after_chunks=3)
    reply = await post(gw, family, body(family, question, stream=True, max_tokens=50))
    assert reply.status == 200 and reply.headers["x-upstream-account"] == pick
    events = reply.events()
    texts = [t for t in (content_of(family, e) for e in events) if t is not None]
    assert len(texts) == 3
    assert sum(is_preamble(family, e) for e in events) == 1
    last = events[-1]
    if family == "anthropic":
        assert last.event == "error"
        assert orjson.loads(last.data)["type"] == "error"
    else:
        assert "error" in orjson.loads(last.data)
    errors = [e for e in events if e.event == "error" or b'"error"' in e.data]
    assert errors == [last]  # exactly one, and it is the end
    assert sum(emu_requests(clean_emulator).values()) == 1
    counted = attempts(gw)
    assert counted[pick, "stream_error"] == 1
    assert sum(counted.values()) == sum(before.values()) + 1


@pytest.mark.parametrize("family", ["openai", "anthropic"])
async def test_failure_after_the_preamble_only_is_retried_with_one_preamble(
    new_gateway: StartGateway, clean_emulator: Emulator, family: str
) -> None:
    gw = new_gateway()
    question = "preamble then nothing"
    pick = await first_pick(gw, clean_emulator, family, question)
    clean_emulator.faults(emu(pick), cut_after_chunks=0)  # the head, then the cut
    reply = await post(gw, family, body(family, question, stream=True, max_tokens=20))
    assert reply.status == 200
    other = reply.headers["x-upstream-account"]
    assert other != pick
    events = reply.events()
    assert sum(is_preamble(family, e) for e in events) == 1
    assert is_preamble(family, events[0])
    assert len([e for e in events if content_of(family, e)]) == 20
    assert not [e for e in events if e.event == "error" or b'"error"' in e.data]
    counted = attempts(gw)
    assert counted[pick, "stream_error"] == 1 and counted[other, "ok"] == 1
    assert emu_requests(clean_emulator)[emu(pick)] == 1


async def test_the_preamble_goes_out_with_the_first_content_event(
    clean_emulator: Emulator, loop_thread: LoopThread
) -> None:
    """Holding the preamble back costs no time to first token: it is written together
    with the first content event, in one send."""
    config = emulated_config(clean_emulator.url)
    account = Account.from_config(next(a for a in config.accounts if a.name == "openai-0"))

    async def run() -> list[Message]:
        client = UpstreamClient(Timeouts())
        await client.start()
        try:
            raw = body("openai", "one send", stream=True, max_tokens=5)
            ctx = make_ctx(Endpoint.CHAT, account=account, raw_body=raw, body=orjson.loads(raw))
            sent: list[Message] = []

            async def send(message: Message) -> None:
                sent.append(message)

            async def receive() -> Message:
                return {"type": "http.disconnect"}

            await UpstreamApp(client)(make_scope(ctx=ctx), receive, send)
            return sent
        finally:
            await client.aclose()

    sent = loop_thread.run(run())
    assert sent[0]["type"] == "http.response.start"
    first = SSEParser().feed(sent[1]["body"])
    assert is_preamble("openai", first[0])
    assert content_of("openai", first[1])  # the first token rides with the preamble


# --- cancellation -------------------------------------------------------------------------


async def _gone(
    gw: GatewayHandle, emulator: Emulator, payload: bytes, *, read_first: bool
) -> float:
    """Send, leave (after the first stream line, or while waiting), and return how long
    the emulator took to see the upstream request closed."""
    before = emulator.stats()["totals"]["disconnects"]
    async with aiohttp.ClientSession() as s:
        if read_first:
            resp = await s.post(gw.url + "/v1/chat/completions", data=payload, headers=_auth(gw))
            assert resp.status == 200
            assert (await resp.content.readline()).startswith(b"data: ")
            resp.close()
        else:
            task = asyncio.ensure_future(
                s.post(gw.url + "/v1/chat/completions", data=payload, headers=_auth(gw))
            )
            await asyncio.sleep(0.3)
            assert not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    return await until(lambda: emulator.stats()["totals"]["disconnects"] > before)


@pytest.mark.parametrize(
    ("case", "stream", "stall"),
    [("first-token wait", True, 3.0), ("mid-stream", True, 0.0), ("non-stream", False, 3.0)],
)
async def test_client_disconnect_closes_upstream_fast_and_retries_nothing(
    new_gateway: StartGateway,
    clean_emulator: Emulator,
    caplog: pytest.LogCaptureFixture,
    case: str,
    stream: bool,
    stall: float,
) -> None:
    gw = new_gateway()
    if stall:
        for i in range(4):
            clean_emulator.faults(f"acct-{i}", stall_seconds=stall)
    payload = body("openai", f"leaving {case}", stream=stream, max_tokens=3000)
    with caplog.at_level(logging.INFO, logger="middleware.errors"):
        took = await _gone(gw, clean_emulator, payload, read_first=stall == 0)
        assert took < 1.0
        await asyncio.sleep(0.3)  # a retry would have reached the emulator by now
    assert sum(emu_requests(clean_emulator).values()) == 1
    assert clean_emulator.stats()["totals"]["active"] == 0
    counted = attempts(gw)
    assert [outcome for _, outcome in counted] == ["client_gone"]
    health = gw.app.health
    assert all(health.in_flight(a) == 0 for a in gw.app.accounts)
    assert any("499" in r.getMessage() for r in caplog.records)
    assert (
        gw.app.metrics.registry.get_sample_value(
            "gateway_requests_total",
            {
                "endpoint": "chat/completions",
                "group": "default",
                "model": "gpt-4o-mini",
                "status_class": "4xx",
            },
        )
        == 1
    )


# --- a slow reader back-pressures the provider ----------------------------------------------


class EndlessStream:
    """A provider that streams as fast as it is allowed to, counting what it got rid of."""

    EVENT = (
        b'data: {"choices":[{"index":0,"delta":{"content":"'
        + b"x" * (16 * 1024)
        + b'"},"finish_reason":null}]}\n\n'
    )
    CAP = 256 * 1024 * 1024

    def __init__(self) -> None:
        self.sent = 0
        self.gone = asyncio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        while (await receive()).get("more_body", False):
            pass
        watcher = asyncio.ensure_future(self._watch(receive))
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        try:
            role = b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
            await send({"type": "http.response.body", "body": role, "more_body": True})
            while not self.gone.is_set() and self.sent < self.CAP:
                await send({"type": "http.response.body", "body": self.EVENT, "more_body": True})
                self.sent += len(self.EVENT)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.gone.set()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.fixture
def endless(loop_thread: LoopThread) -> Iterator[tuple[EndlessStream, str]]:
    provider = EndlessStream()
    server = AppServer(provider)
    loop_thread.run(server.start())
    yield provider, server.url
    loop_thread.run(server.stop())


async def open_stream(
    gw: GatewayHandle,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A streaming request from a client with a small receive window, past the headers."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.connect(("127.0.0.1", gw.server.port))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock, limit=16 * 1024)
    payload = body("openai", "endless", stream=True)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\n"
        + b"authorization: Bearer %s\r\ncontent-type: application/json\r\n" % gw.key.encode()
        + b"content-length: %d\r\n\r\n" % len(payload)
        + payload
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    return reader, writer


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
async def test_a_reader_that_stops_back_pressures_the_provider(
    new_gateway: StartGateway, endless: tuple[EndlessStream, str]
) -> None:
    provider, url = endless
    gw = new_gateway(emulated_config(url, accounts=1))
    reader, writer = await open_stream(gw)
    await reader.readexactly(64 * 1024)  # the stream flows...
    rss0 = rss_bytes()
    # ...then the client stops reading. The provider must come to a stop too.
    last, still = provider.sent, 0.0
    give_up = time.monotonic() + 5
    while still < 0.5:
        assert time.monotonic() < give_up, "the provider never came to a stop"
        await asyncio.sleep(0.1)
        still = still + 0.1 if provider.sent == last else 0.0
        last = provider.sent
        assert provider.sent < 96 * 1024 * 1024, "the gateway reads ahead of its client"
    stalled_at = provider.sent
    await asyncio.sleep(1.0)
    assert provider.sent - stalled_at < 256 * 1024
    assert rss_bytes() - rss0 < 64 * 1024 * 1024
    assert not provider.gone.is_set()
    # Reading again resumes the flow (once what the socket buffers hold, their size up to
    # the kernel, is read); leaving closes the provider's stream.
    read = 0
    async with asyncio.timeout(10):  # a gateway that never resumes leaves nothing to read
        while provider.sent <= stalled_at:
            read += len(await reader.readexactly(256 * 1024))
            assert read < 64 * 1024 * 1024, "the gateway held more than it may"
            await asyncio.sleep(0.01)
    writer.close()
    await until(provider.gone.is_set)
    assert [outcome for _, outcome in attempts(gw)] == ["client_gone"]


async def test_a_reader_stuck_for_an_idle_period_is_dropped_without_blaming_the_provider(
    new_gateway: StartGateway, endless: tuple[EndlessStream, str]
) -> None:
    provider, url = endless
    gw = new_gateway(emulated_config(url, accounts=1, server={"timeouts": {"idle": 0.5}}))
    reader, writer = await open_stream(gw)
    await reader.readexactly(64 * 1024)
    took = await until(provider.gone.is_set, within=3.0)  # never reads again
    assert took >= 0.5
    assert [outcome for _, outcome in attempts(gw)] == ["client_gone"]
    assert gw.app.health.state("openai-0") == "healthy"
    assert gw.app.health.in_flight("openai-0") == 0
    writer.close()


# --- provider error bodies never reach the client as they are -------------------------------

LEAK = "sk-live-9f8e7d6c5b4a39281706abcdef"


@pytest.mark.parametrize(
    "fault_body",
    [
        f"upstream proxy error: key {LEAK} rejected",
        orjson.dumps({"error": {"type": LEAK, "message": f"key {LEAK} is bad"}}).decode(),
        orjson.dumps({"error": {"code": "bad_key", "message": f"key {LEAK}"}}).decode(),
    ],
)
@pytest.mark.parametrize("family", ["openai", "anthropic"])
async def test_provider_error_bodies_are_redacted(
    new_gateway: StartGateway, clean_emulator: Emulator, family: str, fault_body: str
) -> None:
    gw = new_gateway()
    for i in range(4):
        clean_emulator.faults(f"acct-{i}", error_rate=1.0, status=400, body=fault_body)
    reply = await post(gw, family, body(family, "leak?"))
    assert reply.status == 400
    assert LEAK.encode() not in reply.raw and b"sk-" not in reply.raw
    assert b"sk-emu" not in reply.raw and b"rejected" not in reply.raw
    message = reply.json()["error"]["message"]
    assert message.startswith("the upstream provider answered 400")


async def test_rejected_credentials_quarantine_the_account_and_alert_without_the_key(
    new_gateway: StartGateway, clean_emulator: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    gw = new_gateway()
    pick = await first_pick(gw, clean_emulator, "openai", "bad key")
    clean_emulator.faults(emu(pick), error_rate=1.0, status=401)
    with caplog.at_level(logging.INFO):
        reply = await post(gw, "openai", body("openai", "bad key"))
    assert reply.status == 401  # not retried
    assert gw.app.health.state(pick) == "quarantined"
    assert gw.app.health.alerts(pick) == 1
    alerts = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(alerts) == 1 and pick in alerts[0].getMessage()
    assert not any("sk-" in r.getMessage() for r in caplog.records)
    async with aiohttp.ClientSession() as s, s.get(gw.url + "/metrics") as r:
        exposition = await r.text()
    assert f'gateway_account_alerts_total{{account="{pick}"}} 1.0' in exposition
    nxt = await post(gw, "openai", body("openai", "bad key"))
    assert nxt.status == 200 and nxt.headers["x-upstream-account"] != pick
    assert clean_emulator.stats()["accounts"][emu(pick)]["requests"] == 1
