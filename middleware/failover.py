"""Try the candidates in order until one answers. Reads ctx.candidates, ctx.fingerprint,
ctx.demand; writes ctx.account and ctx.attempts.

A retry happens only before the first response byte reached the client: connection
errors, timeouts before the first byte, 429 and 5xx-class overload statuses. Other
statuses (400, 401, 403, 404, 413, 422) are the caller's problem and go back at once.
When the client goes away, the upstream request is cancelled and nothing is retried.
"""

from __future__ import annotations

import asyncio
import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from affinity.router import AffinityRouter
from affinity.types import Outcome
from gateway.context import Attempt, RequestContext
from gateway.errors import (
    ClientGone,
    GatewayError,
    RouteExhausted,
    UpstreamError,
    UpstreamStatus,
    UpstreamTimeout,
)
from gateway.health import Health
from gateway.metrics import Metrics

log = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504, 529})


def _outcome_reason(exc: GatewayError) -> str:
    if isinstance(exc, UpstreamStatus):
        return f"status_{exc.status}"
    if isinstance(exc, UpstreamTimeout):
        return "timeout"
    return "connect_error"


class FailoverMiddleware:
    def __init__(
        self, app: ASGIApp, *, router: AffinityRouter, health: Health, metrics: Metrics
    ) -> None:
        self.app = app
        self.router = router
        self.health = health
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = RequestContext.of(scope)
        finished = gone = False
        task = asyncio.current_task()
        assert task is not None

        async def send_marking_start(message: Message) -> None:
            nonlocal finished
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                if ctx.account is not None:
                    headers.append((b"x-upstream-account", ctx.account.name.encode()))
                message["headers"] = headers
            elif not message.get("more_body", False):
                finished = True
            await send(message)

        async def watch_disconnect() -> None:
            # The body is fully read; the next message is the client going away.
            nonlocal gone
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    if not finished:
                        gone = True
                        task.cancel()
                    return

        watcher = asyncio.get_running_loop().create_task(watch_disconnect())
        try:
            await self._attempts(scope, receive, send_marking_start, ctx)
        except asyncio.CancelledError:
            if gone and task.uncancel() == 0:
                raise ClientGone("client closed the connection") from None
            raise
        finally:
            watcher.cancel()

    async def _attempts(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        ctx: RequestContext,
    ) -> None:
        last: GatewayError | None = None
        fp = ctx.fingerprint
        demand = ctx.demand
        assert fp is not None and demand is not None
        for account in ctx.candidates:
            if not self.health.available(account.name):
                continue
            ctx.account = account
            expected = (
                ctx.choice.matched_tokens if ctx.choice and account is ctx.candidates[0] else 0
            )
            await self.router.begin(account.spec, fp, demand)
            self.metrics.in_flight.labels(account.name).inc()
            t0 = time.perf_counter()
            ok = False
            try:
                await self.app(scope, receive, send)
                ok = True
            except asyncio.CancelledError:
                self._record(ctx, account.name, 0, "client_gone", t0)
                raise
            except UpstreamError as exc:
                reason = _outcome_reason(exc)
                status = exc.status if isinstance(exc, UpstreamStatus) else 0
                self._record(ctx, account.name, status, reason, t0)
                self.health.failed(account.name, status, getattr(exc, "retry_after", None))
                if ctx.response_started or (status and status not in RETRYABLE_STATUS):
                    raise
                last = exc
                continue
            finally:
                self.metrics.in_flight.labels(account.name).dec()
                usage = ctx.usage if ok else None
                await self.router.end(
                    account.spec,
                    fp,
                    Outcome(
                        ok=ok,
                        input_tokens=usage.prompt_tokens if usage else 0,
                        cached_tokens=usage.cached_tokens if usage else 0,
                        cache_write_tokens=usage.cache_write_tokens if usage else 0,
                        output_tokens=usage.completion_tokens if usage else 0,
                        expected_cached_tokens=expected if usage and not usage.estimated else 0,
                    ),
                )
            self._record(ctx, account.name, ctx.upstream_status, "ok", t0)
            self.health.succeeded(account.name)
            return
        if last is None:
            last = UpstreamError("no upstream account of this group is available")
        raise RouteExhausted(last)

    def _record(
        self, ctx: RequestContext, account: str, status: int, reason: str, t0: float
    ) -> None:
        ctx.attempts.append(Attempt(account, status, reason, time.perf_counter() - t0))
        self.metrics.attempts.labels(account, reason).inc()
