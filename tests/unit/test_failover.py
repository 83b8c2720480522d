"""The failover middleware over a scripted upstream: what is retried, what is not, the
retry budget, the deadline, skipped accounts, and a client that goes away."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from starlette.types import Message, Receive, Scope, Send

from affinity.fingerprint import Fingerprint
from affinity.memory import MemoryState
from affinity.router import AffinityRouter
from affinity.select import Selector
from affinity.types import Demand
from gateway.config import AccountConfig, Limits
from gateway.context import RequestContext
from gateway.errors import (
    ClientGone,
    RateLimited,
    RouteExhausted,
    UpstreamError,
    UpstreamStatus,
    UpstreamTimeout,
)
from gateway.health import Health
from gateway.metrics import Metrics
from gateway.sse import SSEEvent, SSEParser
from gateway.upstream import Account, _anthropic_preamble, _error_message, _openai_preamble
from middleware.failover import FailoverMiddleware, RetryBudget
from tests.asgi import make_ctx, make_scope

NAMES = ("a0", "a1", "a2", "a3")
FP = Fingerprint(hashes=(1, 2), tokens=(0, 10), root=2, total_tokens=10, session=None, full=2)


def account(name: str, concurrency: int | None = None) -> Account:
    return Account.from_config(
        AccountConfig(
            name=name,
            provider="openai",
            base_url="http://upstream.invalid/v1",
            api_key=f"sk-test-{name}",
            limits=Limits(concurrency=concurrency),
        )
    )


Behaviour = Callable[[Scope, Receive, Send], Awaitable[None]]


def answer(body: bytes = b"{}") -> Behaviour:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        RequestContext.of(scope).upstream_status = 200
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    return app


def raising(exc: Exception) -> Behaviour:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise exc

    return app


def cut_after_start() -> Behaviour:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        RequestContext.of(scope).upstream_status = 200
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        raise UpstreamError("the connection broke")

    return app


class Upstream:
    """The terminal app: each account behaves as scripted; calls are logged."""

    def __init__(self, **script: Behaviour) -> None:
        self.script = script
        self.calls: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = RequestContext.of(scope)
        assert ctx.account is not None
        self.calls.append(ctx.account.name)
        await self.script.get(ctx.account.name, answer())(scope, receive, send)


class Client:
    """A live connection: `send` records (and marks the response started, like the errors
    layer); `receive` blocks until `leave()`."""

    def __init__(self, ctx: RequestContext) -> None:
        self.ctx = ctx
        self.messages: list[Message] = []
        self.gone = asyncio.Event()

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.ctx.response_started = True
        self.messages.append(message)

    async def receive(self) -> Message:
        await self.gone.wait()
        return {"type": "http.disconnect"}

    def leave(self) -> None:
        self.gone.set()


class Rig:
    def __init__(
        self,
        upstream: Upstream,
        *,
        accounts: tuple[Account, ...] = (),
        **kw: Any,
    ) -> None:
        self.accounts = accounts or tuple(account(n) for n in NAMES)
        self.upstream = upstream
        self.health = Health({"pool": [a.name for a in self.accounts]})
        self.metrics = Metrics()
        router = AffinityRouter(MemoryState(), Selector())
        kw.setdefault("backoff_base", 0.001)
        self.mw = FailoverMiddleware(
            upstream, router=router, health=self.health, metrics=self.metrics, **kw
        )

    def ctx(self) -> RequestContext:
        return make_ctx(candidates=self.accounts, fingerprint=FP, demand=Demand(10, 10))

    async def run(self, ctx: RequestContext | None = None) -> tuple[RequestContext, Client]:
        ctx = ctx or self.ctx()
        client = Client(ctx)
        await self.mw(make_scope(ctx=ctx), client.receive, client.send)
        return ctx, client

    def attempts(self, name: str, outcome: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "gateway_upstream_attempts_total", {"account": name, "outcome": outcome}
        )
        return value or 0.0


async def test_first_candidate_answers_with_its_name_in_a_header() -> None:
    rig = Rig(Upstream())
    ctx, client = await rig.run()
    assert rig.upstream.calls == ["a0"]
    assert (b"x-upstream-account", b"a0") in client.messages[0]["headers"]
    assert [(a.account, a.reason) for a in ctx.attempts] == [("a0", "ok")]
    assert rig.attempts("a0", "ok") == 1
    assert rig.health.in_flight("a0") == 0


@pytest.mark.parametrize(
    ("exc", "outcome"),
    [
        (UpstreamStatus(503, "x"), "status_503"),
        (UpstreamStatus(500, "x"), "status_500"),
        (UpstreamStatus(502, "x"), "status_502"),
        (UpstreamStatus(504, "x"), "status_504"),
        (UpstreamStatus(529, "x"), "status_529"),
        (UpstreamStatus(429, "x", retry_after=2), "status_429"),
        (UpstreamTimeout("slow"), "timeout"),
        (UpstreamError("refused"), "connect_error"),
    ],
)
async def test_retryable_failures_go_to_the_next_candidate(exc: Exception, outcome: str) -> None:
    rig = Rig(Upstream(a0=raising(exc)))
    ctx, client = await rig.run()
    assert rig.upstream.calls == ["a0", "a1"]
    assert [a.reason for a in ctx.attempts] == [outcome, "ok"]
    assert rig.attempts("a0", outcome) == 1 and rig.attempts("a1", "ok") == 1
    assert (b"x-upstream-account", b"a1") in client.messages[0]["headers"]


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422])
async def test_caller_errors_go_back_after_one_attempt(status: int) -> None:
    rig = Rig(Upstream(a0=raising(UpstreamStatus(status, "x"))))
    with pytest.raises(UpstreamStatus) as info:
        await rig.run()
    assert info.value.status == status
    assert rig.upstream.calls == ["a0"]
    assert rig.attempts("a0", f"status_{status}") == 1
    expected = "quarantined" if status in (401, 403) else "healthy"
    assert rig.health.state("a0") == expected
    assert rig.health.alerts("a0") == (1 if status in (401, 403) else 0)


async def test_a_failure_after_the_response_started_is_never_retried() -> None:
    rig = Rig(Upstream(a0=cut_after_start()))
    with pytest.raises(UpstreamError):
        await rig.run()
    assert rig.upstream.calls == ["a0"]
    assert rig.attempts("a0", "stream_error") == 1


async def test_429_cools_the_account_down_and_skips_it_next_time() -> None:
    rig = Rig(Upstream(a0=raising(UpstreamStatus(429, "x", retry_after=30))))
    await rig.run()
    assert rig.health.state("a0") == "cooldown"
    await rig.run()
    assert rig.upstream.calls == ["a0", "a1", "a1"]  # skipped without an attempt


async def test_every_candidate_rate_limited_is_a_429_with_the_shortest_wait() -> None:
    waits = {"a0": 9.0, "a1": 4.0, "a2": 6.0, "a3": 8.0}
    rig = Rig(
        Upstream(**{n: raising(UpstreamStatus(429, "x", retry_after=w)) for n, w in waits.items()})
    )
    with pytest.raises(RouteExhausted) as info:
        await rig.run()
    assert isinstance(info.value.last, RateLimited)
    assert info.value.last.retry_after == 4
    # The next request tries nobody and gets the same answer at once.
    with pytest.raises(RouteExhausted) as again:
        await rig.run()
    assert isinstance(again.value.last, RateLimited)
    assert len(rig.upstream.calls) == 4


async def test_all_failing_raises_route_exhausted_with_the_last_error() -> None:
    rig = Rig(Upstream(**{n: raising(UpstreamStatus(503, n)) for n in NAMES}))
    with pytest.raises(RouteExhausted) as info:
        await rig.run()
    assert rig.upstream.calls == list(NAMES)
    assert isinstance(info.value.last, UpstreamStatus) and info.value.last.message == "a3"


async def test_accounts_at_their_concurrency_cap_are_skipped_not_queued() -> None:
    accounts = (account("a0", concurrency=1), account("a1", concurrency=1))
    release = asyncio.Event()
    entered = asyncio.Event()

    async def slow(scope: Scope, receive: Receive, send: Send) -> None:
        entered.set()
        await release.wait()
        await answer()(scope, receive, send)

    rig = Rig(Upstream(a0=slow, a1=slow), accounts=accounts)
    first = asyncio.ensure_future(rig.run())
    await entered.wait()
    entered.clear()
    second = asyncio.ensure_future(rig.run())
    await entered.wait()
    # Both slots are taken: a third request is refused at once, not parked.
    async with asyncio.timeout(1):
        with pytest.raises(RouteExhausted) as info:
            await rig.run()
    assert isinstance(info.value.last, RateLimited)
    release.set()
    await asyncio.gather(first, second)
    assert rig.upstream.calls == ["a0", "a1"]
    assert rig.health.in_flight("a0") == rig.health.in_flight("a1") == 0


async def test_only_one_probe_goes_to_an_account_back_from_ejection() -> None:
    release = asyncio.Event()
    probing = asyncio.Event()

    async def probe(scope: Scope, receive: Receive, send: Send) -> None:
        probing.set()
        await release.wait()
        await answer()(scope, receive, send)

    rig = Rig(Upstream(a0=probe))
    rig.health.eject_after = 1
    rig.health.failed("a0", 503, None)
    assert rig.health.state("a0") == "ejected"
    rig.health._accounts["a0"].until = 0.0  # the ejection has expired
    first = asyncio.ensure_future(rig.run())
    await probing.wait()
    others = [await rig.run() for _ in range(3)]
    assert [c.attempts[0].account for c, _ in others] == ["a1"] * 3
    release.set()
    await first
    assert rig.health.state("a0") == "healthy"
    await rig.run()
    assert rig.upstream.calls == ["a0", "a1", "a1", "a1", "a0"]


async def test_over_budget_fails_with_the_last_error_at_once() -> None:
    budget = RetryBudget(min_in_flight=0, min_retries=0)  # nothing to spend
    rig = Rig(Upstream(a0=raising(UpstreamStatus(503, "down"))), budget=budget)
    with pytest.raises(UpstreamStatus) as info:  # not RouteExhausted: no fallback group
        await rig.run()
    assert info.value.status == 503
    assert rig.upstream.calls == ["a0"]
    assert rig.health.in_flight("a1") == 0  # the admission taken for a1 was given back


async def test_no_retry_past_the_deadline() -> None:
    rig = Rig(Upstream(a0=raising(UpstreamTimeout("slow"))), deadline=5.0)
    ctx = rig.ctx()
    ctx.started -= 6.0  # the request arrived 6 s ago
    with pytest.raises(UpstreamTimeout):
        await rig.run(ctx)
    assert rig.upstream.calls == ["a0"]


def test_backoff_is_jittered_exponential_capped_and_within_the_deadline() -> None:
    rig = Rig(Upstream(), backoff_base=0.1, backoff_max=0.5)
    far = 1e12
    for tries, ceiling in ((1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (9, 0.5)):
        waits = [rig.mw._backoff(tries, far) for _ in range(200)]
        assert all(0 <= w <= ceiling for w in waits)
        assert max(waits) > ceiling * 0.5 and len(set(waits)) > 100  # jittered
    assert rig.mw._backoff(5, 0.0) == 0.0  # never sleeps past the deadline


async def test_client_gone_cancels_the_attempt_frees_the_slot_and_retries_nothing() -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def hang(scope: Scope, receive: Receive, send: Send) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    rig = Rig(Upstream(a0=hang))
    ctx = rig.ctx()
    client = Client(ctx)
    task = asyncio.ensure_future(rig.mw(make_scope(ctx=ctx), client.receive, client.send))
    await started.wait()
    client.leave()
    with pytest.raises(ClientGone):
        async with asyncio.timeout(1):
            await task
    assert cancelled.is_set()
    assert rig.upstream.calls == ["a0"]
    assert [a.reason for a in ctx.attempts] == ["client_gone"]
    assert rig.health.in_flight("a0") == 0
    assert rig.mw.budget.active == 0 and rig.mw.budget.retrying == 0


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_budget_bounds_retries_in_flight_by_active_requests() -> None:
    budget = RetryBudget(min_in_flight=3, min_retries=1000)
    for _ in range(10):
        budget.enter()
    assert [budget.try_retry() for _ in range(4)] == [True, True, True, False]  # max(2, 3)
    for _ in range(10):
        budget.enter()  # 20 active: 20 % is 4
    assert budget.try_retry() is True
    assert budget.try_retry() is False
    budget.retry_done()
    assert budget.try_retry() is True


def test_budget_bounds_total_retries_by_a_share_of_requests() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.2, min_in_flight=1000, min_retries=3, clock=clock)
    budget.enter()
    granted = 0
    for _ in range(100):
        budget.enter()
        if budget.try_retry():
            granted += 1
            budget.retry_done()
        budget.leave()
    assert granted == 20  # 20 % of 101 requests, rounded down
    # The window decays: an hour later the floor of 3 is all that is left to spend.
    clock.t += 3600
    assert [budget.try_retry() for _ in range(4)] == [True, True, True, False]


# --- what upstream tells failover: preamble events, in-stream errors, redaction -------------


def sse(raw: bytes) -> SSEEvent:
    (event,) = SSEParser().feed(raw)
    return event


@pytest.mark.parametrize(
    ("raw", "held"),
    [
        (b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n', True),
        (
            b'data: {"choices":[{"delta":{"role":"assistant","content":null,"refusal":null}}]}\n\n',
            True,
        ),
        (b'data: {"choices":[],"prompt_filter_results":[]}\n\n', True),
        (b": keep-alive\n\n", True),
        (b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n', False),
        (b'data: {"choices":[{"delta":{"tool_calls":[{"index":0}]}}]}\n\n', False),
        (b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\n', False),
        (b'data: {"choices":[],"usage":{"prompt_tokens":1}}\n\n', False),
        (b"data: [DONE]\n\n", False),
        (b"data: not json\n\n", False),
    ],
)
def test_openai_preamble_is_only_what_carries_no_output(raw: bytes, held: bool) -> None:
    assert _openai_preamble(sse(raw)) is held


@pytest.mark.parametrize(
    ("raw", "held"),
    [
        (b'event: message_start\ndata: {"type":"message_start"}\n\n', True),
        (b'event: content_block_start\ndata: {"type":"content_block_start"}\n\n', True),
        (b'event: ping\ndata: {"type":"ping"}\n\n', True),
        (b'event: content_block_delta\ndata: {"type":"content_block_delta"}\n\n', False),
        (b'event: message_delta\ndata: {"type":"message_delta"}\n\n', False),
    ],
)
def test_anthropic_preamble_ends_at_the_first_delta(raw: bytes, held: bool) -> None:
    assert _anthropic_preamble(sse(raw)) is held


def test_an_error_event_during_the_preamble_is_a_retryable_status() -> None:
    raw = (
        b"event: error\n"
        b'data: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n'
    )
    with pytest.raises(UpstreamStatus) as info:
        _anthropic_preamble(sse(raw))
    assert info.value.status == 529
    assert info.value.message == "the upstream provider answered 529 (overloaded_error)"
    with pytest.raises(UpstreamStatus) as oai:
        _openai_preamble(sse(b'data: {"error":{"message":"sk-x","type":"server_error"}}\n\n'))
    assert oai.value.status == 500 and "sk-x" not in oai.value.message


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"error":{"type":"rate_limit_error","message":"slow down"}}', "(rate_limit_error)"),
        (b'{"error":{"code":"insufficient_quota","message":"pay"}}', "(insufficient_quota)"),
        (b'{"error":{"type":"sk_live_9f8e7d6c5b4a3","message":"x"}}', ""),
        (b'{"error":{"type":"sk-proj-AbC123","message":"x"}}', ""),
        (b"<html>key sk-abc</html>", ""),
    ],
)
def test_provider_error_bodies_are_reduced_to_a_safe_summary(body: bytes, message: str) -> None:
    text = _error_message(400, body)
    assert text == f"the upstream provider answered 400 {message}".rstrip()
