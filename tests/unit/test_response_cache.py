"""The response cache middleware, driven by ASGI fakes (and composed with metering)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson
import pytest
from starlette.types import Receive, Scope, Send

from gateway.cachestore import CacheCounters, MemoryBlobs
from gateway.config import AccountConfig, Route
from gateway.context import Endpoint, Principal, RequestContext
from gateway.crypto import KeyRing
from gateway.errors import BadRequest, UpstreamError
from gateway.metrics import Metrics
from gateway.pricing import Price
from gateway.sse import SSEParser
from gateway.upstream import Account
from gateway.usagelog import MemoryUsageLog
from middleware.metering import MeteringMiddleware
from middleware.response_cache import (
    CachePolicy,
    ResponseCacheMiddleware,
    completed,
    deterministic,
    directives,
    replay_chunks,
)
from tests.asgi import Recorder, body_receive, make_ctx, make_scope

OPENAI = Account.from_config(
    AccountConfig(name="a1", provider="openai", base_url="http://127.0.0.1:1/v1", api_key="sk-x")
)
ANTHROPIC = Account.from_config(
    AccountConfig(name="b1", provider="anthropic", base_url="http://127.0.0.1:1/v1", api_key="sk-y")
)
SECRET = b"unit-test-secret-0123456789"
CANARY = "canary-7f3a9c"
JSON_ANSWER = orjson.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "gpt-4o",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": CANARY}}],
        "usage": {
            "prompt_tokens": 2000,
            "completion_tokens": 10,
            "total_tokens": 2010,
            "prompt_tokens_details": {"cached_tokens": 1024},
        },
    }
)


def chat_chunk(content: str | None = None, *, finish: str | None = None) -> bytes:
    delta = {"content": content} if content is not None else {}
    doc = {
        "id": "chatcmpl-2",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(doc) + b"\n\n"


USAGE_CHUNK = (
    b'data: {"id":"chatcmpl-2","object":"chat.completion.chunk","choices":[],'
    b'"usage":{"prompt_tokens":2000,"completion_tokens":40,"total_tokens":2040,'
    b'"prompt_tokens_details":{"cached_tokens":1024}}}\n\n'
)
CHAT_STREAM = (
    b"".join(chat_chunk(f"word{i} ") for i in range(40))
    + chat_chunk(finish="stop")
    + USAGE_CHUNK
    + b"data: [DONE]\n\n"
)
MESSAGES_STREAM = (
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1",'
    b'"usage":{"input_tokens":10,"output_tokens":1}}}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"hi"}}\n\n'
    b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":2}}\n\n'
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
)


class Upstream:
    """A fake upstream app: answers with `parts` (JSON or SSE) and counts its calls."""

    def __init__(
        self,
        parts: Iterable[bytes] = (JSON_ANSWER,),
        *,
        sse: bool = False,
        status: int = 200,
        account: Account = OPENAI,
        fail_after: int | None = None,
    ) -> None:
        self.parts = list(parts)
        self.sse = sse
        self.status = status
        self.account = account
        self.fail_after = fail_after
        self.calls = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls += 1
        ctx = RequestContext.of(scope)
        ctx.route = ctx.plan[0]  # as pinning would
        ctx.account = self.account
        ctype = b"text/event-stream" if self.sse else b"application/json"
        await send(
            {
                "type": "http.response.start",
                "status": self.status,
                "headers": [(b"content-type", ctype)],
            }
        )
        for i, part in enumerate(self.parts):
            if self.fail_after is not None and i == self.fail_after:
                raise UpstreamError("the connection broke")
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def ctx_for(
    body: dict[str, Any],
    *,
    token: str = "alice",
    group: str = "g",
    endpoint: Endpoint = Endpoint.CHAT,
) -> RequestContext:
    ctx = make_ctx(endpoint, body=body, model=str(body.get("model", "")))
    ctx.raw_body = orjson.dumps(body)
    ctx.stream = body.get("stream") is True
    ctx.principal = Principal(token=token, user=token, user_group="default", group=group)
    ctx.plan = (Route(group, "pool", 1.0, "prefix"),)
    return ctx


def question(text: str = "hello", **extra: Any) -> dict[str, Any]:
    return {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": text}],
        "temperature": 0,
        **extra,
    }


class Harness:
    def __init__(
        self,
        upstream: Upstream | None = None,
        *,
        policy: CachePolicy | None = None,
        keys: KeyRing | None = None,
        clock: list[float] | None = None,
    ) -> None:
        self.upstream = upstream or Upstream()
        self.now = clock or [1000.0]
        self.store = MemoryBlobs(clock=lambda: self.now[0])
        self.counters = CacheCounters()
        self.keys = keys if keys is not None else KeyRing.ephemeral()
        self.mw = ResponseCacheMiddleware(
            self.upstream,
            policies={"g": policy or CachePolicy()},
            store=self.store,
            keys=self.keys,
            secret=SECRET,
            counters=self.counters,
        )

    async def call(
        self,
        body: dict[str, Any],
        *,
        headers: Iterable[tuple[str, str]] = (),
        **ctx_args: Any,
    ) -> tuple[RequestContext, Recorder]:
        ctx = ctx_for(body, **ctx_args)
        rec = Recorder()
        await self.mw(make_scope(ctx=ctx, headers=headers), body_receive(), rec)
        return ctx, rec


def status(rec: Recorder) -> bytes | None:
    return rec.headers.get(b"x-cache-status")


async def test_a_repeated_request_is_a_hit_without_an_upstream_call() -> None:
    h = Harness()
    ctx1, first = await h.call(question())
    ctx2, second = await h.call(question())
    assert h.upstream.calls == 1
    assert (status(first), status(second)) == (b"MISS", b"HIT")
    assert ctx1.cache_status == "MISS" and ctx1.cache_hit is None
    assert ctx2.cache_status == "HIT"
    assert ctx2.cache_hit is not None
    assert (ctx2.cache_hit.group, ctx2.cache_hit.provider) == ("g", "openai")
    assert ctx2.cache_hit.price_share == 0.1
    assert second.body == first.body == JSON_ANSWER
    assert second.headers[b"content-type"] == b"application/json"
    assert int(second.headers[b"content-length"]) == len(JSON_ANSWER)
    assert second.headers[b"age"] == b"0"


async def test_disabled_group_passes_straight_through() -> None:
    h = Harness()
    for _ in range(2):
        ctx, rec = await h.call(question(), group="other")
        assert status(rec) is None and ctx.cache_status == ""
    assert h.upstream.calls == 2
    assert len(h.store) == 0


async def test_another_tenant_misses_unless_the_group_shares() -> None:
    h = Harness()
    await h.call(question(), token="alice")
    _, rec = await h.call(question(), token="bob")
    assert status(rec) == b"MISS" and h.upstream.calls == 2

    shared = Harness(policy=CachePolicy(shared=True))
    await shared.call(question(), token="alice")
    _, rec = await shared.call(question(), token="bob")
    assert status(rec) == b"HIT" and shared.upstream.calls == 1


async def test_non_semantic_fields_do_not_split_the_cache() -> None:
    h = Harness()
    await h.call(question(user="u1", metadata={"a": 1}))
    _, rec = await h.call(question(user="u2", metadata={"b": 2}, prompt_cache_key="x"))
    assert status(rec) == b"HIT"
    # ...but what changes the answer does.
    _, rec = await h.call(question("something else"))
    assert status(rec) == b"MISS"
    _, rec = await h.call(question(max_tokens=5))
    assert status(rec) == b"MISS"


async def test_no_store_is_neither_read_nor_stored() -> None:
    h = Harness()
    _, rec = await h.call(question(), headers=[("cache-control", "no-store")])
    assert status(rec) == b"BYPASS"
    assert len(h.store) == 0
    _, rec = await h.call(question())
    assert status(rec) == b"MISS"
    # A stored answer is not served to a no-store request either.
    _, rec = await h.call(question(), headers=[("cache-control", "private, no-store")])
    assert status(rec) == b"BYPASS" and h.upstream.calls == 3


async def test_no_cache_skips_the_lookup_but_stores() -> None:
    h = Harness()
    await h.call(question())
    _, rec = await h.call(question(), headers=[("Cache-Control", "no-cache")])
    assert status(rec) == b"BYPASS" and h.upstream.calls == 2
    _, rec = await h.call(question())
    assert status(rec) == b"HIT" and h.upstream.calls == 2


async def test_ttl_and_its_override() -> None:
    now = [1000.0]
    h = Harness(policy=CachePolicy(ttl_seconds=60), clock=now)
    await h.call(question("a"))
    await h.call(question("b"), headers=[("x-cache-ttl", "600")])
    now[0] += 61
    _, a = await h.call(question("a"))
    _, b = await h.call(question("b"))
    assert (status(a), status(b)) == (b"MISS", b"HIT")
    _, rec = await h.call(question("c"), headers=[("x-cache-ttl", "0")])
    _, rec = await h.call(question("c"))
    assert status(rec) == b"MISS"  # a zero TTL is not stored
    with pytest.raises(BadRequest, match="x-cache-ttl"):
        await h.call(question("d"), headers=[("x-cache-ttl", "soon")])


@pytest.mark.parametrize(
    "extra",
    [
        {"temperature": 0.7},
        {"temperature": None},
        {"n": 2},
        {"tools": [{"type": "function", "function": {"name": "f"}}]},
    ],
)
async def test_sampled_requests_bypass(extra: dict[str, Any]) -> None:
    body = {k: v for k, v in {**question(), **extra}.items() if v is not None}
    h = Harness()
    for _ in range(2):
        _, rec = await h.call(body)
        assert status(rec) == b"BYPASS"
    assert h.upstream.calls == 2 and len(h.store) == 0
    # A group may cache them anyway.
    opted = Harness(policy=CachePolicy(cache_nondeterministic=True))
    await opted.call(body)
    _, rec = await opted.call(body)
    assert status(rec) == b"HIT"


def test_deterministic() -> None:
    base = {"model": "m", "messages": []}
    assert not deterministic(base, Endpoint.CHAT)  # the providers' default temperature is 1
    assert deterministic({**base, "temperature": 0}, Endpoint.CHAT)
    assert deterministic({**base, "temperature": 0.9, "seed": 7}, Endpoint.CHAT)
    assert not deterministic({**base, "temperature": 0, "n": 3}, Endpoint.CHAT)
    assert not deterministic({**base, "temperature": 0, "tools": [{}]}, Endpoint.MESSAGES)
    assert deterministic({"model": "e", "input": "x"}, Endpoint.EMBEDDINGS)


def test_directives() -> None:
    assert directives([]) == (True, True, None)
    assert directives([(b"cache-control", b"No-Cache")]) == (False, True, None)
    assert directives([(b"cache-control", b"max-age=0, no-store")]) == (False, False, None)
    assert directives([(b"x-cache-ttl", b"30")]) == (True, True, 30.0)
    assert directives([(b"x-cache-ttl", b"0")]) == (True, False, 0.0)
    for bad in (b"-1", b"inf", b"nan", b"x"):
        with pytest.raises(BadRequest):
            directives([(b"x-cache-ttl", bad)])


async def test_stream_and_json_are_cached_apart() -> None:
    h = Harness(Upstream([CHAT_STREAM], sse=True))
    await h.call(question(stream=True))
    _, rec = await h.call(question())
    assert status(rec) == b"MISS"  # a JSON request is not answered with a stored stream


async def test_a_complete_stream_is_replayed_as_whole_events() -> None:
    # Upstream chunks cut anywhere, even inside events.
    cuts = [CHAT_STREAM[i : i + 37] for i in range(0, len(CHAT_STREAM), 37)]
    h = Harness(Upstream(cuts, sse=True))
    _, first = await h.call(question(stream=True))
    _, second = await h.call(question(stream=True, stream_options={"include_usage": True}))
    assert h.upstream.calls == 1 and status(second) == b"HIT"
    assert second.body == first.body == CHAT_STREAM
    assert second.headers[b"content-type"] == b"text/event-stream"
    assert second.headers[b"cache-control"] == b"no-cache"
    chunks = [m["body"] for m in second.messages[1:] if m["body"]]
    assert len(chunks) > 1
    for chunk in chunks:  # every write holds whole events
        parser = SSEParser()
        assert parser.feed(chunk) and parser.flush() == b""
    assert second.messages[-1] == {"type": "http.response.body", "body": b"", "more_body": False}


def test_replay_chunks_keeps_every_byte() -> None:
    chunks = replay_chunks(CHAT_STREAM, 100)
    assert b"".join(chunks) == CHAT_STREAM
    assert all(c.endswith(b"\n\n") for c in chunks)


@pytest.mark.parametrize(
    "stream",
    [
        CHAT_STREAM[: CHAT_STREAM.index(b"word10")],  # cut mid-way: no [DONE]
        CHAT_STREAM[:-3],  # cut inside the last event
        CHAT_STREAM.replace(
            b"data: [DONE]", b'data: {"error":{"type":"server_error"}}\n\ndata: [DONE]'
        ),
    ],
    ids=["cut", "cut-in-event", "error-event"],
)
async def test_an_incomplete_stream_is_never_stored(stream: bytes) -> None:
    h = Harness(Upstream([stream], sse=True))
    await h.call(question(stream=True))
    _, rec = await h.call(question(stream=True))
    assert status(rec) == b"MISS" and len(h.store) == 0


async def test_a_stream_broken_by_an_error_is_never_stored() -> None:
    h = Harness(Upstream([CHAT_STREAM[:500], CHAT_STREAM[500:]], sse=True, fail_after=1))
    with pytest.raises(UpstreamError):
        await h.call(question(stream=True))
    assert len(h.store) == 0


async def test_anthropic_streams_need_message_stop() -> None:
    good = Harness(Upstream([MESSAGES_STREAM], sse=True, account=ANTHROPIC))
    body = {"model": "claude", "messages": [], "max_tokens": 5, "temperature": 0, "stream": True}
    await good.call(body, endpoint=Endpoint.MESSAGES)
    ctx, rec = await good.call(body, endpoint=Endpoint.MESSAGES)
    assert status(rec) == b"HIT" and rec.body == MESSAGES_STREAM
    assert ctx.cache_hit is not None and ctx.cache_hit.provider == "anthropic"
    cut = MESSAGES_STREAM[: MESSAGES_STREAM.index(b"event: message_stop")]
    bad = Harness(Upstream([cut], sse=True, account=ANTHROPIC))
    await bad.call(body, endpoint=Endpoint.MESSAGES)
    assert len(bad.store) == 0


def test_completed() -> None:
    assert completed(Endpoint.CHAT, False, JSON_ANSWER)
    assert not completed(Endpoint.CHAT, False, b'{"error":{"message":"x"}}')
    assert not completed(Endpoint.CHAT, False, JSON_ANSWER[:-1])
    assert completed(Endpoint.RESPONSES, False, b'{"status":"completed","error":null}')
    assert not completed(Endpoint.RESPONSES, False, b'{"status":"incomplete","error":null}')
    assert completed(Endpoint.CHAT, True, CHAT_STREAM)
    assert not completed(Endpoint.CHAT, True, b"")
    done = b'event: response.completed\ndata: {"type":"response.completed"}\n\n'
    failed = b'event: response.failed\ndata: {"type":"response.failed"}\n\n'
    assert completed(Endpoint.RESPONSES, True, done)
    assert not completed(Endpoint.RESPONSES, True, failed + done)
    assert not completed(Endpoint.MESSAGES, True, MESSAGES_STREAM + b"event: error\ndata: {}\n\n")


async def test_errors_and_oversized_answers_are_not_stored() -> None:
    h = Harness(Upstream(status=201))
    await h.call(question())
    assert len(h.store) == 0
    big = Harness(policy=CachePolicy(max_entry_bytes=100))
    _, rec = await big.call(question())
    assert rec.body == JSON_ANSWER  # passed on whole
    assert len(big.store) == 0


async def test_responses_are_cached_only_when_not_stored_upstream() -> None:
    answer = orjson.dumps({"id": "resp_1", "object": "response", "output": []})
    h = Harness(Upstream([answer]))
    stored = {"model": "gpt-4o", "input": "hi", "temperature": 0}
    for _ in range(2):
        _, rec = await h.call(stored, endpoint=Endpoint.RESPONSES)
        assert status(rec) == b"BYPASS"
    body = {**stored, "store": False}
    await h.call(body, endpoint=Endpoint.RESPONSES)
    _, rec = await h.call(body, endpoint=Endpoint.RESPONSES)
    assert status(rec) == b"HIT"


async def test_stored_answers_are_sealed_and_bound_to_their_key() -> None:
    h = Harness()
    await h.call(question("one"))
    await h.call(question("two"))
    items = h.store._items
    assert len(items) == 2
    for _, blob in items.values():
        assert CANARY.encode() not in blob
    (k1, (exp1, blob1)), (k2, (exp2, _)) = list(items.items())
    # A flipped bit: a miss, counted, and the upstream answers again.
    items[k1] = (exp1, blob1[:-1] + bytes([blob1[-1] ^ 1]))
    _, rec = await h.call(question("one"))
    assert status(rec) == b"MISS" and h.counters.response_decrypt_failures == 1
    # A ciphertext moved to another key does not decrypt there.
    items[k2] = (exp2, items[k1][1])
    _, rec = await h.call(question("two"))
    assert status(rec) == b"MISS" and h.counters.response_decrypt_failures == 2


class BrokenStore(MemoryBlobs):
    async def get(self, key: bytes) -> bytes | None:
        from gateway.cachestore import StoreUnavailable

        raise StoreUnavailable("down")

    async def put(self, key: bytes, blob: bytes, ttl: float) -> None:
        from gateway.cachestore import StoreUnavailable

        raise StoreUnavailable("down")


async def test_a_failing_store_is_a_miss_not_an_error() -> None:
    upstream = Upstream()
    counters = CacheCounters()
    mw = ResponseCacheMiddleware(
        upstream,
        policies={"g": CachePolicy()},
        store=BrokenStore(),
        keys=None,
        secret=SECRET,
        counters=counters,
    )
    rec = Recorder()
    await mw(make_scope(ctx=ctx_for(question())), body_receive(), rec)
    assert rec.status == 200 and status(rec) == b"MISS"
    assert counters.store_errors == 2


# ---- composed with metering: a hit is priced and counted as a platform-cache hit

PRICE = Price(input=1.0, cached_input=0.1, output=2.0)


async def metered(
    h: Harness, metrics: Metrics, log: MemoryUsageLog, body: dict[str, Any]
) -> tuple[RequestContext, Recorder]:
    mw = MeteringMiddleware(h.mw, metrics=metrics, prices={"gpt-4o": PRICE}, usage_log=log)
    ctx = ctx_for(body)
    rec = Recorder()
    await mw(make_scope(ctx=ctx), body_receive(), rec)
    return ctx, rec


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return value or 0.0


async def test_a_hit_is_metered_as_a_platform_cache_hit() -> None:
    metrics, log = Metrics(), MemoryUsageLog()
    h = Harness()
    miss_ctx, _ = await metered(h, metrics, log, question())
    hit_ctx, rec = await metered(h, metrics, log, question())
    # 2000 prompt tokens at $1/M and 10 output at $2/M, no caching: $0.00202.
    full = (2000 * 1.0 + 10 * 2.0) / 1e6
    assert miss_ctx.cost is not None and miss_ctx.cost < full  # the provider cache read
    assert hit_ctx.cost == pytest.approx(0.1 * full)
    assert hit_ctx.cache_discount == pytest.approx(0.9 * full)
    assert rec.json()["usage"]["cost"] == pytest.approx(0.1 * full)
    assert rec.headers[b"x-upstream-cache-read"] == b"0"
    miss_record, hit_record = log.export()
    assert hit_record.decision == "platform_cache" and miss_record.decision != "platform_cache"
    assert hit_record.account == "" and hit_record.group == "g"
    assert hit_record.cached_tokens == 0 and hit_record.prompt_tokens == 2000
    assert miss_record.cached_tokens == 1024
    labels = {"group": "g", "model": "gpt-4o"}
    assert sample(metrics, "gateway_platform_cache_hits_total", **labels) == 1
    assert sample(metrics, "gateway_platform_cache_requests_total", **labels, status="hit") == 1
    assert sample(metrics, "gateway_platform_cache_requests_total", **labels, status="miss") == 1
    # Provider prompt-cache reads count only the upstream call.
    cached = sample(metrics, "gateway_cached_tokens_total", **labels, account="a1")
    assert cached == 1024


async def test_a_replayed_stream_is_metered_and_hides_the_usage_chunk() -> None:
    metrics, log = Metrics(), MemoryUsageLog()
    h = Harness(Upstream([CHAT_STREAM], sse=True))
    await metered(h, metrics, log, question(stream=True))
    ctx, rec = await metered(h, metrics, log, question(stream=True))
    assert ctx.cache_status == "HIT"
    assert b'"usage"' not in rec.body  # the caller did not ask for it
    assert rec.body.endswith(b"data: [DONE]\n\n")
    full = (2000 * 1.0 + 40 * 2.0) / 1e6
    assert ctx.usage is not None and not ctx.usage.estimated
    assert ctx.cost == pytest.approx(0.1 * full)
    assert log.export()[-1].decision == "platform_cache"
