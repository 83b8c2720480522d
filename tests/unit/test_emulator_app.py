"""The emulator app driven through raw ASGI, with a fake clock and no network."""

from __future__ import annotations

import asyncio
import base64
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from starlette.types import Message

from gateway.emulator import (
    AccountSpec,
    EmulatorConfig,
    FaultSpec,
    LatencySpec,
    create_app,
    default_config,
)
from gateway.emulator.app import EmulatorApp
from gateway.emulator.asgi import InjectedStreamCut

NO_LATENCY = LatencySpec(0.0, 0.0, 0.0)
LONG = "lorem ipsum dolor sit amet " * 300  # ~8 KB, ~2,000 tokens


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    chunks: list[bytes] = field(default_factory=list)

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def json(self) -> Any:
        return orjson.loads(self.body)


class Client:
    """Calls the app as uvicorn would; ``disconnect`` makes the client go away."""

    def __init__(self, app: EmulatorApp) -> None:
        self.app = app
        self.disconnect = asyncio.Event()

    async def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> Reply:
        raw = body if isinstance(body, bytes) else orjson.dumps(body) if body is not None else b""
        scope = {
            "type": "http",
            "method": method,
            "path": path,
            "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        }
        delivered = False

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": raw, "more_body": False}
            await self.disconnect.wait()
            return {"type": "http.disconnect"}

        reply = Reply(0, {})

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                reply.status = message["status"]
                reply.headers = {k.decode(): v.decode() for k, v in message["headers"]}
            elif message.get("body"):
                reply.chunks.append(message["body"])

        await self.app(scope, receive, send)
        return reply

    async def chat(self, key: str = "sk-emu-0", **body: Any) -> Reply:
        body.setdefault("model", "gpt-4o")
        body.setdefault(
            "messages", [{"role": "system", "content": LONG}, {"role": "user", "content": "hi"}]
        )
        return await self.request(
            "POST", "/v1/chat/completions", body, {"Authorization": f"Bearer {key}"}
        )

    async def messages(self, key: str = "sk-emu-0", **body: Any) -> Reply:
        body.setdefault("model", "claude-sonnet-4-6")
        body.setdefault("max_tokens", 8)
        body.setdefault(
            "system", [{"type": "text", "text": LONG, "cache_control": {"type": "ephemeral"}}]
        )
        body.setdefault("messages", [{"role": "user", "content": "hi"}])
        headers = {"x-api-key": key, "anthropic-version": "2023-06-01"}
        return await self.request("POST", "/v1/messages", body, headers)


def make(config: EmulatorConfig | None = None, **kw: Any) -> tuple[EmulatorApp, Client, FakeClock]:
    clock = FakeClock()
    app = EmulatorApp(config or default_config(2, latency=NO_LATENCY, **kw), clock=clock)
    return app, Client(app), clock


def sse_data(reply: Reply) -> list[Any]:
    lines = [line for chunk in reply.chunks for line in chunk.decode().splitlines()]
    return [
        orjson.loads(line[6:])
        for line in lines
        if line.startswith("data: ") and line != "data: [DONE]"
    ]


# --- OpenAI ---------------------------------------------------------------------------


async def test_openai_repeat_reads_the_cache_and_stats_agree() -> None:
    app, client, _ = make()
    first = (await client.chat()).json()
    second = (await client.chat()).json()
    assert first["object"] == "chat.completion"
    assert first["choices"][0]["message"]["role"] == "assistant"
    usage = second["usage"]
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert usage["prompt_tokens_details"]["cached_tokens"] >= 1024
    assert usage["prompt_tokens_details"]["cached_tokens"] % 128 == 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    stats = app.stats()["accounts"]["acct-0"]
    assert stats["requests"] == 2
    assert stats["prompt_tokens"] == 2 * usage["prompt_tokens"]
    assert stats["cached_tokens"] == usage["prompt_tokens_details"]["cached_tokens"]
    assert stats["completion_tokens"] == 2 * usage["completion_tokens"]
    assert app.stats()["accounts"]["acct-1"]["requests"] == 0


async def test_accounts_have_separate_caches() -> None:
    _, client, _ = make()
    await client.chat(key="sk-emu-0")
    other = (await client.chat(key="sk-emu-1")).json()
    assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


async def test_cache_ttl_is_divided_by_the_time_scale() -> None:
    _, client, clock = make(time_scale=100.0)  # 300 s TTL -> 3 s
    await client.chat()
    clock.now += 2.9
    assert (await client.chat()).json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    clock.now += 3.0
    assert (await client.chat()).json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


async def test_output_length_follows_max_tokens_and_is_deterministic_per_seed() -> None:
    _, client, _ = make(seed=1)
    _, same_seed, _ = make(seed=1)
    _, other_seed, _ = make(seed=2)
    reply = (await client.chat(max_tokens=7)).json()
    assert reply["usage"]["completion_tokens"] == 7
    assert len(reply["choices"][0]["message"]["content"].split()) == 7
    text = reply["choices"][0]["message"]["content"]
    assert (await same_seed.chat(max_tokens=7)).json()["choices"][0]["message"]["content"] == text
    assert (await other_seed.chat(max_tokens=7)).json()["choices"][0]["message"]["content"] != text
    default = (await client.chat()).json()
    assert default["usage"]["completion_tokens"] == 32
    capped = (await client.chat(max_completion_tokens=100_000)).json()
    assert capped["usage"]["completion_tokens"] == 4096


async def test_openai_stream_events_in_order_each_sent_on_its_own() -> None:
    _, client, _ = make(stream_chunk_tokens=2)
    reply = await client.chat(stream=True, max_tokens=5, stream_options={"include_usage": True})
    assert reply.headers["content-type"].startswith("text/event-stream")
    assert all(chunk.count(b"\n\n") == 1 for chunk in reply.chunks)  # one event per write
    assert reply.chunks[-1] == b"data: [DONE]\n\n"
    events = sse_data(reply)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    contents = [e["choices"][0]["delta"].get("content") for e in events[1:-2]]
    assert len(contents) == 3  # 5 tokens, 2 a chunk
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert events[-1]["choices"] == []
    assert events[-1]["usage"]["completion_tokens"] == 5
    assert all(e["usage"] is None for e in events[:-1])


async def test_openai_stream_without_include_usage_has_no_usage_chunk() -> None:
    _, client, _ = make()
    events = sse_data(await client.chat(stream=True, max_tokens=3))
    assert all(e["choices"] for e in events)
    assert all("usage" not in e for e in events)


async def test_wrong_key_is_a_401_in_each_format_and_never_echoed() -> None:
    app, client, _ = make()
    reply = await client.chat(key="sk-secret-value")
    assert reply.status == 401
    assert reply.json()["error"]["code"] == "invalid_api_key"
    assert b"sk-secret-value" not in reply.body
    reply = await client.messages(key="sk-secret-value")
    assert reply.status == 401
    assert reply.json()["error"]["type"] == "authentication_error"
    missing = await client.request("POST", "/v1/chat/completions", {"model": "m"})
    assert missing.status == 401
    assert app.stats()["totals"]["unauthorized"] == 3
    assert app.stats()["totals"]["requests"] == 0


async def test_malformed_json_is_a_400_in_each_format() -> None:
    app, client, _ = make()
    reply = await client.request(
        "POST", "/v1/chat/completions", b"{nope", {"Authorization": "Bearer sk-emu-0"}
    )
    assert reply.status == 400
    assert reply.json()["error"]["type"] == "invalid_request_error"
    headers = {"x-api-key": "sk-emu-0", "anthropic-version": "2023-06-01"}
    reply = await client.request("POST", "/v1/messages", b"[1, 2", headers)
    assert reply.status == 400
    assert reply.json()["type"] == "error"
    assert reply.json()["error"]["type"] == "invalid_request_error"
    assert app.stats()["accounts"]["acct-0"]["errors"] == 2


async def test_anthropic_requires_the_version_header_and_max_tokens() -> None:
    _, client, _ = make()
    no_version = await client.request(
        "POST", "/v1/messages", {"model": "m"}, {"x-api-key": "sk-emu-0"}
    )
    assert no_version.status == 400
    assert "anthropic-version" in no_version.json()["error"]["message"]
    reply = await client.messages(max_tokens=None)
    assert reply.status == 400
    assert "max_tokens" in reply.json()["error"]["message"]


# --- Anthropic ----------------------------------------------------------------------


async def test_anthropic_usage_splits_input_cache_write_and_cache_read() -> None:
    _, client, _ = make()
    first = (await client.messages()).json()["usage"]
    second = (await client.messages()).json()["usage"]
    assert first["cache_read_input_tokens"] == 0
    assert first["cache_creation_input_tokens"] > 1024
    assert (
        first["cache_creation"]["ephemeral_5m_input_tokens"] == first["cache_creation_input_tokens"]
    )
    assert second["cache_read_input_tokens"] == first["cache_creation_input_tokens"]
    assert second["cache_creation_input_tokens"] == 0
    assert second["input_tokens"] == first["input_tokens"] > 0
    assert first["output_tokens"] == 8


async def test_anthropic_one_hour_write_is_reported_apart() -> None:
    _, client, _ = make()
    system = [{"type": "text", "text": LONG, "cache_control": {"type": "ephemeral", "ttl": "1h"}}]
    usage = (await client.messages(system=system)).json()["usage"]
    assert (
        usage["cache_creation"]["ephemeral_1h_input_tokens"] == usage["cache_creation_input_tokens"]
    )
    assert usage["cache_creation"]["ephemeral_5m_input_tokens"] == 0


async def test_anthropic_stream_has_the_real_event_sequence() -> None:
    _, client, _ = make()
    await client.messages()
    reply = await client.messages(stream=True, max_tokens=4)
    names = [
        line[7:]
        for chunk in reply.chunks
        for line in chunk.decode().splitlines()
        if line.startswith("event: ")
    ]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 4,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    events = sse_data(reply)
    start_usage = events[0]["message"]["usage"]
    assert start_usage["cache_read_input_tokens"] > 1024
    assert events[-2]["usage"]["output_tokens"] == 4
    assert events[-2]["usage"]["cache_read_input_tokens"] == start_usage["cache_read_input_tokens"]
    assert events[-2]["delta"]["stop_reason"] == "end_turn"


async def test_count_tokens_matches_the_input_of_a_request() -> None:
    _, client, _ = make()
    usage = (await client.messages()).json()["usage"]
    body = {
        "model": "claude-sonnet-4-6",
        "system": [{"type": "text", "text": LONG, "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": "hi"}],
    }
    headers = {"x-api-key": "sk-emu-0", "anthropic-version": "2023-06-01"}
    counted = (await client.request("POST", "/v1/messages/count_tokens", body, headers)).json()
    total = (
        usage["input_tokens"]
        + usage["cache_creation_input_tokens"]
        + usage["cache_read_input_tokens"]
    )
    assert counted == {"input_tokens": total}


# --- rate limits ----------------------------------------------------------------------


async def test_rpm_429_with_retry_after_and_provider_headers() -> None:
    config = EmulatorConfig(
        accounts=[AccountSpec("a", "sk-emu-0", rpm=2, itpm=100_000)], latency=NO_LATENCY
    )
    app, client, clock = make(config)
    first = await client.chat()
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-limit-tokens"] == "100000"
    clock.now += 10
    await client.chat()
    clock.now += 10
    denied = await client.chat()
    assert denied.status == 429
    assert denied.json()["error"]["code"] == "rate_limit_exceeded"
    assert denied.headers["retry-after"] == "40"
    assert denied.headers["retry-after-ms"] == "40000"
    assert denied.headers["x-ratelimit-remaining-requests"] == "0"
    anthropic = await client.messages()
    assert anthropic.status == 429
    assert anthropic.json()["error"]["type"] == "rate_limit_error"
    assert anthropic.headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert "anthropic-ratelimit-input-tokens-remaining" in anthropic.headers
    assert app.stats()["accounts"]["a"]["rate_limited"] == 2
    clock.now += 40
    assert (await client.chat()).status == 200


async def test_error_responses_carry_the_rate_limit_headers_too() -> None:
    config = EmulatorConfig(accounts=[AccountSpec("a", "sk-emu-0", rpm=5)], latency=NO_LATENCY)
    _, client, _ = make(config)
    await client.chat()
    reply = await client.request(
        "POST", "/v1/chat/completions", b"{", {"Authorization": "Bearer sk-emu-0"}
    )
    assert reply.status == 400
    assert reply.headers["x-ratelimit-remaining-requests"] == "4"  # a 400 is not counted


async def test_itpm_counts_cache_reads_for_openai_but_not_for_anthropic() -> None:
    accounts = [
        AccountSpec("openai", "sk-o", itpm=3000),
        AccountSpec("openai-uncached", "sk-u", itpm=3000, itpm_counts_cached=False),
        AccountSpec("anthropic", "sk-a", itpm=3000),
    ]
    _, client, _ = make(EmulatorConfig(accounts=accounts, latency=NO_LATENCY))
    # Each prompt is ~2,000 tokens; the second is almost all cache reads.
    assert [(await client.chat(key="sk-o")).status for _ in range(2)] == [200, 429]
    assert [(await client.chat(key="sk-u")).status for _ in range(2)] == [200, 200]
    assert [(await client.messages(key="sk-a")).status for _ in range(2)] == [200, 200]


async def test_concurrency_limit_turns_away_a_request_while_one_is_in_flight() -> None:
    config = EmulatorConfig(
        accounts=[AccountSpec("a", "sk-emu-0", concurrency=1)],
        latency=LatencySpec(base_ms=300, prefill_ms_per_1k_uncached=0, decode_ms_per_token=0),
    )
    app, client, _ = make(config)
    slow = asyncio.create_task(client.chat())
    await asyncio.sleep(0.05)
    assert app.stats()["accounts"]["a"]["active"] == 1
    assert (await client.chat()).status == 429
    assert (await slow).status == 200
    assert app.stats()["accounts"]["a"]["active"] == 0


# --- faults ---------------------------------------------------------------------------


async def test_injected_overload_uses_the_provider_format_and_retry_after() -> None:
    faults = FaultSpec(error_rate=1.0, status=529, retry_after=3)
    config = EmulatorConfig(
        accounts=[AccountSpec("a", "sk-emu-0", faults=faults)], latency=NO_LATENCY
    )
    app, client, _ = make(config)
    reply = await client.messages()
    assert reply.status == 529
    assert reply.json()["error"]["type"] == "overloaded_error"
    assert reply.headers["retry-after"] == "3"
    assert app.stats()["accounts"]["a"]["faults_injected"] == 1
    assert app.stats()["accounts"]["a"]["prompt_tokens"] == 0


async def test_fault_sequence_is_deterministic_per_seed() -> None:
    async def statuses(seed: int) -> list[int]:
        faults = FaultSpec(error_rate=0.5, status=503)
        accounts = [AccountSpec("a", "sk-emu-0", faults=faults)]
        _, client, _ = make(EmulatorConfig(accounts=accounts, seed=seed, latency=NO_LATENCY))
        return [(await client.chat(max_tokens=1)).status for _ in range(40)]

    first = await statuses(1)
    assert first == await statuses(1)
    assert first != await statuses(2)
    assert 5 < first.count(503) < 35


async def test_fault_body_is_sent_verbatim() -> None:
    faults = FaultSpec(error_rate=1.0, status=502, body="<html>bad gateway</html>")
    config = EmulatorConfig(
        accounts=[AccountSpec("a", "sk-emu-0", faults=faults)], latency=NO_LATENCY
    )
    _, client, _ = make(config)
    reply = await client.chat()
    assert (reply.status, reply.body) == (502, b"<html>bad gateway</html>")


async def test_cut_stream_sends_exactly_the_head_and_n_chunks() -> None:
    faults = FaultSpec(cut_after_chunks=3)
    config = EmulatorConfig(
        accounts=[AccountSpec("a", "sk-emu-0", faults=faults)], latency=NO_LATENCY
    )
    app = EmulatorApp(config)
    bodies: list[bytes] = []
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]}
            return {"type": "http.request", "body": orjson.dumps(body)}
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body":
            assert message.get("more_body") is True  # the response is never completed
            bodies.append(message["body"])

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": [(b"authorization", b"Bearer sk-emu-0")],
    }
    with pytest.raises(InjectedStreamCut):
        await app(scope, receive, send)
    assert len(bodies) == 1 + 3  # the role chunk, then three content chunks
    assert not any(b"[DONE]" in body or b'"finish_reason":"stop"' in body for body in bodies)
    stats = app.stats()["accounts"]["a"]
    assert (stats["faults_injected"], stats["completion_tokens"], stats["active"]) == (1, 3, 0)


async def test_stall_delays_the_first_byte() -> None:
    faults = FaultSpec(stall_seconds=0.2)
    config = EmulatorConfig(
        accounts=[AccountSpec("a", "sk-emu-0", faults=faults)], latency=NO_LATENCY
    )
    _, client, _ = make(config)
    started = time.monotonic()
    assert (await client.chat()).status == 200
    assert time.monotonic() - started >= 0.2


async def test_a_stalled_error_leaves_no_task_behind() -> None:
    faults = FaultSpec(stall_seconds=0.05)
    config = EmulatorConfig(
        accounts=[AccountSpec("a", "sk-emu-0", faults=faults)], latency=NO_LATENCY
    )
    _, client, _ = make(config)
    before = asyncio.all_tasks()
    reply = await client.request(
        "POST", "/v1/chat/completions", b"{", {"Authorization": "Bearer sk-emu-0"}
    )
    assert reply.status == 400
    await asyncio.sleep(0)  # let a cancelled watcher finish
    assert asyncio.all_tasks() == before


# --- client disconnects -----------------------------------------------------------------


async def test_disconnect_while_waiting_for_the_first_byte_is_noticed_and_counted() -> None:
    config = default_config(
        1, latency=LatencySpec(base_ms=10_000, prefill_ms_per_1k_uncached=0, decode_ms_per_token=0)
    )
    app, client, _ = make(config)
    task = asyncio.create_task(client.chat())
    await asyncio.sleep(0.05)
    started = time.monotonic()
    client.disconnect.set()
    reply = await asyncio.wait_for(task, 2.0)
    assert time.monotonic() - started < 1.0
    assert reply.status == 0  # nothing was sent
    stats = app.stats()["accounts"]["acct-0"]
    assert stats["disconnects"] == 1
    assert stats["last_disconnect_at"] == pytest.approx(time.time(), abs=5)
    assert stats["active"] == 0
    assert stats["cache_entries"] == 0  # prefill never finished: nothing was cached


async def test_disconnect_mid_stream_stops_generation() -> None:
    config = default_config(
        1, latency=LatencySpec(base_ms=0, prefill_ms_per_1k_uncached=0, decode_ms_per_token=50)
    )
    app, client, _ = make(config)
    task = asyncio.create_task(client.chat(stream=True, max_tokens=100))
    await asyncio.sleep(0.12)
    client.disconnect.set()
    reply = await asyncio.wait_for(task, 1.0)
    assert reply.status == 200
    assert b"[DONE]" not in reply.body
    stats = app.stats()["accounts"]["acct-0"]
    assert stats["disconnects"] == 1
    assert 1 <= stats["completion_tokens"] <= 4


# --- latency ----------------------------------------------------------------------------


async def test_cache_hits_reach_the_first_byte_sooner() -> None:
    latency = LatencySpec(base_ms=0, prefill_ms_per_1k_uncached=100, decode_ms_per_token=0)
    _, client, _ = make(default_config(1, latency=latency))
    started = time.monotonic()
    await client.chat()  # ~2,000 uncached tokens: >= 0.2 s
    miss = time.monotonic() - started
    started = time.monotonic()
    await client.chat()  # a handful uncached
    hit = time.monotonic() - started
    assert miss >= 0.19
    assert hit < miss / 2


# --- other endpoints --------------------------------------------------------------------


async def test_embeddings_are_deterministic_in_float_and_base64() -> None:
    _, client, _ = make()
    headers = {"Authorization": "Bearer sk-emu-0"}
    body = {"model": "text-embedding-3-small", "input": ["alpha", "beta"], "dimensions": 8}
    floats = (await client.request("POST", "/v1/embeddings", body, headers)).json()
    encoded = (
        await client.request(
            "POST", "/v1/embeddings", {**body, "encoding_format": "base64"}, headers
        )
    ).json()
    assert [d["index"] for d in floats["data"]] == [0, 1]
    vector = floats["data"][0]["embedding"]
    assert len(vector) == 8
    assert sum(v * v for v in vector) == pytest.approx(1.0)
    assert floats["data"][1]["embedding"] != vector
    decoded = struct.unpack("<8f", base64.b64decode(encoded["data"][0]["embedding"]))
    assert decoded == pytest.approx(vector, abs=1e-6)
    assert floats["usage"] == {"prompt_tokens": 3, "total_tokens": 3}  # 5 and 4 bytes


async def test_models_list_in_each_format() -> None:
    _, client, _ = make()
    openai = (
        await client.request("GET", "/v1/models", None, {"Authorization": "Bearer sk-emu-0"})
    ).json()
    assert openai["object"] == "list"
    assert any(m["id"].startswith("gpt") for m in openai["data"])
    headers = {"x-api-key": "sk-emu-0", "anthropic-version": "2023-06-01"}
    anthropic = (await client.request("GET", "/v1/models", None, headers)).json()
    assert all(m["type"] == "model" and m["id"].startswith("claude") for m in anthropic["data"])


async def test_unknown_paths_and_methods() -> None:
    _, client, _ = make()
    assert (await client.request("GET", "/v1/nothing")).status == 404
    assert (await client.request("GET", "/v1/chat/completions")).status == 405


# --- stats, debug, control ------------------------------------------------------------------


async def test_debug_requests_shows_headers_as_received_and_is_bounded() -> None:
    _, client, _ = make(request_log_size=3)
    await client.chat(key="sk-emu-1")
    await client.request(
        "POST",
        "/v1/chat/completions",
        {},
        {"Authorization": "Bearer sk-emu-0", "Cookie": "a=1", "X-Trace": "t"},
    )
    log = (await client.request("GET", "/debug/requests")).json()["requests"]
    assert [entry["account"] for entry in log] == ["acct-1", "acct-0"]
    assert log[1]["headers"] == {
        "authorization": "Bearer sk-emu-0",
        "cookie": "a=1",
        "x-trace": "t",
    }
    assert log[1]["raw_headers"][1] == ["cookie", "a=1"]
    for _ in range(5):
        await client.chat(key="nobody")
    log = (await client.request("GET", "/debug/requests")).json()["requests"]
    assert len(log) == 3
    assert log[-1]["account"] is None


async def test_control_faults_sets_and_clears_an_accounts_faults() -> None:
    _, client, _ = make()
    body = {"account": "acct-0", "error_rate": 1.0, "status": 503}
    assert (await client.request("POST", "/control/faults", body)).json()["status"] == 503
    assert (await client.chat()).status == 503
    assert (await client.chat(key="sk-emu-1")).status == 200
    await client.request("POST", "/control/faults", {"account": "acct-0"})
    assert (await client.chat()).status == 200
    unknown = await client.request("POST", "/control/faults", {"account": "nope"})
    assert unknown.status == 404
    invalid = await client.request(
        "POST", "/control/faults", {"account": "acct-0", "error_rate": 2}
    )
    assert invalid.status == 400


async def test_control_limits_sets_and_clears_limits() -> None:
    _, client, _ = make()
    await client.request("POST", "/control/limits", {"account": "acct-0", "rpm": 1})
    assert [(await client.chat()).status for _ in range(2)] == [200, 429]
    await client.request("POST", "/control/limits", {"account": "acct-0"})
    assert (await client.chat()).status == 200


async def test_stats_reset_zeroes_counters() -> None:
    _, client, _ = make()
    await client.chat()
    await client.chat(key="bad")
    totals = (await client.request("GET", "/stats")).json()["totals"]
    assert (totals["requests"], totals["unauthorized"]) == (1, 1)
    reset = (await client.request("POST", "/stats/reset")).json()
    assert reset["totals"]["requests"] == reset["totals"]["unauthorized"] == 0
    assert reset["totals"]["cache_entries"] > 0  # the cache is not stats


async def test_create_app_serves_lifespan() -> None:
    app = create_app(default_config(1))
    sent: list[dict[str, Any]] = []
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": "lifespan"}, receive, send)  # type: ignore[arg-type]
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
