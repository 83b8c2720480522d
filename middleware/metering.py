"""Meter every proxied request. Reads what the upstream sends back, ctx.route, ctx.account,
ctx.cache_status and ctx.cache_hit; writes ctx.usage and ctx.cost.

Usage is read from the response as it passes, never by buffering a stream: JSON
bodies get `usage.cost` / `usage.cache_discount` and `X-Upstream-Cache-Read` /
`X-Upstream-Cache-Write` headers; SSE streams are parsed event by event. For an
OpenAI chat stream the upstream app asks the provider for its usage chunk
(`stream_usage_patch`); when the caller did not ask for it, that chunk is removed
from the caller's stream and nothing else changes. A stream cut before its usage is
recorded as estimated, never as zero. An answer replayed by the platform response cache
(ctx.cache_hit) is read like the provider's it was, used no provider cache, and costs the
group's `price_share` of the no-cache price; it is counted and logged apart
(`decision="platform_cache"`). Metering never fails a request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.context import Endpoint, RequestContext
from gateway.errors import RouteExhausted
from gateway.metrics import Metrics
from gateway.owners import Owner, ResponseOwners
from gateway.pricing import Price, cost
from gateway.ratelimit import TokenLimiter
from gateway.sse import SSEParser
from gateway.tokens import Tokens
from gateway.usage import (
    StreamUsage,
    Usage,
    add_usage_fields,
    add_usage_fields_to_event,
    has_usage_object,
    stream_usage_patch,
    usage_from_body,
)
from gateway.usagelog import UsageLog, UsageRecord

log = logging.getLogger(__name__)

_USAGE_KIND = {
    Endpoint.CHAT: "chat",
    Endpoint.MESSAGES: "messages",
    Endpoint.RESPONSES: "responses",
}
_FREE = Price()


def _created_id(data: bytes) -> str | None:
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    response = doc.get("response") if isinstance(doc, dict) else None
    rid = response.get("id") if isinstance(response, dict) else None
    return rid if isinstance(rid, str) else None


def _platform_hit(usage: Usage) -> Usage:
    """A platform-cache hit read no provider cache: every prompt token is uncached."""
    return replace(
        usage,
        cached_tokens=0,
        cache_write_tokens=0,
        cache_write_5m_tokens=0,
        cache_write_1h_tokens=0,
    )


def _status_class(status: int) -> str:
    return f"{status // 100}xx"


class MeteringMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: Metrics,
        prices: Mapping[str, Price],
        usage_log: UsageLog,
        limiter: TokenLimiter | None = None,
        owners: ResponseOwners | None = None,
        tokens: Tokens | None = None,
    ) -> None:
        self.app = app
        self.tokens = tokens
        self.limiter = limiter
        self.owners = owners
        self.metrics = metrics
        self.prices = dict(prices)
        self.usage_log = usage_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = RequestContext.of(scope)
        kind = _USAGE_KIND.get(ctx.endpoint) if ctx.endpoint is not None else None
        status = 500
        held: Message | None = None  # a JSON response's start, held until its body is priced
        body_parts: list[bytes] = []
        stream: StreamUsage | None = None
        parser: SSEParser | None = None
        drop_usage_chunk = False
        streamed = 0
        provider: str | None = None  # whose usage format the answer is in
        # A stored Responses-API answer: remember which account holds it.
        remember = (
            self.owners is not None
            and ctx.endpoint is Endpoint.RESPONSES
            and ctx.body.get("store") is not False
        )

        def price(usage: Usage) -> dict[str, Any]:
            route = ctx.route if ctx.route is not None else (ctx.plan[0] if ctx.plan else None)
            p = self.prices.get(ctx.model, _FREE)
            c = cost(usage, p, route.multiplier if route else 1.0)
            hit = ctx.cache_hit
            if hit is None:
                ctx.cost = c.cost
                ctx.cache_discount = c.cache_discount
            else:
                ctx.cost = c.full_price * hit.price_share
                ctx.cache_discount = c.full_price - ctx.cost
            return {"cost": round(ctx.cost, 8), "cache_discount": round(ctx.cache_discount, 8)}

        async def send_metering(message: Message) -> None:
            nonlocal status, held, stream, parser, streamed, drop_usage_chunk, provider
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = message.get("headers", ())
                sse = any(
                    k == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers
                )
                if ctx.account is not None:
                    provider = ctx.account.provider
                elif ctx.cache_hit is not None:
                    provider = ctx.cache_hit.provider
                if status >= 300 or kind is None or provider is None:
                    await send(message)
                elif sse:
                    stream = StreamUsage(provider, kind)  # type: ignore[arg-type]
                    parser = SSEParser()
                    # The upstream app asked for usage the caller did not ask for: hide it.
                    drop_usage_chunk = kind == "chat" and stream_usage_patch(ctx.body) is not None
                    await send(message)
                else:
                    held = message
                return
            if held is not None:
                body_parts.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                assert provider is not None
                start, body, response_id = self._priced_json(
                    ctx, provider, held, b"".join(body_parts), price
                )
                if remember and response_id:
                    await self._remember(response_id, ctx)
                held = None
                await send(start)
                await send({"type": "http.response.body", "body": body, "more_body": False})
                return
            if parser is None or stream is None:
                await send(message)
                return
            chunk = message.get("body", b"")
            if (
                not remember
                and parser.at_boundary
                and chunk.endswith(b"\n\n")
                and not has_usage_object(chunk)
            ):
                # Nearly every chunk: whole events, none carrying usage, so nothing to
                # rewrite or drop. Forward the bytes as they are; count the events only.
                streamed += chunk.count(b"\n\n")
                await send(message)
                return
            out: list[bytes] = []
            for event in parser.feed(chunk):
                if remember and event.event == "response.created":
                    response_id = _created_id(event.data)
                    if response_id is not None:
                        await self._remember(response_id, ctx)
                stream.feed(event)
                if event.data:
                    # Providers send about one token per content event; the JSON around
                    # it is not output, so count events, not bytes, for an estimate.
                    streamed += 1
                usage = stream.result() if b'"usage"' in event.data else None
                if usage is None:
                    out.append(event.raw)
                    continue
                if ctx.cache_hit is not None:
                    usage = _platform_hit(usage)
                ctx.usage = usage
                fields = price(usage)
                if drop_usage_chunk and stream.is_usage_only_chunk(event):
                    continue  # asked for on the caller's behalf: read, priced, not forwarded
                out.append(add_usage_fields_to_event(event, fields))
            if not message.get("more_body", False):
                out.append(parser.flush())
            more = message.get("more_body", False)
            await send({"type": "http.response.body", "body": b"".join(out), "more_body": more})

        try:
            await self.app(scope, receive, send_metering)
        except BaseException as exc:
            err = exc.last if isinstance(exc, RouteExhausted) else exc
            status = getattr(err, "status", 500)
            raise
        finally:
            if stream is not None and ctx.usage is None:
                ctx.usage = stream.estimate(ctx.tokens_estimate, streamed * 4)
                price(ctx.usage)
            self._count(ctx, status)
            # Only requests that reached an upstream route are usage: a request refused
            # before (bad key, budget, unknown model, saturation) is counted, not logged.
            served = ctx.route is not None or ctx.cache_hit is not None
            if ctx.principal is not None and ctx.endpoint is not None and served:
                self.usage_log.append(self._record(ctx, status))
                if self.tokens is not None and ctx.cost:
                    await self.tokens.spent(ctx.principal.token, ctx.cost)
                if self.limiter is not None and ctx.usage is not None and ctx.principal.tpm:
                    used = ctx.usage.prompt_tokens + ctx.usage.completion_tokens
                    self.limiter.record_tokens(ctx.principal.token, used)

    @staticmethod
    def _priced_json(
        ctx: RequestContext,
        provider: str,
        start: Message,
        body: bytes,
        price: Callable[[Usage], dict[str, Any]],
    ) -> tuple[Message, bytes, str | None]:
        """The start and body of a JSON answer with its usage priced (one parse, one dump),
        and the answer's id."""
        assert ctx.endpoint is not None
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return start, body, None
        if not isinstance(doc, dict):
            return start, body, None
        answer_id = doc.get("id") if isinstance(doc.get("id"), str) else None
        kind = _USAGE_KIND[ctx.endpoint]
        usage = usage_from_body(provider, kind, doc)  # type: ignore[arg-type]
        if usage is None:
            return start, body, answer_id
        if ctx.cache_hit is not None:
            usage = _platform_hit(usage)
        ctx.usage = usage
        body = add_usage_fields(doc, price(usage))
        headers = [(k, v) for k, v in start.get("headers", ()) if k != b"content-length"]
        headers += [
            (b"content-length", str(len(body)).encode()),
            (b"x-upstream-cache-read", str(usage.cached_tokens).encode()),
            (b"x-upstream-cache-write", str(usage.cache_write_tokens).encode()),
        ]
        return {**start, "headers": headers}, body, answer_id

    async def _remember(self, response_id: str, ctx: RequestContext) -> None:
        assert self.owners is not None and ctx.account is not None and ctx.principal is not None
        await self.owners.put(response_id, Owner(ctx.account.name, ctx.principal.token))

    @staticmethod
    def _record(ctx: RequestContext, status: int) -> UsageRecord:
        assert ctx.principal is not None and ctx.endpoint is not None
        usage = ctx.usage or Usage()
        now = time.perf_counter()
        hit = ctx.cache_hit
        return UsageRecord(
            time=time.time(),
            request_id=ctx.request_id,
            token=ctx.principal.token,
            user=ctx.principal.user,
            group=ctx.route.group if ctx.route else (hit.group if hit else ""),
            model=ctx.model,
            endpoint=ctx.endpoint.value,
            account=ctx.account.name if ctx.account else "",
            status=status,
            prompt_tokens=usage.prompt_tokens,
            cached_tokens=usage.cached_tokens,
            cache_write_tokens=usage.cache_write_tokens,
            completion_tokens=usage.completion_tokens,
            reasoning_tokens=usage.reasoning_tokens,
            cost=ctx.cost or 0.0,
            cache_discount=ctx.cache_discount,
            estimated=usage.estimated,
            latency_ms=round((now - ctx.started) * 1000, 3),
            ttfb_ms=round((ctx.first_byte - ctx.started) * 1000, 3) if ctx.first_byte else None,
            decision="platform_cache" if hit is not None else ctx.decision,
            attempts=len(ctx.attempts),
        )

    def _count(self, ctx: RequestContext, status: int) -> None:
        m = self.metrics
        group = ctx.route.group if ctx.route else (ctx.plan[0].group if ctx.plan else "")
        endpoint = ctx.endpoint.value if ctx.endpoint else ""
        # Only a configured model (one with a plan) may become a label value: the body's
        # model of a refused request is the caller's free text.
        model = ctx.model if ctx.plan else ""
        m.child(m.requests, endpoint, group, model, _status_class(status)).inc()
        now = time.perf_counter()
        m.child(m.request_seconds, endpoint, group).observe(now - ctx.started)
        if ctx.first_byte is not None:
            m.child(m.ttfb_seconds, endpoint, group).observe(ctx.first_byte - ctx.started)
        if ctx.cache_status:
            # The platform cache, apart from provider prompt-cache reads (cached_tokens).
            m.child(m.platform_cache_requests, group, model, ctx.cache_status.lower()).inc()
            if ctx.cache_hit is not None:
                m.child(m.platform_cache_hits, group, model).inc()
        usage = ctx.usage
        if usage is None or (ctx.account is None and ctx.cache_hit is None):
            return
        if ctx.account is not None:  # provider tokens: a platform-cache hit has none
            account = ctx.account.name
            m.child(m.prompt_tokens, group, model, account).inc(usage.prompt_tokens)
            m.child(m.cached_tokens, group, model, account).inc(usage.cached_tokens)
            m.child(m.cache_write_tokens, group, model, account).inc(usage.cache_write_tokens)
            m.child(m.completion_tokens, group, model, account).inc(usage.completion_tokens)
        if usage.estimated:
            m.child(m.usage_estimated, group, model).inc()
        if ctx.cost is not None:
            m.child(m.cost, group, model).inc(ctx.cost)
            # Discounts can be negative (a cache write costs more than it saved yet), and
            # counters only grow: export the no-cache price; savings = it - cost.
            m.child(m.uncached_cost, group, model).inc(ctx.cost + ctx.cache_discount)
