"""The emulator served by real uvicorn on 127.0.0.1, driven by the official SDKs."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import anthropic
import httpx2
import openai
import pytest
from anthropic.types import MessageParam, TextBlockParam
from openai.types.chat import ChatCompletionMessageParam

from gateway.emulator import (
    AccountSpec,
    EmulatorConfig,
    EmulatorServer,
    FaultSpec,
    LatencySpec,
    default_config,
)

FAST = LatencySpec(base_ms=1, prefill_ms_per_1k_uncached=1, decode_ms_per_token=0.2)
LONG = "The quick brown fox jumps over the lazy dog. " * 200  # ~9 KB, ~2,250 tokens
CHAT: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": LONG},
    {"role": "user", "content": "Summarise."},
]
CACHED_SYSTEM: list[TextBlockParam] = [
    {"type": "text", "text": LONG, "cache_control": {"type": "ephemeral"}}
]
USER: list[MessageParam] = [{"role": "user", "content": "Summarise."}]
CLAUDE = "claude-sonnet-4-6"


@pytest.fixture
async def emulator() -> AsyncIterator[EmulatorServer]:
    async with EmulatorServer(default_config(2, latency=FAST)) as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def openai_client(server: EmulatorServer, key: str = "sk-emu-0", **kw: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, **kw)


def anthropic_client(
    server: EmulatorServer, key: str = "sk-emu-0", **kw: Any
) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=server.url, api_key=key, max_retries=0, **kw)


async def stats(http: aiohttp.ClientSession, server: EmulatorServer) -> dict[str, Any]:
    async with http.get(f"{server.url}/stats") as response:
        result: dict[str, Any] = await response.json()
        return result


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 2.0) -> None:
    """Poll an async check until it returns true."""
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_port_zero_binds_a_free_port_and_url_reports_it(emulator: EmulatorServer) -> None:
    match = re.fullmatch(r"http://127\.0\.0\.1:(\d+)", emulator.url)
    assert match is not None
    assert int(match.group(1)) > 0
    with socket.create_connection(("127.0.0.1", int(match.group(1))), timeout=1):
        pass


# --- OpenAI SDK -------------------------------------------------------------------------


async def test_openai_async_repeat_is_a_cache_hit(emulator: EmulatorServer) -> None:
    async with openai_client(emulator) as client:
        first = await client.chat.completions.create(model="gpt-4o", messages=CHAT)
        second = await client.chat.completions.create(model="gpt-4o", messages=CHAT)
    assert first.usage is not None and second.usage is not None
    assert first.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details is not None
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached is not None
    assert 1024 <= cached <= second.usage.prompt_tokens
    assert cached % 128 == 0
    assert first.choices[0].message.content == second.choices[0].message.content
    assert first.choices[0].finish_reason == "stop"


async def test_openai_sync_stream_with_usage_matches_the_non_streamed_answer(
    emulator: EmulatorServer,
) -> None:
    def run() -> tuple[str, list[Any], str]:
        with openai.OpenAI(
            base_url=f"{emulator.url}/v1", api_key="sk-emu-1", max_retries=0
        ) as client:
            whole = client.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=12)
            chunks = list(
                client.chat.completions.create(
                    model="gpt-4o",
                    messages=CHAT,
                    max_tokens=12,
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )
            return whole.choices[0].message.content or "", chunks, whole.id

    text, chunks, _ = await asyncio.to_thread(run)
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-2].choices[0].finish_reason == "stop"
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    assert usage is not None and usage.completion_tokens == 12
    assert usage.prompt_tokens_details is not None
    assert (usage.prompt_tokens_details.cached_tokens or 0) >= 1024
    assert all(c.usage is None for c in chunks[:-1])


async def test_openai_async_stream_without_usage_option(emulator: EmulatorServer) -> None:
    async with openai_client(emulator) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o",
            messages=CHAT,
            max_tokens=5,
            stream=True,
        )
        chunks = [chunk async for chunk in stream]
    assert all(chunk.choices for chunk in chunks)
    assert all(chunk.usage is None for chunk in chunks)
    assert sum(1 for c in chunks if c.choices[0].delta.content) == 5


async def test_openai_embeddings_through_the_sdk(emulator: EmulatorServer) -> None:
    async with openai_client(emulator) as client:
        default = await client.embeddings.create(model="text-embedding-3-small", input="hello")
        floats = await client.embeddings.create(
            model="text-embedding-3-small", input="hello", encoding_format="float"
        )
    assert default.data[0].embedding == pytest.approx(floats.data[0].embedding, abs=1e-6)
    assert default.usage.prompt_tokens == 2


async def test_openai_errors_map_to_sdk_exceptions(
    emulator: EmulatorServer, http: aiohttp.ClientSession
) -> None:
    async with openai_client(emulator, key="sk-wrong") as client:
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(model="gpt-4o", messages=CHAT)
    limits = {"account": "acct-0", "rpm": 1}
    async with http.post(f"{emulator.url}/control/limits", json=limits) as response:
        assert response.status == 200
    async with openai_client(emulator) as client:
        await client.chat.completions.create(model="gpt-4o", messages=CHAT)
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model="gpt-4o", messages=CHAT)
    headers = caught.value.response.headers
    assert int(headers["retry-after"]) >= 1
    assert headers["x-ratelimit-remaining-requests"] == "0"


# --- Anthropic SDK ----------------------------------------------------------------------


async def test_anthropic_create_reports_cache_write_then_read(emulator: EmulatorServer) -> None:
    async with anthropic_client(emulator) as client:
        first = await client.messages.create(
            model=CLAUDE, max_tokens=10, system=CACHED_SYSTEM, messages=USER
        )
        second = await client.messages.create(
            model=CLAUDE, max_tokens=10, system=CACHED_SYSTEM, messages=USER
        )
    assert first.usage.cache_read_input_tokens == 0
    written = first.usage.cache_creation_input_tokens
    assert written is not None and written > 1024
    assert second.usage.cache_read_input_tokens == written
    assert second.usage.cache_creation_input_tokens == 0
    assert second.usage.input_tokens == first.usage.input_tokens
    assert first.usage.output_tokens == 10
    assert first.content[0].type == "text"
    assert first.stop_reason == "end_turn"


async def test_anthropic_sync_stream_helper(emulator: EmulatorServer) -> None:
    def run() -> tuple[list[str], Any]:
        with anthropic.Anthropic(
            base_url=emulator.url, api_key="sk-emu-1", max_retries=0
        ) as client:
            client.messages.create(model=CLAUDE, max_tokens=4, system=CACHED_SYSTEM, messages=USER)
            with client.messages.stream(
                model=CLAUDE, max_tokens=6, system=CACHED_SYSTEM, messages=USER
            ) as stream:
                texts = list(stream.text_stream)
                return texts, stream.get_final_message()

    texts, final = await asyncio.to_thread(run)
    assert len(texts) == 6
    assert final.content[0].text == "".join(texts)
    assert final.usage.output_tokens == 6
    assert (final.usage.cache_read_input_tokens or 0) > 1024
    assert final.stop_reason == "end_turn"


async def test_anthropic_async_raw_stream_event_types(emulator: EmulatorServer) -> None:
    async with anthropic_client(emulator) as client:
        stream = await client.messages.create(
            model=CLAUDE, max_tokens=3, system=CACHED_SYSTEM, messages=USER, stream=True
        )
        kinds = [event.type async for event in stream]
    assert kinds == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]


async def test_anthropic_count_tokens_and_errors(emulator: EmulatorServer) -> None:
    async with anthropic_client(emulator) as client:
        counted = await client.messages.count_tokens(
            model=CLAUDE, system=CACHED_SYSTEM, messages=USER
        )
        message = await client.messages.create(
            model=CLAUDE, max_tokens=1, system=CACHED_SYSTEM, messages=USER
        )
    usage = message.usage
    total = (
        usage.input_tokens
        + (usage.cache_creation_input_tokens or 0)
        + (usage.cache_read_input_tokens or 0)
    )
    assert counted.input_tokens == total
    async with anthropic_client(emulator, key="sk-wrong") as client:
        with pytest.raises(anthropic.AuthenticationError):
            await client.messages.create(model=CLAUDE, max_tokens=1, messages=USER)


# --- faults and disconnects -------------------------------------------------------------


async def set_faults(http: aiohttp.ClientSession, server: EmulatorServer, **faults: Any) -> None:
    async with http.post(f"{server.url}/control/faults", json={"account": "acct-0", **faults}) as r:
        assert r.status == 200


async def test_cut_stream_makes_both_sdks_raise(
    emulator: EmulatorServer, http: aiohttp.ClientSession
) -> None:
    await set_faults(http, emulator, cut_after_chunks=2)
    async with openai_client(emulator) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o",
            messages=CHAT,
            max_tokens=10,
            stream=True,
        )
        received: list[str] = []
        with pytest.raises(openai.APIError):
            async for chunk in stream:
                received.append(chunk.choices[0].delta.content or "")  # noqa: PERF401 - kept on raise
    assert len([text for text in received if text]) == 2
    async with anthropic_client(emulator) as claude:
        # This SDK lets the transport's error through unwrapped for a truncated stream.
        with pytest.raises((anthropic.APIError, httpx2.RemoteProtocolError)):
            async with claude.messages.stream(model=CLAUDE, max_tokens=10, messages=USER) as events:
                await events.get_final_message()
    assert (await stats(http, emulator))["accounts"]["acct-0"]["faults_injected"] == 2


async def test_injected_errors_reach_the_sdk(
    emulator: EmulatorServer, http: aiohttp.ClientSession
) -> None:
    await set_faults(http, emulator, error_rate=1.0, status=529, retry_after=7)
    async with anthropic_client(emulator) as client:
        with pytest.raises(anthropic.APIStatusError) as caught:
            await client.messages.create(model=CLAUDE, max_tokens=1, messages=USER)
    assert caught.value.status_code == 529
    assert caught.value.response.headers["retry-after"] == "7"
    await set_faults(http, emulator)  # clears them
    async with anthropic_client(emulator) as client:
        await client.messages.create(model=CLAUDE, max_tokens=1, messages=USER)


async def test_client_leaving_mid_stream_is_counted(http: aiohttp.ClientSession) -> None:
    slow = LatencySpec(base_ms=0, prefill_ms_per_1k_uncached=0, decode_ms_per_token=100)
    async with EmulatorServer(default_config(1, latency=slow)) as server:
        async with openai_client(server) as client:
            stream = await client.chat.completions.create(
                model="gpt-4o",
                messages=CHAT,
                max_tokens=200,
                stream=True,
            )
            await stream.__anext__()  # the role chunk
            await stream.close()

        async def counted() -> bool:
            account = (await stats(http, server))["accounts"]["acct-0"]
            return bool(account["disconnects"] == 1 and account["active"] == 0)

        await eventually(counted)
        account = (await stats(http, server))["accounts"]["acct-0"]
        assert account["completion_tokens"] < 10
        assert account["last_disconnect_at"] is not None


async def test_client_timing_out_during_a_stall_is_counted(http: aiohttp.ClientSession) -> None:
    accounts = [AccountSpec("slow", "sk-slow", faults=FaultSpec(stall_seconds=30))]
    async with EmulatorServer(EmulatorConfig(accounts=accounts, latency=FAST)) as server:
        async with anthropic_client(server, key="sk-slow", timeout=0.3) as client:
            with pytest.raises(anthropic.APITimeoutError):
                await client.messages.create(model=CLAUDE, max_tokens=1, messages=USER)

        async def counted() -> bool:
            return bool((await stats(http, server))["accounts"]["slow"]["disconnects"] == 1)

        await eventually(counted)


# --- debugging -------------------------------------------------------------------------


async def test_debug_requests_records_the_headers_the_sdk_sent(
    emulator: EmulatorServer, http: aiohttp.ClientSession
) -> None:
    async with openai_client(emulator, default_headers={"X-Client-Tag": "t1"}) as client:
        await client.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=1)
    async with http.get(f"{emulator.url}/debug/requests") as response:
        log = (await response.json())["requests"]
    entry = log[-1]
    assert (entry["account"], entry["path"]) == ("acct-0", "/v1/chat/completions")
    assert entry["headers"]["authorization"] == "Bearer sk-emu-0"
    assert entry["headers"]["x-client-tag"] == "t1"


# --- the CLI entry ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_main_serves_until_interrupted(http: aiohttp.ClientSession) -> None:
    port = _free_port()
    code = (
        "import argparse, sys\n"
        "from gateway.emulator import add_arguments, main\n"
        "parser = argparse.ArgumentParser()\n"
        "add_arguments(parser)\n"
        "sys.exit(main(parser.parse_args(sys.argv[1:])))\n"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        *("--accounts", "3", "--port", str(port), "--seed", "4"),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:

        async def serving() -> bool:
            try:
                async with http.get(f"http://127.0.0.1:{port}/stats") as response:
                    return response.status == 200
            except aiohttp.ClientConnectionError:
                return False

        await eventually(serving, within=10.0)
        async with http.get(f"http://127.0.0.1:{port}/stats") as response:
            assert list((await response.json())["accounts"]) == ["acct-0", "acct-1", "acct-2"]
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = await asyncio.wait_for(process.communicate(), 10)
    assert process.returncode == 0, stderr.decode()
