"""The platform cache end to end: real uvicorn, the emulator upstream, the official SDKs,
a plain aiohttp client for the Cache API, and a real redis-server for shared storage."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
import redis.asyncio as redis

from gateway.config import Config, parse_config
from gateway.presets import DEMO_KEY, emulated_config
from tests.conftest import (
    Emulator,
    GatewayHandle,
    LoopThread,
    RedisServer,
    start_gateway,
)

OTHER_KEY = "sk-other"
MODEL = "gpt-4o-mini"
PRICE_SHARE = 0.1


def cache_config(
    emulator: Emulator,
    *,
    response_cache: dict[str, Any] | None = None,
    platform_cache: dict[str, Any] | None = None,
    state: dict[str, Any] | None = None,
) -> Config:
    """The emulated preset with the default group's response cache switched on."""
    base = emulated_config(emulator.url, tokens={"demo": DEMO_KEY, "other": OTHER_KEY}, state=state)
    data = base.model_dump(mode="json")
    data["groups"]["default"]["response_cache"] = {
        "enabled": True,
        "price_share": PRICE_SHARE,
        **(response_cache or {}),
    }
    data["platform_cache"] = platform_cache or {}
    return parse_config(data)


@pytest.fixture(scope="module")
def gw(loop_thread: LoopThread, emulator: Emulator) -> Iterator[GatewayHandle]:
    handle = start_gateway(
        loop_thread, cache_config(emulator, platform_cache={"quota_bytes": 4096})
    )
    yield handle
    handle.stop()


def oai(gw: GatewayHandle, key: str = DEMO_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)


def upstream_requests(emulator: Emulator) -> int:
    return int(emulator.stats()["totals"]["requests"])


def ask(
    gw: GatewayHandle, text: str, *, key: str = DEMO_KEY, headers: dict[str, str] | None = None
) -> tuple[str, Any]:
    raw = oai(gw, key).chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": text}],
        max_tokens=12,
        temperature=0,
        extra_headers=headers or {},
    )
    return raw.headers["x-cache-status"], raw.parse()


def unique(text: str) -> str:
    return f"{text} {uuid.uuid4().hex}"


def test_identical_request_is_a_hit_with_no_upstream_call(
    gw: GatewayHandle, emulator: Emulator
) -> None:
    q = unique("what is a cache?")
    status, first = ask(gw, q)
    assert status == "MISS"
    before = upstream_requests(emulator)
    status, second = ask(gw, q)
    assert status == "HIT"
    assert upstream_requests(emulator) == before  # answered without the provider
    assert second.choices[0].message.content == first.choices[0].message.content
    assert second.id == first.id
    # The same request from another tenant is its own cache: a miss, and a provider call.
    status, _ = ask(gw, q, key=OTHER_KEY)
    assert status == "MISS"
    assert upstream_requests(emulator) == before + 1


def test_sampled_requests_bypass(gw: GatewayHandle, emulator: Emulator) -> None:
    client = oai(gw)
    q = unique("tell me a story")
    for _ in range(2):
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": q}], max_tokens=4
        )
        assert raw.headers["x-cache-status"] == "BYPASS"


def test_no_store_is_never_stored(gw: GatewayHandle, emulator: Emulator) -> None:
    q = unique("private question")
    before = upstream_requests(emulator)
    for _ in range(2):
        status, _ = ask(gw, q, headers={"cache-control": "no-store"})
        assert status == "BYPASS"
    assert upstream_requests(emulator) == before + 2
    status, _ = ask(gw, q)
    assert status == "MISS"  # nothing was stored by the no-store requests


def test_no_cache_refreshes_the_entry(gw: GatewayHandle, emulator: Emulator) -> None:
    q = unique("fresh please")
    ask(gw, q)
    status, _ = ask(gw, q, headers={"cache-control": "no-cache"})
    assert status == "BYPASS"
    before = upstream_requests(emulator)
    assert ask(gw, q)[0] == "HIT"
    assert upstream_requests(emulator) == before


async def _raw_stream(gw: GatewayHandle, body: dict[str, Any]) -> tuple[str, bytes]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            gw.url + "/v1/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {DEMO_KEY}"},
        ) as r,
    ):
        assert r.status == 200
        return r.headers["x-cache-status"], await r.read()


async def test_a_cut_stream_is_never_stored(gw: GatewayHandle, clean_emulator: Emulator) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": unique("cut me")}],
        "max_tokens": 200,
        "temperature": 0,
        "stream": True,
    }
    for i in range(4):
        clean_emulator.faults(f"acct-{i}", cut_after_chunks=3)
    status, data = await _raw_stream(gw, body)
    assert status == "MISS"
    assert b"[DONE]" not in data and b'"error"' in data  # ended by the gateway's error event
    clean_emulator.reset(4)
    status, data = await _raw_stream(gw, body)
    assert status == "MISS"  # the cut answer was not kept
    assert data.endswith(b"data: [DONE]\n\n")
    assert (await _raw_stream(gw, body))[0] == "HIT"


def test_a_replayed_stream_parses_with_the_openai_sdk(
    gw: GatewayHandle, emulator: Emulator
) -> None:
    client = oai(gw)
    messages = [{"role": "user", "content": unique("stream a poem")}]

    def stream(**extra: Any) -> tuple[str, str, list[Any]]:
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=messages, max_tokens=60, temperature=0, stream=True, **extra
        )
        chunks = list(raw.parse())
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return raw.headers["x-cache-status"], text, [c.usage for c in chunks if c.usage]

    status, text, usages = stream()
    assert status == "MISS" and text and usages == []
    before = upstream_requests(emulator)
    status, replayed, usages = stream()
    assert status == "HIT" and replayed == text and usages == []
    # Asking for usage on a hit gets it, priced as a platform-cache hit.
    status, _, usages = stream(stream_options={"include_usage": True})
    assert status == "HIT" and len(usages) == 1
    usage = usages[0]
    full = (usage.prompt_tokens * 0.15 + usage.completion_tokens * 0.60) / 1e6
    assert (usage.model_extra or {})["cost"] == pytest.approx(PRICE_SHARE * full, rel=1e-3)
    assert upstream_requests(emulator) == before


def test_a_replayed_anthropic_stream_parses_with_the_anthropic_sdk(
    gw: GatewayHandle, emulator: Emulator
) -> None:
    client = anthropic.Anthropic(base_url=gw.url, api_key=DEMO_KEY, max_retries=0)
    messages: Any = [{"role": "user", "content": unique("stream in anthropic")}]

    def stream() -> tuple[str, str, int]:
        with client.messages.stream(
            model="claude-sonnet-4-6",
            max_tokens=40,
            messages=messages,
            extra_body={"temperature": 0},
        ) as s:
            text = "".join(s.text_stream)
            final = s.get_final_message()
            return s.response.headers["x-cache-status"], text, final.usage.output_tokens

    first = stream()
    before = upstream_requests(emulator)
    second = stream()
    assert (first[0], second[0]) == ("MISS", "HIT")
    assert second[1:] == first[1:] and second[1]
    assert upstream_requests(emulator) == before


async def _get(gw: GatewayHandle, path: str, key: str = DEMO_KEY) -> Any:
    async with (
        aiohttp.ClientSession() as s,
        s.get(gw.url + path, headers={"authorization": f"Bearer {key}"}) as r,
    ):
        assert r.status == 200, await r.text()
        return orjson.loads(await r.read()) if path != "/metrics" else await r.text()


def _metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if m and ",".join(sorted(m.group(1).split(","))) == want:
            return float(m.group(2))
    return 0.0


async def test_hits_show_in_metrics_and_the_usage_log_apart_from_provider_hits(
    gw: GatewayHandle,
) -> None:
    q = unique("meter me " * 300)  # long enough for the provider's own prompt cache
    ask(gw, q)
    metrics = await _get(gw, "/metrics")
    labels = {"group": "default", "model": MODEL}
    hits = _metric(metrics, "gateway_platform_cache_hits_total", **labels)
    cached = sum(
        _metric(metrics, "gateway_cached_tokens_total", **labels, account=f"openai-{i}")
        for i in range(4)
    )
    status, answer = ask(gw, q)
    assert status == "HIT"
    metrics = await _get(gw, "/metrics")
    assert _metric(metrics, "gateway_platform_cache_hits_total", **labels) == hits + 1
    assert _metric(metrics, "gateway_platform_cache_requests_total", **labels, status="hit") >= 1
    assert _metric(metrics, "gateway_platform_cache_requests_total", **labels, status="miss") >= 1
    after = sum(
        _metric(metrics, "gateway_cached_tokens_total", **labels, account=f"openai-{i}")
        for i in range(4)
    )
    assert after == cached  # a platform hit is not a provider cache read
    logs = await _get(gw, "/v1/usage/logs?limit=5")
    record = logs["data"][0]
    assert record["decision"] == "platform_cache"
    assert record["account"] == "" and record["group"] == "default"
    assert record["cached_tokens"] == 0 and record["prompt_tokens"] == answer.usage.prompt_tokens
    full = (record["prompt_tokens"] * 0.15 + record["completion_tokens"] * 0.60) / 1e6
    assert record["cost"] == pytest.approx(PRICE_SHARE * full, rel=1e-6)
    assert (answer.usage.model_extra or {})["cost"] == pytest.approx(record["cost"], rel=1e-3)
    assert logs["data"][1]["decision"] != "platform_cache"  # the miss before it
    stats = await _get(gw, "/v1/cache/stats")
    assert stats["by_model"][MODEL]["platform_cache_hits"] >= 1


# ---------------------------------------------------------------------------- Cache API


async def _api(
    gw: GatewayHandle, method: str, path: str, body: Any = None, key: str = DEMO_KEY
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.request(
            method,
            gw.url + "/api/v1/cache" + path,
            json=body,
            headers={"authorization": f"Bearer {key}"},
        ) as r,
    ):
        return r.status, orjson.loads(await r.read())


async def test_cache_api_flows_with_a_plain_client(gw: GatewayHandle) -> None:
    key = "/" + unique("profile").replace(" ", "-")
    status, put = await _api(gw, "PUT", key, {"value": {"name": "Ada"}, "ttl": 60, "tags": ["p"]})
    assert status == 200 and put["stored"] is True
    status, got = await _api(gw, "GET", key)
    assert status == 200 and got["hit"] is True and got["value"] == {"name": "Ada"}
    assert got["tags"] == ["p"] and got["expires_at"] - got["created_at"] == pytest.approx(60)
    status, listed = await _api(gw, "GET", "?tag=p")
    assert key[1:] in [d["key"] for d in listed["data"]]
    assert listed["storage_used_bytes"] >= put["size"] and listed["total"] >= 1
    assert await _api(gw, "DELETE", key) == (200, {"key": key[1:], "deleted": True})
    assert await _api(gw, "GET", key) == (200, {"hit": False, "key": key[1:]})
    assert (await _api(gw, "GET", key, key="sk-wrong"))[0] == 401


async def test_cache_api_tenants_quota_ttl(gw: GatewayHandle) -> None:
    await _api(gw, "PUT", "/mine", {"value": "demo's", "tags": ["iso"]})
    assert (await _api(gw, "GET", "/mine", key=OTHER_KEY))[1]["hit"] is False
    assert (await _api(gw, "DELETE", "/mine", key=OTHER_KEY))[1]["deleted"] is False
    other_list = (await _api(gw, "GET", "?tag=iso", key=OTHER_KEY))[1]
    assert other_list["total"] == 0
    assert (await _api(gw, "GET", "/mine"))[1]["value"] == "demo's"
    # The quota (4 KiB in this gateway): a clear 413 in the OpenAI error format.
    status, err = await _api(gw, "PUT", "/big", {"value": "x" * 5000}, key=OTHER_KEY)
    assert status == 413
    assert "storage quota exceeded" in err["error"]["message"]
    assert err["error"]["code"] == "cache_quota_exceeded"
    # TTL expiry.
    await _api(gw, "PUT", "/brief", {"value": 1, "ttl": 0.2}, key=OTHER_KEY)
    await asyncio.sleep(0.3)
    assert (await _api(gw, "GET", "/brief", key=OTHER_KEY))[1]["hit"] is False


# ------------------------------------------------------------------------------- Redis


@pytest.fixture
def redis_gw(
    loop_thread: LoopThread,
    emulator: Emulator,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[GatewayHandle, str]]:
    prefix = f"pc{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("AG_TEST_CACHE_KEY", base64.b64encode(os.urandom(32)).decode())
    config = cache_config(
        emulator,
        state={"redis_url": redis_server.url, "key_prefix": prefix},
        platform_cache={"encryption_keys": [{"id": "k1", "key": "${AG_TEST_CACHE_KEY}"}]},
    )
    handle = start_gateway(loop_thread, config)
    yield handle, prefix
    handle.stop()


async def _raw_values(url: str, prefix: str) -> dict[bytes, bytes]:
    """Every value under the prefix, as bytes, whatever its Redis type."""
    r = redis.Redis.from_url(url)
    out: dict[bytes, bytes] = {}
    try:
        async for k in r.scan_iter(match=f"{prefix}:*"):
            kind = (await r.type(k)).decode()
            if kind == "string":
                out[k] = await r.get(k)
            elif kind == "hash":
                out[k] = orjson.dumps({str(f): str(v) for f, v in (await r.hgetall(k)).items()})
            elif kind == "zset":
                out[k] = b"\0".join(await r.zrange(k, 0, -1))
    finally:
        await r.aclose()
    return out


async def test_redis_values_are_encrypted_at_rest(
    redis_gw: tuple[GatewayHandle, str], redis_server: RedisServer
) -> None:
    gw, prefix = redis_gw
    canary = "canary-" + uuid.uuid4().hex
    assert (await _api(gw, "PUT", "/doc", {"value": {"s": canary}, "tags": ["t"]}))[0] == 200
    q = unique("cache this in redis")
    assert ask(gw, q)[0] == "MISS"
    status, answer = ask(gw, q)
    assert status == "HIT"
    content = answer.choices[0].message.content
    assert len(content) > 8
    values = await _raw_values(redis_server.url, prefix)
    assert any(b":kv:" in k for k in values) and any(b":rc:" in k for k in values)
    for raw in values.values():
        assert canary.encode() not in raw
        assert content.encode() not in raw
    assert (await _api(gw, "GET", "/doc"))[1]["value"] == {"s": canary}


async def test_redis_tampered_or_moved_values_are_counted_misses(
    redis_gw: tuple[GatewayHandle, str], redis_server: RedisServer
) -> None:
    gw, prefix = redis_gw
    await _api(gw, "PUT", "/a", {"value": "A"})
    await _api(gw, "PUT", "/b", {"value": "B"})
    base = f"{prefix}:kv:{{{b'demo'.hex()}}}:v:"
    r = redis.Redis.from_url(redis_server.url)
    try:
        blob_a = await r.get(base + "a")
        await r.set(base + "b", blob_a, keepttl=True)  # moved to another key
        assert (await _api(gw, "GET", "/b"))[1]["hit"] is False
        await r.set(base + "a", blob_a[:-1] + bytes([blob_a[-1] ^ 1]), keepttl=True)
        assert (await _api(gw, "GET", "/a"))[1]["hit"] is False
        # Moved to another tenant under the same key.
        await _api(gw, "PUT", "/a", {"value": "theirs"}, key=OTHER_KEY)
        other = f"{prefix}:kv:{{{b'other'.hex()}}}:v:a"
        await r.set(other, blob_a, keepttl=True)
        assert (await _api(gw, "GET", "/a", key=OTHER_KEY))[1]["hit"] is False
    finally:
        await r.aclose()
    metrics = await _get(gw, "/metrics")
    assert _metric(metrics, "gateway_platform_cache_decrypt_failures_total", cache="api") == 3
