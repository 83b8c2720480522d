"""Authenticate the caller. Reads `Authorization: Bearer` or `x-api-key`; writes ctx.principal.

Keys are looked up by their keyed hash (HMAC-SHA256 with the server secret), so the
gateway never stores a key, and the lookup's timing reveals nothing about them. A
rejected key is never echoed, logged or forwarded.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.context import Principal, RequestContext
from gateway.errors import BudgetExhausted, RateLimited, Unauthorized
from gateway.ratelimit import TokenLimiter, Verdict
from gateway.tokens import Tokens


def presented_key(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, credential = value.partition(b" ")
            if scheme.lower() == b"bearer" and credential:
                return credential.strip()
        elif name == b"x-api-key" and value:
            return value.strip()
    return None


class AuthMiddleware:
    def __init__(
        self, app: ASGIApp, *, tokens: Tokens, limiter: TokenLimiter | None = None
    ) -> None:
        self.app = app
        self.tokens = tokens
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        key = presented_key(scope["headers"])
        if key is None:
            raise Unauthorized(
                "missing API key: send it as 'Authorization: Bearer <key>' or 'x-api-key'"
            )
        # Keyed by an HMAC the caller cannot compute without the secret, so the timing
        # of the lookup tells nothing about stored keys.
        principal = self.tokens.lookup(self.tokens.digest(key))
        if principal is None:
            raise Unauthorized("invalid API key")
        ctx = RequestContext.of(scope)
        ctx.principal = principal
        if ctx.endpoint is None:  # usage, models, admin: not billed, not limited
            await self.app(scope, receive, send)
            return
        spent = self.tokens.over_budget(principal)
        if spent is not None:
            raise BudgetExhausted(f"the {spent} budget of token {principal.token!r} is used up")
        if self.limiter is not None and (principal.rpm or principal.tpm):
            verdict = self.limiter.admit(principal.token, principal.rpm, principal.tpm)
            if not verdict.allowed:
                raise RateLimited(
                    f"rate limit of token {principal.token!r} reached",
                    retry_after=verdict.retry_after,
                    code="token_rate_limited",
                    extra_headers=_ratelimit_headers(principal, verdict),
                )
        await self.app(scope, receive, send)


def _ratelimit_headers(principal: Principal, verdict: Verdict) -> list[tuple[bytes, bytes]]:
    headers = []
    if principal.rpm is not None:
        headers.append((b"x-ratelimit-limit-requests", str(principal.rpm).encode()))
        headers.append(
            (b"x-ratelimit-remaining-requests", str(verdict.remaining_requests).encode())
        )
    if principal.tpm is not None:
        headers.append((b"x-ratelimit-limit-tokens", str(principal.tpm).encode()))
        headers.append((b"x-ratelimit-remaining-tokens", str(verdict.remaining_tokens).encode()))
    headers.append((b"x-ratelimit-reset-requests", f"{verdict.retry_after:.0f}s".encode()))
    return headers
