"""The request path end to end: real uvicorn, the emulator upstream, the official SDKs."""

from __future__ import annotations

import asyncio
import io
import time
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest

from tests.conftest import Emulator, GatewayHandle

LONG_SYSTEM = "You are a meticulous assistant. " * 400  # ~12 KB, ~3k tokens: cacheable


def oai(gw: GatewayHandle, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key or gw.key, max_retries=0)


def ant(gw: GatewayHandle, key: str | None = None) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=key or gw.key, max_retries=0)


def chat(question: str) -> list[Any]:
    return [{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": question}]


def test_openai_sync_non_stream(gateway: GatewayHandle) -> None:
    r = oai(gateway).chat.completions.create(model="gpt-4o-mini", messages=chat("hi"), max_tokens=8)
    assert r.choices[0].message.content
    assert r.usage is not None and r.usage.prompt_tokens > 1000
    # Metering adds the price the caller pays for this call.
    extra = r.usage.model_extra or {}
    assert extra["cost"] > 0


def test_repeated_prompt_hits_the_provider_cache(gateway: GatewayHandle) -> None:
    client = oai(gateway)
    client.chat.completions.create(model="gpt-4o-mini", messages=chat("first"), max_tokens=4)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=chat("second"), max_tokens=4
    )
    r = raw.parse()
    assert r.usage is not None and r.usage.prompt_tokens_details is not None
    assert r.usage.prompt_tokens_details.cached_tokens >= 1024
    assert int(raw.headers["x-upstream-cache-read"]) == r.usage.prompt_tokens_details.cached_tokens


def test_openai_sync_stream_is_incremental(gateway: GatewayHandle) -> None:
    stream = oai(gateway).chat.completions.create(
        model="gpt-4o-mini", messages=chat("count"), max_tokens=120, stream=True
    )
    arrivals: list[float] = []
    text = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic())
            text.append(chunk.choices[0].delta.content)
        assert chunk.usage is None  # the client did not ask for usage: it never sees it
    assert len(arrivals) > 10
    # The emulator decodes ~1 ms per token: a buffered relay would deliver all at once.
    assert arrivals[-1] - arrivals[0] > 0.05
    assert "".join(text)


def test_openai_stream_with_include_usage(gateway: GatewayHandle) -> None:
    stream = oai(gateway).chat.completions.create(
        model="gpt-4o-mini",
        messages=chat("usage please"),
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    usages = [c.usage for c in stream if c.usage is not None]
    assert len(usages) == 1
    assert usages[0].prompt_tokens > 1000
    assert (usages[0].model_extra or {})["cost"] > 0


async def test_openai_async_stream_and_not(gateway: GatewayHandle) -> None:
    client = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=gateway.key, max_retries=0)
    r = await client.chat.completions.create(model="gpt-4o-mini", messages=chat("a"), max_tokens=4)
    assert r.choices[0].message.content
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=chat("b"), max_tokens=16, stream=True
    )
    parts = [
        c.choices[0].delta.content async for c in stream if c.choices and c.choices[0].delta.content
    ]
    assert len(parts) > 1
    await client.close()


def test_anthropic_create(gateway: GatewayHandle) -> None:
    system = [{"type": "text", "text": LONG_SYSTEM, "cache_control": {"type": "ephemeral"}}]
    client = ant(gateway)
    first = client.messages.create(
        model="claude-sonnet-4-6",
        max_tokens=8,
        system=system,
        messages=[{"role": "user", "content": "one"}],
    )
    assert first.content[0].type == "text"
    second = client.messages.create(
        model="claude-sonnet-4-6",
        max_tokens=8,
        system=system,
        messages=[{"role": "user", "content": "two"}],
    )
    assert (first.usage.cache_creation_input_tokens or 0) + (
        first.usage.cache_read_input_tokens or 0
    ) > 1000
    assert (second.usage.cache_read_input_tokens or 0) > 1000


def test_anthropic_stream(gateway: GatewayHandle) -> None:
    with ant(gateway).messages.stream(
        model="claude-sonnet-4-6",
        max_tokens=64,
        messages=[{"role": "user", "content": "stream it"}],
    ) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1
    assert final.usage.output_tokens > 0


def test_embeddings_and_models(gateway: GatewayHandle) -> None:
    client = oai(gateway)
    emb = client.embeddings.create(model="text-embedding-3-small", input="hello")
    assert len(emb.data[0].embedding) > 0
    ids = {m.id: m for m in client.models.list()}
    assert set(ids) == {"gpt-4o-mini", "text-embedding-3-small", "claude-sonnet-4-6"}
    assert (ids["gpt-4o-mini"].model_extra or {})["supports_caching"] is True


async def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any], Any]:
    data = io.BytesIO(body) if len(body) > 1 << 20 else body
    async with aiohttp.ClientSession() as s, s.post(url, data=data, headers=headers) as r:
        return r.status, dict(r.headers), orjson.loads(await r.read())


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/v1/chat/completions", b"{oops", 400, "not valid JSON"),
        ("/v1/chat/completions", b'{"messages":[]}', 400, "'model' is required"),
        ("/v1/chat/completions", b'{"model":"gpt-5-ultra","messages":[]}', 404, "not available"),
        ("/v1/messages", b"{oops", 400, "not valid JSON"),
        ("/v1/messages", b'{"model":"nope","messages":[],"max_tokens":1}', 404, "not available"),
    ],
)
async def test_bad_input_errors_in_the_callers_format(
    gateway: GatewayHandle, path: str, body: bytes, status: int, needle: str
) -> None:
    code, _, doc = await _post(
        gateway.url + path,
        body,
        {"authorization": f"Bearer {gateway.key}", "content-type": "application/json"},
    )
    assert code == status
    if path == "/v1/messages":
        assert doc["type"] == "error" and needle in doc["error"]["message"]
    else:
        assert needle in doc["error"]["message"]


async def test_body_over_the_limit_is_413(gateway: GatewayHandle) -> None:
    big = (
        b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"'
        + b"x" * (11 * 1024 * 1024)
        + b'"}]}'
    )
    code, _, doc = await _post(
        gateway.url + "/v1/chat/completions", big, {"authorization": f"Bearer {gateway.key}"}
    )
    assert code == 413
    assert "limit" in doc["error"]["message"]


async def test_bad_key_is_401_and_not_echoed(gateway: GatewayHandle) -> None:
    for path in ("/v1/chat/completions", "/v1/messages"):
        code, _, doc = await _post(
            gateway.url + path, b'{"model":"gpt-4o-mini"}', {"x-api-key": "sk-guess-me-123456"}
        )
        assert code == 401
        assert b"sk-guess-me" not in orjson.dumps(doc)


def test_client_key_and_cookies_never_reach_the_provider(
    gateway: GatewayHandle, emulator: Emulator
) -> None:
    client = openai.OpenAI(
        base_url=gateway.url + "/v1",
        api_key=gateway.key,
        max_retries=0,
        default_headers={"cookie": "session=s3cr3t", "x-goog-api-key": "goog-leak"},
    )
    client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "leak?"}], max_tokens=2
    )
    seen = emulator.requests()
    dumped = orjson.dumps(seen).decode()
    assert gateway.key not in dumped
    assert "s3cr3t" not in dumped and "goog-leak" not in dumped
    for entry in seen:
        headers = {k.lower(): v for k, v in entry["headers"].items()}
        credential = headers.get("authorization", "").removeprefix("Bearer ") or headers.get(
            "x-api-key"
        )
        assert credential is not None and credential.startswith("sk-emu-")


async def test_client_disconnect_mid_stream_closes_upstream_fast(
    gateway: GatewayHandle, emulator: Emulator
) -> None:
    before = emulator.stats()["totals"]["disconnects"]
    body = orjson.dumps(
        {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "long"}],
            "max_tokens": 3000,
            "stream": True,
        }
    )
    async with aiohttp.ClientSession() as s:
        resp = await s.post(
            gateway.url + "/v1/chat/completions",
            data=body,
            headers={"authorization": f"Bearer {gateway.key}", "content-type": "application/json"},
        )
        assert resp.status == 200
        assert (await resp.content.readline()).startswith(b"data: ")  # the stream is flowing
        resp.close()  # the client goes away
        gone = time.monotonic()
    while emulator.stats()["totals"]["disconnects"] == before:
        assert time.monotonic() - gone < 1.0, "the upstream request outlived the client by > 1 s"
        await asyncio.sleep(0.02)
