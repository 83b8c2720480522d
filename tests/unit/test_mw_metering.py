from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.types import Receive, Scope, Send

from gateway.config import AccountConfig, Route
from gateway.context import Endpoint, Principal, RequestContext
from gateway.metrics import Metrics
from gateway.pricing import Price
from gateway.upstream import Account
from gateway.usage import stream_usage_patch
from gateway.usagelog import MemoryUsageLog
from middleware.metering import MeteringMiddleware
from tests.asgi import Recorder, body_receive, make_ctx, make_scope

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "usage"
ACCOUNT = Account.from_config(
    AccountConfig(name="a1", provider="openai", base_url="http://127.0.0.1:1/v1", api_key="sk-x")
)
PRICE = Price(input=1.0, cached_input=0.1, output=2.0)


def sse_stream(name: str) -> bytes:
    doc = json.loads((FIXTURES / name).read_text())
    parts = []
    for event in doc["events"]:
        data = event["data"]
        payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
        parts.append(f"data: {payload}\n\n".encode())
    parts.append(b"data: [DONE]\n\n")
    return b"".join(parts)


def upstream(stream: bytes, cuts: list[int]):  # type: ignore[no-untyped-def]
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        ctx = RequestContext.of(scope)
        ctx.account = ACCOUNT
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        last = 0
        for cut in [*sorted(set(cuts)), len(stream)]:
            await send({"type": "http.response.body", "body": stream[last:cut], "more_body": True})
            last = cut
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


def ctx_for(body: dict[str, Any]) -> RequestContext:
    ctx = make_ctx(Endpoint.CHAT, body=body, model="gpt-4o", stream=True)
    ctx.principal = Principal(token="t", user="u", user_group="default", group="g")
    ctx.plan = (Route("g", "p", 1.0, "prefix"),)
    ctx.route = ctx.plan[0]
    return ctx


async def run(
    stream: bytes, body: dict[str, Any], cuts: list[int]
) -> tuple[RequestContext, bytes, MemoryUsageLog]:
    log = MemoryUsageLog()
    mw = MeteringMiddleware(
        upstream(stream, cuts), metrics=Metrics(), prices={"gpt-4o": PRICE}, usage_log=log
    )
    ctx = ctx_for(body)
    send = Recorder()
    await mw(make_scope(ctx=ctx), body_receive(), send)
    return ctx, send.body, log


STREAM = sse_stream("openai_chat_stream_cached.json")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, len(STREAM)), max_size=8))
async def test_stream_without_include_usage_is_upstream_minus_the_usage_chunk(
    cuts: list[int],
) -> None:
    ctx, out, log = await run(STREAM, {"model": "gpt-4o", "stream": True}, cuts)
    # The gateway asks the provider for usage on the caller's behalf...
    assert stream_usage_patch(ctx.body) == {"include_usage": True}
    events = STREAM.split(b"\n\n")
    usage_only = [e for e in events if b'"usage"' in e and b'"choices":[]' in e]
    assert len(usage_only) == 1
    # ...and the caller sees the upstream bytes, that chunk removed and nothing else.
    assert out == STREAM.replace(usage_only[0] + b"\n\n", b"")
    assert ctx.usage is not None and not ctx.usage.estimated
    assert ctx.usage.cached_tokens > 0
    assert log.export()[-1].cached_tokens == ctx.usage.cached_tokens
    assert ctx.cost is not None and ctx.cost > 0


async def test_stream_with_include_usage_keeps_the_chunk_and_adds_the_cost() -> None:
    body = {"model": "gpt-4o", "stream": True, "stream_options": {"include_usage": True}}
    ctx, out, _ = await run(STREAM, body, [])
    assert stream_usage_patch(body) is None
    usage_events = [e for e in out.split(b"\n\n") if b'"usage":{' in e]
    assert len(usage_events) == 1
    usage = orjson.loads(usage_events[0].removeprefix(b"data: "))["usage"]
    assert usage["cost"] == ctx.cost
    assert "cache_discount" in usage


async def test_stream_cut_before_usage_is_estimated_never_zero() -> None:
    head = STREAM[: STREAM.index(b"\n\n", 400) + 2]  # a couple of chunks, no usage
    ctx, _, log = await run(head, {"model": "gpt-4o", "stream": True}, [])
    assert ctx.usage is not None and ctx.usage.estimated
    assert ctx.usage.prompt_tokens > 0 and ctx.usage.completion_tokens > 0
    assert log.export()[-1].estimated


async def test_refused_request_model_never_becomes_a_label() -> None:
    metrics = Metrics()
    mw = MeteringMiddleware(
        upstream(b"", []), metrics=metrics, prices={}, usage_log=MemoryUsageLog()
    )
    ctx = make_ctx(Endpoint.CHAT, model="attacker-chosen-model-name")
    ctx.principal = Principal(token="t", user="u", user_group="default", group="g")
    await mw(make_scope(ctx=ctx), body_receive(), Recorder())
    assert b"attacker-chosen" not in metrics.render()
