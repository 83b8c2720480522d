"""The terminal app: forwards the request to `ctx.account` and streams the answer back.

Reads ctx.account, ctx.endpoint, ctx.raw_body, ctx.body_patch; writes ctx.upstream_status
and ctx.first_byte. Any status other than 2xx is raised as `UpstreamStatus` (its body
reduced to a redacted summary) so that the failover middleware can decide before a
single byte has reached the client.

Streams are forwarded chunk by chunk as they arrive, with one exception: the preamble.
The events a provider sends before any output (OpenAI's role chunk, Anthropic's
`message_start` / `content_block_start` / `ping`) are held back, and the response is
started only together with the first content-bearing event, in the same write. A stream
that breaks during its preamble has shown the client nothing, so failover may try the
next account and the client sees exactly one preamble; holding costs no time to first
token. Once content has gone out, a failure ends the stream (the errors layer adds one
terminal error event); nothing is ever replayed.

Back-pressure: each chunk is read from the provider only after the previous one was
handed to the server, whose `send` waits while the client's socket is full; aiohttp then
stops reading its socket, and the provider is paced by the slowest reader. Nothing here
buffers more than one chunk. A client that reads nothing for a whole idle period is
dropped as gone (499), without counting against the provider's health.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aiohttp
import orjson
from starlette.types import Message, Receive, Scope, Send

from affinity.types import AccountSpec
from affinity.types import Limits as SpecLimits
from gateway.config import PROVIDER_ENDPOINTS, AccountConfig, Timeouts
from gateway.context import Endpoint, RequestContext
from gateway.errors import ClientGone, UpstreamError, UpstreamStatus, UpstreamTimeout
from gateway.sse import SSEEvent, SSEParser
from gateway.usage import stream_usage_patch

log = logging.getLogger(__name__)

ANTHROPIC_VERSION = "2023-06-01"
# Bounded read of a provider's error body: it is only used to pick a message.
MAX_ERROR_BODY = 64 * 1024


@dataclass(frozen=True, slots=True)
class Account:
    """An upstream account, everything precomputed. Its key lives only in `auth`."""

    name: str
    provider: str
    spec: AccountSpec
    urls: Mapping[str, str]  # endpoint path -> absolute URL
    auth: tuple[tuple[str, str], ...] = field(repr=False)

    @classmethod
    def from_config(cls, cfg: AccountConfig) -> Account:
        base = cfg.base_url.rstrip("/")
        if cfg.provider == "anthropic":
            auth: tuple[tuple[str, str], ...] = (("x-api-key", cfg.api_key),)
        else:
            auth = (("authorization", f"Bearer {cfg.api_key}"),)
        lim = cfg.limits
        spec = AccountSpec(
            name=cfg.name,
            cache_domain=cfg.cache_domain or cfg.name,
            weight=cfg.weight,
            limits=SpecLimits(
                rpm=lim.rpm, itpm=lim.itpm, otpm=lim.otpm, concurrency=lim.concurrency
            ),
            # Anthropic does not count cache reads against the input-token limit.
            itpm_counts_cached=cfg.provider != "anthropic",
        )
        urls = {ep: f"{base}/{ep}" for ep in PROVIDER_ENDPOINTS[cfg.provider]}
        return cls(cfg.name, cfg.provider, spec, urls, auth)

    def speaks(self, endpoint: str) -> bool:
        return endpoint in self.urls


# Never forwarded: credentials, cookies, hop-by-hop headers, and what the gateway sets.
_DROP = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "x-api-key",
        "api-key",
        "x-goog-api-key",
        "cookie",
        "host",
        "content-length",
        "accept-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-real-ip",
        "openai-organization",
        "openai-project",
        "anthropic-dangerous-direct-browser-access",
    }
)
# Substrings that mark a header as a credential whatever its exact name.
_SECRET_HINTS = ("auth", "key", "token", "secret", "cookie", "session", "password")
_forward_cache: dict[bytes, str | None] = {}


def _forward_name(raw: bytes) -> str | None:
    """The header name to forward, or None to drop it. Decisions are memoised per name."""
    try:
        return _forward_cache[raw]
    except KeyError:
        pass
    name = raw.decode("latin-1").lower()
    keep = name not in _DROP and not any(h in name for h in _SECRET_HINTS)
    result = name if keep else None
    if len(_forward_cache) < 4096:  # header names are few; never let a client grow this
        _forward_cache[raw] = result
    return result


def forward_headers(
    client: Iterable[tuple[bytes, bytes]], account: Account
) -> list[tuple[str, str]]:
    """Client headers safe to pass on, plus the account's credentials."""
    named_by_connection: set[str] = set()
    out: list[tuple[str, str]] = []
    for raw_name, raw_value in client:
        if raw_name == b"connection":
            named_by_connection.update(
                t.strip().lower() for t in raw_value.decode("latin-1").split(",")
            )
            continue
        name = _forward_name(raw_name)
        if name is not None:
            out.append((name, raw_value.decode("latin-1")))
    if named_by_connection:
        out = [(n, v) for n, v in out if n not in named_by_connection]
    out.extend(account.auth)
    if account.provider == "anthropic" and not any(n == "anthropic-version" for n, _ in out):
        out.append(("anthropic-version", ANTHROPIC_VERSION))
    out.append(("accept-encoding", "identity"))  # metering reads the bytes as they pass
    return out


_JSON_SPACE = frozenset(b" \t\r\n")
_CLOSE = ord("}")


def patched_body(raw: bytes, patch: Mapping[str, Any], parsed: Mapping[str, Any]) -> bytes:
    """The body to send: the client's bytes, unless top-level fields must change.

    Fields the body does not have yet are spliced in front (no re-encode of a
    50 KB prompt); changing an existing field re-encodes once.
    """
    if not patch:
        return raw
    if any(k in parsed for k in patch):
        merged = dict(parsed)
        merged.update(patch)
        return orjson.dumps(merged)
    head = orjson.dumps(patch)  # b'{"k":v,...}'
    at = raw.index(b"{") + 1
    while raw[at] in _JSON_SPACE:
        at += 1
    sep = b"" if raw[at] == _CLOSE else b","
    # One copy of the body: join takes the rest as a view.
    return b"".join((memoryview(head)[:-1], sep, memoryview(raw)[at:]))


# Response headers worth passing back; the rest describe the account, not the caller.
_PASS_BACK = {
    b"content-type": b"content-type",
    b"x-request-id": b"x-upstream-request-id",
    b"request-id": b"x-upstream-request-id",
    b"openai-processing-ms": b"openai-processing-ms",
}


class UpstreamClient:
    """The one pooled aiohttp session of the app, opened by the lifespan."""

    def __init__(self, timeouts: Timeouts) -> None:
        self.timeouts = timeouts
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=0,  # per-account concurrency is the pinning layer's job, not a hidden queue
            ttl_dns_cache=300,
            enable_cleanup_closed=False,
            keepalive_timeout=30,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=self.timeouts.total, sock_connect=self.timeouts.connect
            ),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("UpstreamClient.start() was not awaited")
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


# A provider's error type or code is passed on only when it looks like one
# (`rate_limit_error`, `insufficient_quota`): never anything that could be a key or an id.
_SAFE_KIND = re.compile(r"[a-z]{2,24}(?:_[a-z]{2,24}){0,4}")


def _error_message(status: int, body: bytes) -> str:
    """A provider's error message, redacted: only its type and a known-safe summary."""
    kind = ""
    try:
        doc = orjson.loads(body)
        err = doc.get("error") if isinstance(doc, dict) else None
        if isinstance(err, dict):
            kind = str(err.get("type") or err.get("code") or "")[:64]
    except orjson.JSONDecodeError:
        pass
    suffix = f" ({kind})" if _SAFE_KIND.fullmatch(kind) else ""
    return f"the upstream provider answered {status}{suffix}"


# Error types providers send inside a 200 stream, as the status they stand for.
_STREAM_ERROR_STATUS = {
    "overloaded_error": 529,
    "rate_limit_error": 429,
    "rate_limit_exceeded": 429,
    "api_error": 500,
    "server_error": 500,
}


def _stream_error(doc: dict[str, Any], data: bytes) -> UpstreamStatus:
    err = doc.get("error")
    kind = err.get("type") or err.get("code") if isinstance(err, dict) else None
    status = _STREAM_ERROR_STATUS.get(kind, 502) if isinstance(kind, str) else 502
    return UpstreamStatus(status, _error_message(status, data))


def _openai_preamble(event: SSEEvent) -> bool:
    """True for a chat-completions event that carries no output yet: the role chunk
    (`"delta": {"role": "assistant", "content": ""}`), empty `choices` (content-filter
    results), keep-alives. Anything unrecognised counts as output and is never held."""
    data = event.data
    if not data:
        return True
    if data == b"[DONE]":
        return False
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    if not isinstance(doc, dict):
        return False
    if "error" in doc:
        raise _stream_error(doc, data)
    choices = doc.get("choices")
    if doc.get("usage") or not isinstance(choices, list):
        return False
    for choice in choices:
        if not isinstance(choice, dict) or choice.get("finish_reason") is not None:
            return False
        delta = choice.get("delta")
        if not isinstance(delta, dict) or any(v for k, v in delta.items() if k != "role"):
            return False
    return True


_ANTHROPIC_PREAMBLE = frozenset({"message_start", "content_block_start", "ping"})


def _anthropic_preamble(event: SSEEvent) -> bool:
    """True for `message_start`, `content_block_start`, `ping` and keep-alives: what comes
    before the first `content_block_delta`."""
    name = event.event
    if name in _ANTHROPIC_PREAMBLE or (name is None and not event.data):
        return True
    if name == "error":
        try:
            doc = orjson.loads(event.data)
        except orjson.JSONDecodeError:
            doc = None
        raise _stream_error(doc if isinstance(doc, dict) else {}, event.data)
    return False


# Streams whose preamble is held back, by endpoint; the others start at once.
_PREAMBLE: Mapping[Endpoint, Callable[[SSEEvent], bool]] = {
    Endpoint.CHAT: _openai_preamble,
    Endpoint.MESSAGES: _anthropic_preamble,
}


def _retry_after(headers: Mapping[str, str]) -> float | None:
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return float(ms) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


# What the provider says about an account's limits: remaining requests, remaining
# (input) tokens, seconds until reset.
LimitsReading = tuple[int | None, int | None, float | None]
LimitsObserver = Callable[[AccountSpec, int | None, int | None, float | None], None]
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


def _reset_seconds(value: str | None) -> float | None:
    """OpenAI sends durations ("6m0s", "20ms"); Anthropic an RFC 3339 time."""
    if not value:
        return None
    parts = _DURATION.findall(value)
    if parts and "".join(n + u for n, u in parts) == value:
        return sum(float(n) * _UNIT[u] for n, u in parts)
    try:
        at = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return max(at.timestamp() - time.time(), 0.0)


def rate_limit_headers(headers: Mapping[str, str]) -> LimitsReading | None:
    """The provider's rate-limit headers, folded into the affinity windows."""
    requests = headers.get("x-ratelimit-remaining-requests")
    if requests is not None:
        return (
            _int(requests),
            _int(headers.get("x-ratelimit-remaining-tokens")),
            _reset_seconds(headers.get("x-ratelimit-reset-requests")),
        )
    requests = headers.get("anthropic-ratelimit-requests-remaining")
    if requests is not None:
        tokens = headers.get("anthropic-ratelimit-input-tokens-remaining") or headers.get(
            "anthropic-ratelimit-tokens-remaining"
        )
        return (
            _int(requests),
            _int(tokens),
            _reset_seconds(headers.get("anthropic-ratelimit-requests-reset")),
        )
    return None


class UpstreamApp:
    """Terminal ASGI app of the proxy chain."""

    def __init__(self, client: UpstreamClient, *, on_limits: LimitsObserver | None = None) -> None:
        self.client = client
        self.first_byte_timeout = client.timeouts.first_byte
        self.idle_timeout = client.timeouts.idle
        self.on_limits = on_limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = RequestContext.of(scope)
        account = ctx.account
        assert account is not None and ctx.endpoint is not None
        ctx.upstream_status = 0  # this attempt's, not a previous one's
        url = account.urls[ctx.endpoint.value]
        patch = ctx.body_patch
        if ctx.endpoint is Endpoint.CHAT and (wanted := stream_usage_patch(ctx.body)) is not None:
            # Metering needs the usage of every stream; it hides the chunk again.
            patch = {**patch, "stream_options": wanted}
        body = patched_body(ctx.raw_body, patch, ctx.body)
        headers = forward_headers(scope["headers"], account)
        try:
            async with asyncio.timeout(self.first_byte_timeout):
                resp = await self.client.session.post(url, data=body, headers=headers)
        except TimeoutError:
            raise UpstreamTimeout(
                f"account {account.name}: no response before the deadline"
            ) from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(
                f"account {account.name}: connection failed ({type(exc).__name__})"
            ) from None
        try:
            ctx.upstream_status = resp.status
            if self.on_limits is not None:
                reading = rate_limit_headers(resp.headers)
                if reading is not None:
                    self.on_limits(account.spec, *reading)
            if resp.status >= 300:
                raw = await resp.content.read(MAX_ERROR_BODY)
                raise UpstreamStatus(
                    resp.status,
                    _error_message(resp.status, raw),
                    retry_after=_retry_after(resp.headers),
                )
            out_headers = [
                (_PASS_BACK[k], v) for k, v in resp.raw_headers if k.lower() in _PASS_BACK
            ]
            ctype = resp.headers.get("content-type", "")
            if ctype.startswith("text/event-stream"):
                out_headers.append((b"cache-control", b"no-cache"))
                out_headers.append((b"x-accel-buffering", b"no"))  # nginx in front must not buffer
                start = {
                    "type": "http.response.start",
                    "status": resp.status,
                    "headers": out_headers,
                }
                await self._stream(resp, start, _PREAMBLE.get(ctx.endpoint), ctx, send)
            else:
                async with asyncio.timeout(self.idle_timeout):
                    data = await resp.read()
                out_headers.append((b"content-length", str(len(data)).encode()))
                await send(
                    {"type": "http.response.start", "status": resp.status, "headers": out_headers}
                )
                ctx.first_byte = time.perf_counter()
                await send({"type": "http.response.body", "body": data, "more_body": False})
        except TimeoutError:
            raise UpstreamTimeout(f"account {account.name}: the stream stalled") from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(
                f"account {account.name}: the connection broke ({type(exc).__name__})"
            ) from None
        finally:
            # A response read to its end returns its connection to the pool; anything
            # else (error, cancel, client gone) closes it so the provider stops work.
            if resp.content.at_eof():
                resp.release()
            else:
                resp.close()

    async def _stream(
        self,
        resp: aiohttp.ClientResponse,
        start: Message,
        preamble: Callable[[SSEEvent], bool] | None,
        ctx: RequestContext,
        send: Send,
    ) -> None:
        """Forward an SSE body; hold back its preamble (see the module docstring)."""
        loop = asyncio.get_running_loop()
        timeout = self.idle_timeout
        holding = preamble  # None once the response has started
        parser = SSEParser()  # fed only while holding
        held: list[bytes] = []
        sending = False
        # Re-arming the idle timer makes a new timer: do it at most every timeout/8, with
        # the deadline that much later, so it fires between timeout and 1.125 x timeout
        # after the provider's last chunk.
        slack = timeout / 8
        rearm_at = loop.time() + slack
        try:
            async with asyncio.timeout(timeout + slack) as idle:
                if holding is None:
                    await send(start)
                    ctx.first_byte = time.perf_counter()
                async for chunk in resp.content.iter_any():
                    if holding is not None:
                        held.append(chunk)
                        if all(map(holding, parser.feed(chunk))):
                            idle.reschedule(loop.time() + timeout)
                            continue
                        # The first output: the response starts with it, preamble included.
                        holding = None
                        chunk = b"".join(held)
                        held.clear()
                        await send(start)
                        ctx.first_byte = time.perf_counter()
                    sending = True
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    sending = False
                    now = loop.time()
                    if now >= rearm_at:
                        idle.reschedule(now + timeout + slack)
                        rearm_at = now + slack
                if holding is not None:  # the stream ended before any output
                    await send(start)
                    ctx.first_byte = time.perf_counter()
                sending = True
                await send(
                    {"type": "http.response.body", "body": b"".join(held), "more_body": False}
                )
        except TimeoutError:
            if sending:
                # Not the provider's fault: the client read nothing for a whole idle period.
                raise ClientGone("the client stopped reading") from None
            raise
