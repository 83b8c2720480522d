"""Tiny ASGI fakes for unit tests of single middlewares."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson
from starlette.types import Message, Receive, Scope

from gateway.context import SCOPE_KEY, Endpoint, Family, RequestContext


def make_scope(
    path: str = "/v1/chat/completions",
    *,
    method: str = "POST",
    headers: Iterable[tuple[str, str]] = (),
    ctx: RequestContext | None = None,
) -> Scope:
    scope: Scope = {
        "type": "http",
        "method": method,
        "path": path,
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
    }
    if ctx is not None:
        scope[SCOPE_KEY] = ctx
    return scope


def make_ctx(endpoint: Endpoint = Endpoint.CHAT, **fields: Any) -> RequestContext:
    return RequestContext(request_id="r1", family=endpoint.family, endpoint=endpoint, **fields)


def body_receive(*chunks: bytes) -> Receive:
    """Delivers the body in the given chunks, then blocks like a live connection."""
    pending = list(chunks) or [b""]

    async def receive() -> Message:
        if pending:
            chunk = pending.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(pending)}
        return {"type": "http.disconnect"}

    return receive


class Recorder:
    """A `send` that keeps every message."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def __call__(self, message: Message) -> None:
        self.messages.append(message)

    @property
    def status(self) -> int:
        return int(self.messages[0]["status"])

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(self.messages[0]["headers"])

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages[1:])

    def json(self) -> Any:
        return orjson.loads(self.body)


__all__ = ["Family", "Recorder", "body_receive", "make_ctx", "make_scope"]
