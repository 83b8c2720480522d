"""Fingerprint the prompt. Reads ctx.body, ctx.model, headers; writes ctx.fingerprint and
ctx.demand.

The fingerprint is the chain of block hashes of the request in the provider's cache
order (see affinity.fingerprint); pinning uses it to find the account that already
caches the longest prefix. Endpoints without a prompt cache (embeddings, token
counting) get an empty chain and are balanced without affinity.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from starlette.types import ASGIApp, Receive, Scope, Send

from affinity.fingerprint import Fingerprint, fingerprint
from affinity.types import Demand
from gateway.context import Endpoint, RequestContext
from gateway.errors import BadRequest

_KIND: dict[Endpoint, Literal["chat", "messages", "responses"]] = {
    Endpoint.CHAT: "chat",
    Endpoint.MESSAGES: "messages",
    Endpoint.RESPONSES: "responses",
}
# Explicit conversation ids sent by clients and coding agents, first match wins.
SESSION_HEADERS = (
    b"x-session-id",
    b"x-claude-code-session-id",  # Claude Code
    b"session_id",  # Codex
    b"session-id",
    b"conversation_id",  # Codex
)
DEFAULT_OUTPUT_ESTIMATE = 512
MAX_OUTPUT_ESTIMATE = 8192


def output_estimate(body: dict[str, Any]) -> int:
    for field in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = body.get(field)
        if isinstance(value, int) and value > 0:
            return min(value, MAX_OUTPUT_ESTIMATE)
    return DEFAULT_OUTPUT_ESTIMATE


def session_header(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name in SESSION_HEADERS and value:
            return value[:256].decode("latin-1")
    return None


class PrefixMiddleware:
    def __init__(
        self, app: ASGIApp, *, min_tokens: Callable[[str], int], max_messages: int = 10_000
    ) -> None:
        self.app = app
        self.min_tokens = min_tokens
        self.max_messages = max_messages

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = RequestContext.of(scope)
        assert ctx.endpoint is not None
        kind = _KIND.get(ctx.endpoint)
        if kind is None:
            fp = Fingerprint(
                hashes=(), tokens=(), root=0, total_tokens=ctx.tokens_estimate, session=None, full=0
            )
        else:
            field = "input" if kind == "responses" else "messages"
            items = ctx.body.get(field)
            if kind == "responses" and isinstance(items, str):
                items = [items]  # the Responses API takes a bare string as one user turn
            elif not isinstance(items, list) or not all(isinstance(m, dict) for m in items):
                raise BadRequest(f"'{field}' must be a list of message objects", param=field)
            if len(items) > self.max_messages:
                raise BadRequest(
                    f"too many messages: {len(items)} > {self.max_messages}", param=field
                )
            try:
                fp = fingerprint(
                    ctx.body,
                    kind=kind,
                    min_tokens=self.min_tokens(ctx.model),
                    session_hint=session_header(scope["headers"]),
                )
            except (TypeError, ValueError, AttributeError, KeyError):
                # The message names no body content: it could carry the caller's data.
                raise BadRequest("malformed request body: unexpected field types") from None
        ctx.fingerprint = fp
        ctx.demand = Demand(input_tokens=fp.total_tokens, output_tokens=output_estimate(ctx.body))
        await self.app(scope, receive, send)
