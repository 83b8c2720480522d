"""Every error the gateway answers with, and how each API family renders it.

Inner layers raise; the outermost middleware renders. The tree::

    GatewayError                      500 api_error
    ├── BadRequest                    400 invalid_request_error
    │   ├── PayloadTooLarge           413 request_too_large
    │   └── UnsupportedMediaType      415 invalid_request_error
    ├── Unauthorized                  401 authentication_error
    ├── BudgetExhausted               402 insufficient_quota
    ├── Forbidden                     403 permission_error
    ├── NotFound                      404 not_found_error
    ├── MethodNotAllowed              405 invalid_request_error
    ├── Conflict                      409 invalid_request_error
    ├── RateLimited                   429 rate_limit_error (+ Retry-After)
    ├── UpstreamError                 502 upstream_error
    │   ├── UpstreamTimeout           504
    │   └── UpstreamStatus            the provider's status, its message redacted
    ├── ShuttingDown                  503 overloaded_error: cut at the drain deadline
    └── ClientGone                    499, never rendered: nobody is listening

Messages are written for the caller and never contain keys, hashes or provider bodies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import orjson

from gateway.context import Family


class GatewayError(Exception):
    status = 500
    type = "api_error"
    code: str | None = None

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param

    def headers(self) -> list[tuple[bytes, bytes]]:
        return []


class BadRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class PayloadTooLarge(BadRequest):
    status = 413
    type = "request_too_large"


class UnsupportedMediaType(BadRequest):
    status = 415


class Unauthorized(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class BudgetExhausted(GatewayError):
    status = 402
    type = "insufficient_quota"
    code = "budget_exhausted"


class Forbidden(GatewayError):
    status = 403
    type = "permission_error"


class NotFound(GatewayError):
    status = 404
    type = "not_found_error"


class Conflict(GatewayError):
    status = 409
    type = "invalid_request_error"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"

    def __init__(
        self,
        message: str,
        *,
        retry_after: float,
        code: str | None = None,
        extra_headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        super().__init__(message, code=code)
        self.retry_after = max(1, int(retry_after + 0.999))
        self.extra_headers = list(extra_headers)

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"retry-after", str(self.retry_after).encode()), *self.extra_headers]


class UpstreamError(GatewayError):
    status = 502
    type = "upstream_error"


class UpstreamTimeout(UpstreamError):
    status = 504


class UpstreamStatus(UpstreamError):
    """The provider answered with an error status we pass on (after failover gave up)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        retry_after: float | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.status = status
        self.type = _TYPE_BY_STATUS.get(status, "upstream_error")
        self.retry_after = retry_after

    def headers(self) -> list[tuple[bytes, bytes]]:
        if self.retry_after is None:
            return []
        return [(b"retry-after", str(max(1, int(self.retry_after + 0.999))).encode())]


class ShuttingDown(GatewayError):
    status = 503
    type = "overloaded_error"


class ClientGone(GatewayError):
    status = 499
    type = "client_closed_request"


_TYPE_BY_STATUS: Mapping[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    529: "overloaded_error",
}

# OpenAI clients know a smaller set of types; map ours onto theirs.
_OPENAI_TYPE: Mapping[str, str] = {
    "api_error": "server_error",
    "upstream_error": "server_error",
    "overloaded_error": "server_error",
    "request_too_large": "invalid_request_error",
    "not_found_error": "invalid_request_error",
    "permission_error": "invalid_request_error",
    "rate_limit_error": "requests",
}

# Anthropic's documented error types.
_ANTHROPIC_TYPE: Mapping[str, str] = {
    "upstream_error": "api_error",
    "client_closed_request": "api_error",
}


def error_body(exc: GatewayError, family: Family) -> bytes:
    """The JSON error body in the caller's API family."""
    if family is Family.ANTHROPIC:
        return orjson.dumps(
            {
                "type": "error",
                "error": {"type": _ANTHROPIC_TYPE.get(exc.type, exc.type), "message": exc.message},
            }
        )
    return orjson.dumps(
        {
            "error": {
                "message": exc.message,
                "type": _OPENAI_TYPE.get(exc.type, exc.type),
                "param": exc.param,
                "code": exc.code,
            }
        }
    )


def error_event(exc: GatewayError, family: Family) -> bytes:
    """A terminal SSE event for a stream that has already started."""
    body = error_body(exc, family)
    if family is Family.ANTHROPIC:
        return b"event: error\ndata: " + body + b"\n\n"
    return b"data: " + body + b"\n\n"


class RouteExhausted(Exception):
    """Every candidate of one plan step failed before the response started.

    Raised by failover, caught by pinning, which tries the plan's next group; if it
    escapes, the errors layer renders the last attempt's error.
    """

    def __init__(self, last: GatewayError) -> None:
        super().__init__(last.message)
        self.last = last
