from __future__ import annotations

import pytest
from starlette.types import Receive, Scope, Send

from gateway.context import Principal, RequestContext
from gateway.errors import Unauthorized
from gateway.keys import hash_key
from gateway.tokens import MemoryTokenStore, Tokens
from middleware.auth import AuthMiddleware
from tests.asgi import Recorder, body_receive, make_ctx, make_scope

SECRET = "a-test-secret-of-some-length"
ALICE = Principal(token="alice", user="alice", user_group="default", group="g")


async def _ok(scope: Scope, receive: Receive, send: Send) -> None:
    pass


def tokens(secret: str = SECRET) -> Tokens:
    return Tokens(secret, {hash_key(SECRET, "sk-alice"): ALICE}, MemoryTokenStore())


def mw() -> AuthMiddleware:
    return AuthMiddleware(_ok, tokens=tokens())


@pytest.mark.parametrize(
    "header",
    [
        ("authorization", "Bearer sk-alice"),
        ("x-api-key", "sk-alice"),
        ("Authorization", "bearer sk-alice"),
    ],
)
async def test_known_key_sets_principal(header: tuple[str, str]) -> None:
    ctx = make_ctx()
    await mw()(make_scope(headers=[header], ctx=ctx), body_receive(), Recorder())
    assert ctx.principal == ALICE


@pytest.mark.parametrize(
    "headers", [[], [("authorization", "Bearer sk-mallory")], [("authorization", "Basic x")]]
)
async def test_bad_or_missing_key_is_401_and_never_echoed(headers: list[tuple[str, str]]) -> None:
    ctx = make_ctx()
    with pytest.raises(Unauthorized) as info:
        await mw()(make_scope(headers=headers, ctx=ctx), body_receive(), Recorder())
    assert "sk-mallory" not in info.value.message
    assert ctx.principal is None


async def test_hash_under_another_secret_does_not_match() -> None:
    other = AuthMiddleware(_ok, tokens=tokens("another-secret-entirely"))
    with pytest.raises(Unauthorized):
        await other(
            make_scope(headers=[("x-api-key", "sk-alice")], ctx=make_ctx()),
            body_receive(),
            Recorder(),
        )


def test_context_of_reads_scope() -> None:
    ctx = make_ctx()
    assert RequestContext.of(make_scope(ctx=ctx)) is ctx
