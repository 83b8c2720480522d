from __future__ import annotations

import pytest
from starlette.types import Receive, Scope, Send

from gateway.context import Principal
from gateway.errors import RateLimited
from gateway.keys import hash_key
from gateway.ratelimit import TokenLimiter
from gateway.tokens import MemoryTokenStore, Tokens
from middleware.auth import AuthMiddleware
from tests.asgi import Recorder, body_receive, make_ctx, make_scope


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rpm_allows_the_limit_then_refuses_until_the_window_moves() -> None:
    clock = Clock()
    lim = TokenLimiter(60, clock)
    assert all(lim.admit("t", 3, None).allowed for _ in range(3))
    refused = lim.admit("t", 3, None)
    assert not refused.allowed and refused.remaining_requests == 0
    assert 1 <= refused.retry_after <= 66
    clock.now += 61
    assert lim.admit("t", 3, None).allowed


def test_tokens_count_against_tpm_and_tokens_are_separate() -> None:
    clock = Clock()
    lim = TokenLimiter(60, clock)
    assert lim.admit("a", None, 100).allowed
    lim.record_tokens("a", 150)
    assert not lim.admit("a", None, 100).allowed
    assert lim.admit("b", None, 100).allowed  # another token is not affected


def test_no_limits_means_no_state() -> None:
    lim = TokenLimiter()
    assert lim.admit("t", None, None).allowed
    assert lim._windows == {}


async def _ok(scope: Scope, receive: Receive, send: Send) -> None:
    pass


async def test_auth_answers_429_with_ratelimit_headers() -> None:
    secret = "a-test-secret-of-some-length"
    p = Principal(token="t", user="u", user_group="default", group="g", rpm=1)
    tokens = Tokens(secret, {hash_key(secret, "k"): p}, MemoryTokenStore())
    mw = AuthMiddleware(_ok, tokens=tokens, limiter=TokenLimiter())
    scope = make_scope(headers=[("x-api-key", "k")], ctx=make_ctx())
    await mw(scope, body_receive(), Recorder())
    with pytest.raises(RateLimited) as info:
        await mw(
            make_scope(headers=[("x-api-key", "k")], ctx=make_ctx()), body_receive(), Recorder()
        )
    headers = dict(info.value.headers())
    assert headers[b"x-ratelimit-limit-requests"] == b"1"
    assert headers[b"x-ratelimit-remaining-requests"] == b"0"
    assert int(headers[b"retry-after"]) >= 1
