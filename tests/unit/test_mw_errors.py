from __future__ import annotations

import orjson
import pytest
from starlette.types import Receive, Scope, Send

from gateway.context import RequestContext
from gateway.errors import BadRequest, ClientGone, RateLimited, RouteExhausted, UpstreamTimeout
from middleware.errors import ErrorsMiddleware
from tests.asgi import Recorder, body_receive, make_scope


def raising(exc: BaseException):  # type: ignore[no-untyped-def]
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise exc

    return app


async def test_openai_family_error_shape() -> None:
    send = Recorder()
    mw = ErrorsMiddleware(raising(BadRequest("bad thing", param="model")))
    await mw(make_scope("/v1/chat/completions"), body_receive(), send)
    assert send.status == 400
    err = send.json()["error"]
    assert err == {
        "message": "bad thing",
        "type": "invalid_request_error",
        "param": "model",
        "code": None,
    }
    assert send.headers[b"x-request-id"]


async def test_anthropic_family_error_shape() -> None:
    send = Recorder()
    mw = ErrorsMiddleware(raising(UpstreamTimeout("slow")))
    await mw(make_scope("/v1/messages"), body_receive(), send)
    assert send.status == 504
    assert send.json() == {"type": "error", "error": {"type": "api_error", "message": "slow"}}


async def test_rate_limited_carries_retry_after() -> None:
    send = Recorder()
    mw = ErrorsMiddleware(raising(RateLimited("busy", retry_after=1.2)))
    await mw(make_scope(), body_receive(), send)
    assert send.status == 429
    assert send.headers[b"retry-after"] == b"2"


async def test_route_exhausted_renders_the_last_error() -> None:
    send = Recorder()
    mw = ErrorsMiddleware(raising(RouteExhausted(UpstreamTimeout("gone quiet"))))
    await mw(make_scope(), body_receive(), send)
    assert send.status == 504


async def test_unexpected_exception_is_a_500_without_details() -> None:
    send = Recorder()
    mw = ErrorsMiddleware(raising(RuntimeError("secret internals sk-live-123")))
    await mw(make_scope(), body_receive(), send)
    assert send.status == 500
    assert b"sk-live-123" not in send.body
    assert b"internals" not in send.body


async def test_error_after_stream_start_ends_stream_with_one_event() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        await send({"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True})
        raise UpstreamTimeout("stalled")

    send = Recorder()
    await ErrorsMiddleware(app)(make_scope(), body_receive(), send)
    assert send.status == 200
    assert [m["type"] for m in send.messages].count("http.response.start") == 1
    last = send.messages[-1]
    assert last["more_body"] is False
    assert last["body"].startswith(b"data: ")
    assert orjson.loads(last["body"][6:])["error"]["message"] == "stalled"


async def test_anthropic_stream_error_is_an_error_event() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream; charset=utf-8")],
            }
        )
        raise UpstreamTimeout("stalled")

    send = Recorder()
    await ErrorsMiddleware(app)(make_scope("/v1/messages"), body_receive(), send)
    assert send.messages[-1]["body"].startswith(b"event: error\ndata: ")


async def test_client_gone_sends_nothing() -> None:
    send = Recorder()
    await ErrorsMiddleware(raising(ClientGone("bye")))(make_scope(), body_receive(), send)
    assert send.messages == []


async def test_context_is_created_with_family_and_endpoint() -> None:
    seen: list[RequestContext] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(RequestContext.of(scope))

    await ErrorsMiddleware(app)(make_scope("/v1/messages"), body_receive(), Recorder())
    assert seen[0].family == "anthropic"
    assert seen[0].endpoint is not None and seen[0].endpoint.value == "messages"


@pytest.mark.parametrize("kind", ["lifespan", "websocket"])
async def test_non_http_passes_through(kind: str) -> None:
    called: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        called.append(scope["type"])

    await ErrorsMiddleware(app)({"type": kind}, body_receive(), Recorder())
    assert called == [kind]
