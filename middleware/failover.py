"""Try the candidates in order until one answers. Reads ctx.candidates, ctx.choice,
ctx.fingerprint, ctx.demand, ctx.started, ctx.response_started, ctx.upstream_status;
writes ctx.account and ctx.attempts.

A retry happens only before the first response byte reached the client: connection
errors, timeouts before the first byte, 429 and 5xx-class overload statuses, each time on
the next candidate (the affinity order, so repeated failovers warm one backup). Other
statuses (400, 401, 403, 404, 413, 422) are the caller's problem and go back at once.
Accounts that are cooling down, ejected, quarantined or at their concurrency cap are
skipped without a wait. Between attempts: exponential back-off with full jitter, all
inside one deadline counted from the request's arrival; and a process-wide retry budget,
so that an outage does not multiply the load it suffers. When every candidate failed or
was skipped, `RouteExhausted` lets pinning try the plan's next group.
When the client goes away, the upstream request is cancelled and nothing is retried.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from affinity.router import AffinityRouter
from affinity.types import Outcome
from gateway.context import Attempt, RequestContext
from gateway.errors import (
    ClientGone,
    GatewayError,
    RateLimited,
    RouteExhausted,
    UpstreamError,
    UpstreamStatus,
    UpstreamTimeout,
)
from gateway.health import Health
from gateway.metrics import Metrics
from gateway.upstream import Account

log = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504, 529})


class RetryBudget:
    """Retries the whole process may spend, shared by every request.

    Two bounds, both must allow a retry:
    - in flight (Envoy's retry budget): retries running at once, back-off included,
      at most max(`ratio` x requests in flight, `min_in_flight`);
    - in total (Finagle's): retries at most max(`ratio` x requests, `min_retries`) over
      a window that decays with `half_life`. The in-flight bound alone lets a pool that
      fails fast take several attempts per request; this one caps the multiplication.
    """

    def __init__(
        self,
        *,
        ratio: float = 0.2,
        min_in_flight: int = 3,
        min_retries: float = 10.0,
        half_life: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ratio = ratio
        self.min_in_flight = min_in_flight
        self.min_retries = min_retries
        self.half_life = half_life
        self.clock = clock
        self.active = 0  # requests inside failover
        self.retrying = 0  # retries in flight
        self._requests = 0.0  # decayed count
        self._retries = 0.0  # decayed count
        self._stamp = clock()

    def _decay(self) -> None:
        now = self.clock()
        if now > self._stamp:
            # Both counts decay alike, so their ratio survives; only the floor is absolute.
            f = 0.5 ** ((now - self._stamp) / self.half_life)
            self._requests *= f
            self._retries *= f
            self._stamp = now

    def enter(self) -> None:
        self.active += 1
        self._decay()
        self._requests += 1

    def leave(self) -> None:
        self.active -= 1

    def try_retry(self) -> bool:
        """Take one retry from the budget; False (nothing taken) when it is spent."""
        if self.retrying + 1 > max(self.ratio * self.active, self.min_in_flight):
            return False
        self._decay()
        if self._retries + 1 > max(self.ratio * self._requests, self.min_retries):
            return False
        self.retrying += 1
        self._retries += 1
        return True

    def retry_done(self) -> None:
        self.retrying -= 1


def _outcome_reason(exc: GatewayError, ctx: RequestContext) -> str:
    if isinstance(exc, UpstreamStatus):
        return f"status_{exc.status}"
    if isinstance(exc, UpstreamTimeout):
        return "timeout"
    if 200 <= ctx.upstream_status < 300:
        return "stream_error"  # the provider answered, then its body broke off
    return "connect_error"


class FailoverMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        router: AffinityRouter,
        health: Health,
        metrics: Metrics,
        deadline: float = 30.0,
        backoff_base: float = 0.025,
        backoff_max: float = 1.0,
        budget: RetryBudget | None = None,
    ) -> None:
        self.app = app
        self.router = router
        self.health = health
        self.metrics = metrics
        self.deadline = deadline
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.budget = budget if budget is not None else RetryBudget()

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
        self.budget.enter()
        try:
            await self._attempts(scope, receive, send_marking_start, ctx)
        except asyncio.CancelledError:
            if gone and task.uncancel() == 0:
                raise ClientGone("client closed the connection") from None
            raise
        finally:
            self.budget.leave()
            watcher.cancel()

    async def _attempts(
        self, scope: Scope, receive: Receive, send: Send, ctx: RequestContext
    ) -> None:
        deadline = ctx.started + self.deadline
        last: GatewayError | None = None
        tries = 0
        for account in ctx.candidates:
            name = account.name
            admission = self.health.acquire(name, account.spec.limits.concurrency)
            if not admission:
                continue  # cooling down, ejected, probed by another request, or full
            retry = False
            try:
                if tries:
                    assert last is not None
                    if time.perf_counter() >= deadline or not self.budget.try_retry():
                        # Out of time or budget: the caller learns what went wrong, and
                        # no fallback group adds to the load either.
                        raise last
                    retry = True
                    await asyncio.sleep(self._backoff(tries, deadline))
                tries += 1
                error = await self._attempt(scope, receive, send, ctx, account)
            finally:
                if retry:
                    self.budget.retry_done()
                self.health.release(name, admission)
            if error is None:
                return
            last = error
        if last is None or (isinstance(last, UpstreamStatus) and last.status == 429):
            # Everything is rate limited or busy: answer now, with the shortest wait.
            wait = self.health.retry_in(a.name for a in ctx.candidates)
            if wait is None and isinstance(last, UpstreamStatus):
                wait = last.retry_after
            last = RateLimited(
                "every upstream account of this group is rate limited or busy; retry later",
                retry_after=wait if wait is not None else 1.0,
                code="upstream_rate_limited",
            )
        raise RouteExhausted(last)

    def _backoff(self, tries: int, deadline: float) -> float:
        """Full jitter: uniform in [0, base x 2^(tries-1)], capped, never past the deadline."""
        ceiling = min(self.backoff_max, self.backoff_base * 2.0 ** (tries - 1))
        return min(random.random() * ceiling, max(0.0, deadline - time.perf_counter()))

    async def _attempt(
        self, scope: Scope, receive: Receive, send: Send, ctx: RequestContext, account: Account
    ) -> GatewayError | None:
        """One try: None when it answered, the error when the next candidate may try;
        raises what must go back to the caller as is."""
        fp = ctx.fingerprint
        demand = ctx.demand
        assert fp is not None and demand is not None
        name = account.name
        ctx.account = account
        expected = ctx.choice.matched_tokens if ctx.choice and account is ctx.candidates[0] else 0
        await self.router.begin(account.spec, fp, demand)
        gauge = self.metrics.child(self.metrics.in_flight, name)
        gauge.inc()
        t0 = time.perf_counter()
        ok = False
        try:
            await self.app(scope, receive, send)
            ok = True
        except (asyncio.CancelledError, ClientGone):
            self._record(ctx, name, ctx.upstream_status, "client_gone", t0)
            raise
        except UpstreamError as exc:
            status = exc.status if isinstance(exc, UpstreamStatus) else 0
            self._record(ctx, name, status, _outcome_reason(exc, ctx), t0)
            retry_after = exc.retry_after if isinstance(exc, UpstreamStatus) else None
            self.health.failed(name, status, retry_after)
            if ctx.response_started or (status and status not in RETRYABLE_STATUS):
                raise
            return exc
        finally:
            gauge.dec()
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
        self._record(ctx, name, ctx.upstream_status, "ok", t0)
        self.health.succeeded(name)
        return None

    def _record(
        self, ctx: RequestContext, account: str, status: int, reason: str, t0: float
    ) -> None:
        ctx.attempts.append(Attempt(account, status, reason, time.perf_counter() - t0))
        self.metrics.child(self.metrics.attempts, account, reason).inc()
