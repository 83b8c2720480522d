"""Outermost layer: creates the request context and renders every error.

Writes ctx (request id, family, endpoint) and ctx.response_started. A `GatewayError`
raised before the response started becomes the caller's API-family error JSON; after
an SSE stream started, one terminal error event ends it; a client that went away gets
nothing. Anything else is logged without its details and answered as a 500.
"""

from __future__ import annotations

import asyncio
import logging
import os

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.context import SCOPE_KEY, Endpoint, Family, RequestContext
from gateway.drain import Drain
from gateway.errors import (
    ClientGone,
    GatewayError,
    RouteExhausted,
    ShuttingDown,
    error_body,
    error_event,
)

log = logging.getLogger(__name__)

_ENDPOINTS = {f"/v1/{e.value}": e for e in Endpoint}
_JSON = (b"content-type", b"application/json")


def new_request_id() -> str:
    return os.urandom(12).hex()


class ErrorsMiddleware:
    def __init__(self, app: ASGIApp, *, drain: Drain | None = None) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        endpoint = _ENDPOINTS.get(path)
        family = Family.ANTHROPIC if path.startswith("/v1/messages") else Family.OPENAI
        ctx = RequestContext(request_id=new_request_id(), family=family, endpoint=endpoint)
        scope[SCOPE_KEY] = ctx
        rid = ctx.request_id.encode()
        sse = done = False

        async def send_tracking_start(message: Message) -> None:
            nonlocal sse, done
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                done = True
            elif message["type"] == "http.response.start":
                ctx.response_started = True
                headers = list(message.get("headers", ()))
                headers.append((b"x-request-id", rid))
                message["headers"] = headers
                sse = any(
                    k == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers
                )
            await send(message)

        task = asyncio.current_task()
        if self.drain is not None and task is not None:
            self.drain.enter(task)
        try:
            await self.app(scope, receive, send_tracking_start)
        except asyncio.CancelledError:
            if self.drain is None or task is None or not self.drain.was_cut(task):
                raise
            # Cut at the drain deadline: tell the client instead of dropping it silently.
            task.uncancel()
            if not done:
                await self._render(
                    ShuttingDown("the gateway is shutting down; retry"), ctx, send, sse
                )
        except ClientGone:
            log.info("request %s: client closed the connection (499)", ctx.request_id)
        except (GatewayError, RouteExhausted) as caught:
            exc = caught.last if isinstance(caught, RouteExhausted) else caught
            if not done:
                await self._render(exc, ctx, send, sse)
        except Exception:
            log.exception("request %s: unhandled error", ctx.request_id)
            if not done:
                await self._render(GatewayError("internal gateway error"), ctx, send, sse)
        finally:
            if self.drain is not None and task is not None:
                self.drain.leave(task)

    @staticmethod
    async def _render(exc: GatewayError, ctx: RequestContext, send: Send, sse: bool) -> None:
        if exc.status >= 500:
            log.warning("request %s: %s %s", ctx.request_id, exc.status, exc.message)
        if not ctx.response_started:
            body = error_body(exc, ctx.family)
            headers = [
                _JSON,
                (b"content-length", str(len(body)).encode()),
                (b"x-request-id", ctx.request_id.encode()),
                *exc.headers(),
            ]
            await send({"type": "http.response.start", "status": exc.status, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})
            return
        # The status line is gone; end the stream in a way the client's SDK reports.
        tail = error_event(exc, ctx.family) if sse else b""
        await send({"type": "http.response.body", "body": tail, "more_body": False})
