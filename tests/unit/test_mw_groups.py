from __future__ import annotations

import orjson
import pytest
from starlette.types import Receive, Scope, Send

from gateway.config import GroupConfig, Route, UserGroupConfig
from gateway.context import Endpoint, Principal
from gateway.errors import (
    BadRequest,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from middleware.groups import GroupsMiddleware
from tests.asgi import Recorder, body_receive, make_ctx, make_scope

GROUPS = {
    "std": GroupConfig(models={"gpt": "p1", "claude": "p2"}, fallback_groups=("cheap",)),
    "cheap": GroupConfig(models={"gpt": "p3"}, multiplier=0.5, affinity="session"),
    "vip": GroupConfig(models={"o9": "p1"}),
}
USER_GROUPS = {
    "default": UserGroupConfig(groups=("std", "cheap")),
    "basic": UserGroupConfig(groups=("cheap",)),
}
POOL_ENDPOINTS = {
    "p1": frozenset({"chat/completions"}),
    "p2": frozenset({"messages"}),
    "p3": frozenset({"chat/completions"}),
}


async def _ok(scope: Scope, receive: Receive, send: Send) -> None:
    pass


def mw(limit: int = 1000) -> GroupsMiddleware:
    return GroupsMiddleware(
        _ok,
        groups=GROUPS,
        user_groups=USER_GROUPS,
        pool_endpoints=POOL_ENDPOINTS,
        max_body_bytes=limit,
    )


def principal(group: str = "std", user_group: str = "default") -> Principal:
    return Principal(token="t", user="u", user_group=user_group, group=group)


async def run(
    body: bytes | list[bytes],
    *,
    who: Principal | None = None,
    endpoint: Endpoint = Endpoint.CHAT,
    headers: list[tuple[str, str]] | None = None,
    limit: int = 1000,
):  # type: ignore[no-untyped-def]
    ctx = make_ctx(endpoint, principal=who or principal())
    chunks = body if isinstance(body, list) else [body]
    scope = make_scope(
        f"/v1/{endpoint.value}", headers=headers or [("content-type", "application/json")], ctx=ctx
    )
    await mw(limit)(scope, body_receive(*chunks), Recorder())
    return ctx


async def test_plan_is_token_group_then_fallbacks() -> None:
    ctx = await run(orjson.dumps({"model": "gpt", "stream": True, "messages": []}))
    assert ctx.plan == (Route("std", "p1", 1.0, "prefix"), Route("cheap", "p3", 0.5, "session"))
    assert ctx.model == "gpt" and ctx.stream is True
    assert ctx.body["messages"] == []


async def test_user_group_filters_the_plan() -> None:
    ctx = await run(
        orjson.dumps({"model": "gpt"}), who=Principal("t", "u", "basic", "std", ("cheap",))
    )
    assert [r.group for r in ctx.plan] == ["cheap"]


async def test_forbidden_group_is_403() -> None:
    with pytest.raises(Forbidden) as info:
        await run(orjson.dumps({"model": "claude"}), who=principal(user_group="basic"))
    assert "std" in info.value.message


async def test_unknown_model_is_404_naming_groups_that_have_it() -> None:
    with pytest.raises(NotFound) as info:
        await run(orjson.dumps({"model": "o9"}))
    assert info.value.code == "model_not_found"
    assert "vip" in info.value.message
    with pytest.raises(NotFound) as info:
        await run(orjson.dumps({"model": "nonexistent"}))
    assert "not available" in info.value.message


async def test_endpoint_the_pool_does_not_speak_is_400() -> None:
    with pytest.raises(BadRequest) as info:
        await run(orjson.dumps({"model": "claude"}), endpoint=Endpoint.CHAT)
    assert info.value.code == "endpoint_not_supported"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1,2]", "JSON object"),
        (b"", "empty"),
        (b'{"messages": []}', "'model' is required"),
        (b'{"model": 7}', "'model' is required"),
    ],
)
async def test_malformed_bodies_are_400(body: bytes, message: str) -> None:
    with pytest.raises(BadRequest) as info:
        await run(body)
    assert message in info.value.message
    assert info.value.status == 400


async def test_declared_oversize_body_is_413_before_reading() -> None:
    with pytest.raises(PayloadTooLarge):
        await run(b"{}", headers=[("content-length", "5000")], limit=1000)


async def test_chunked_oversize_body_is_413() -> None:
    with pytest.raises(PayloadTooLarge):
        await run([b"x" * 600, b"x" * 600], limit=1000)


async def test_body_in_chunks_is_joined() -> None:
    ctx = await run([b'{"model":', b'"gpt"}'])
    assert ctx.raw_body == b'{"model":"gpt"}'


async def test_non_json_content_type_is_415() -> None:
    with pytest.raises(UnsupportedMediaType):
        await run(b"model=gpt", headers=[("content-type", "application/x-www-form-urlencoded")])
