"""Platform response cache: answer a repeated request from storage, with no upstream call.
Reads ctx.plan, ctx.endpoint, ctx.body, ctx.stream, ctx.principal, ctx.account (after
the call) and the request headers; writes ctx.cache_status and ctx.cache_hit.

Off unless the plan's first group switches it on; then the cost of a disabled group is
one dict lookup. The key is a hash of the endpoint, the wire mode (stream or not), the
group's pool and the canonical JSON of the body without the fields that do not change
the answer (`stream`, `stream_options`, `user`, `metadata`, ...), salted with the token
name so each token has its own cache. A group may share answers between its tokens
(`shared`): that key is a keyed BLAKE2b, because a crafted collision there would serve
one tenant's answer to another; per-token keys use the much faster xxh3-128.

Requests that sample (a `temperature` above 0, the providers' default, without a
`seed`; `n` > 1; `tools`) bypass the cache unless the group says otherwise.
`Cache-Control: no-cache` skips the lookup but may store, `no-store` does neither,
`x-cache-ttl: N` sets the entry's lifetime (0: do not store). Every response that
passes this layer in a cache-enabled group carries `X-Cache-Status: HIT | MISS | BYPASS`.

A miss records the answer as it passes (bounded; never delaying a byte) and stores it
only when it is a 200 that completed: a JSON body, or a stream that ended with its
terminal event ([DONE], message_stop, response.completed) and no error event. A hit
replays the stored bytes: JSON with its length, or a well-formed SSE stream in
event-aligned chunks. Stored answers are sealed with AES-GCM, bound to their key.
Metering prices a hit at the group's `price_share` of the normal price (ctx.cache_hit).
A failing store is a miss, never an error.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import xxhash
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.cachestore import BlobStore, CacheCounters, StoreUnavailable
from gateway.context import CacheHit, Endpoint, RequestContext
from gateway.crypto import DecryptError, KeyRing, bind
from gateway.errors import BadRequest
from gateway.sse import SSEEvent, SSEParser

log = logging.getLogger(__name__)

CACHEABLE = frozenset({Endpoint.CHAT, Endpoint.MESSAGES, Endpoint.RESPONSES, Endpoint.EMBEDDINGS})
# Top-level fields that do not change the answer: transport, attribution, routing hints.
NON_SEMANTIC = frozenset(
    {
        "stream",
        "stream_options",
        "user",
        "metadata",
        "store",
        "prompt_cache_key",
        "prompt_cache_retention",
        "safety_identifier",
        "service_tier",
    }
)
HIT, MISS, BYPASS = "HIT", "MISS", "BYPASS"
_STATUS_HEADER = {s: (b"x-cache-status", s.encode()) for s in (HIT, MISS, BYPASS)}
_SSE_HEADERS = ((b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no"))
_REPLAY_CHUNK = 4096  # bytes per replayed write, whole events only
_AAD = b"response-cache"
_FORMAT = 1


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """One group's response cache, from `groups.<g>.response_cache`."""

    ttl_seconds: float = 3600.0
    shared: bool = False  # share answers between the group's tokens
    price_share: float = 0.1  # of the normal price, charged for a hit
    cache_nondeterministic: bool = False  # cache sampled answers too
    max_entry_bytes: int = 1 << 20  # larger answers are passed on, not stored
    max_ttl_seconds: float = 7 * 86400.0  # the most `x-cache-ttl` may ask for


@dataclass(frozen=True, slots=True)
class Stored:
    """A stored answer, as it is replayed."""

    content_type: bytes
    provider: str
    created: float  # unix seconds
    stream: bool
    body: bytes

    def encode(self) -> bytes:
        head = orjson.dumps(
            [_FORMAT, self.content_type.decode("latin-1"), self.provider, self.created]
        )
        return head + b"\n" + self.body

    @classmethod
    def decode(cls, raw: bytes) -> Stored:
        cut = raw.index(b"\n")
        version, ctype, provider, created = orjson.loads(raw[:cut])
        if version != _FORMAT:
            raise ValueError("unknown entry format")
        body = raw[cut + 1 :]
        return cls(
            ctype.encode("latin-1"),
            provider,
            created,
            ctype.startswith("text/event-stream"),
            body,
        )


def deterministic(body: Mapping[str, Any], endpoint: Endpoint) -> bool:
    """Whether the same request is expected to get the same answer again."""
    if endpoint is Endpoint.EMBEDDINGS:
        return True
    if body.get("tools") or body.get("functions"):
        return False
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > 1:
        return False
    temperature = body.get("temperature", 1.0)  # the providers' default samples
    if isinstance(temperature, int | float) and temperature <= 0:
        return True
    return body.get("seed") is not None


def directives(headers: list[tuple[bytes, bytes]]) -> tuple[bool, bool, float | None]:
    """(read, store, ttl override) from `Cache-Control` and `x-cache-ttl`."""
    read = store = True
    ttl: float | None = None
    for name, value in headers:
        if name == b"cache-control":
            for part in value.lower().split(b","):
                token = part.strip()
                if token == b"no-store":
                    read = store = False
                elif token == b"no-cache":
                    read = False
        elif name == b"x-cache-ttl":
            try:
                ttl = float(value)
            except ValueError:
                ttl = -1.0
            if not 0 <= ttl < float("inf"):
                raise BadRequest("x-cache-ttl must be a number of seconds >= 0")
            if ttl == 0:
                store = False
    return read, store, ttl


def completed(endpoint: Endpoint, stream: bool, body: bytes) -> bool:
    """Whether a 200 answer is whole and error-free, so worth storing."""
    if not stream:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return False
        # Responses objects carry `"error": null` and a status; the others neither.
        return (
            isinstance(doc, dict)
            and not doc.get("error")
            and doc.get("status", "completed") == "completed"
        )
    parser = SSEParser()
    events = parser.feed(body)
    if parser.flush().strip() or not events:
        return False  # ended inside an event
    if endpoint is Endpoint.CHAT:
        data = [e.data for e in events if e.data]
        return bool(data) and data[-1] == b"[DONE]" and not any(map(_error_data, data))
    names = {_event_name(e) for e in events}
    if endpoint is Endpoint.MESSAGES:
        return "message_stop" in names and "error" not in names
    if endpoint is Endpoint.RESPONSES:
        bad = {"error", "response.failed", "response.incomplete"}
        return "response.completed" in names and not names & bad
    return False


def _error_data(data: bytes) -> bool:
    if b'"error"' not in data:
        return False
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    return isinstance(doc, dict) and bool(doc.get("error"))


def _event_name(event: SSEEvent) -> str | None:
    if event.event is not None:
        return event.event
    if b'"type"' in event.data:
        try:
            doc = orjson.loads(event.data)
        except orjson.JSONDecodeError:
            return None
        kind = doc.get("type") if isinstance(doc, dict) else None
        return kind if isinstance(kind, str) else None
    return None


def replay_chunks(body: bytes, size: int = _REPLAY_CHUNK) -> list[bytes]:
    """The stored stream cut into writes of whole events, about `size` bytes each."""
    parser = SSEParser()
    chunks: list[bytes] = []
    pending: list[bytes] = []
    filled = 0
    for event in parser.feed(body):
        pending.append(event.raw)
        filled += len(event.raw)
        if filled >= size:
            chunks.append(b"".join(pending))
            pending.clear()
            filled = 0
    tail = parser.flush()
    if tail:
        pending.append(tail)
    if pending:
        chunks.append(b"".join(pending))
    return chunks


class ResponseCacheMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        policies: Mapping[str, CachePolicy],
        store: BlobStore,
        keys: KeyRing | None,
        secret: bytes,
        counters: CacheCounters | None = None,
    ) -> None:
        self.app = app
        self.policies = dict(policies)  # enabled groups only
        self.store = store
        self.keys = keys  # None: stored in clear (tests, embedded setups without keys)
        self.counters = counters or CacheCounters()
        digest = hashlib.sha256(b"response-cache\0" + secret).digest()
        self._seed = int.from_bytes(digest[:8], "big")
        self._shared = hashlib.blake2b(key=digest, digest_size=16)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = RequestContext.of(scope)
        policy = self.policies.get(ctx.plan[0].group) if ctx.plan else None
        if policy is None:
            await self.app(scope, receive, send)
            return
        await self._through_cache(policy, ctx, scope, receive, send)

    async def _through_cache(
        self, policy: CachePolicy, ctx: RequestContext, scope: Scope, receive: Receive, send: Send
    ) -> None:
        read, store, ttl = directives(scope["headers"])
        if not self._cacheable(policy, ctx):
            read = store = False
        key = self._key(policy, ctx) if read or store else b""
        if read:
            stored = await self._lookup(key)
            if stored is not None:
                ctx.cache_status = HIT
                ctx.cache_hit = CacheHit(ctx.plan[0].group, stored.provider, policy.price_share)
                await self._replay(stored, send)
                return
        ctx.cache_status = label = MISS if read else BYPASS
        header = _STATUS_HEADER[label]
        recording: list[bytes] | None = [] if store else None
        recorded = 0
        status = 0
        ctype = b""
        finished = False

        async def send_recording(message: Message) -> None:
            nonlocal recording, recorded, status, ctype, finished
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = message.get("headers", ())
                for name, value in headers:
                    if name == b"content-type":
                        ctype = value
                message = {**message, "headers": [*headers, header]}
            elif message["type"] == "http.response.body":
                if recording is not None:
                    chunk = message.get("body", b"")
                    recorded += len(chunk)
                    if recorded > policy.max_entry_bytes:
                        recording = None  # too big to keep: passed on, not stored
                    elif chunk:
                        recording.append(chunk)
                if not message.get("more_body", False):
                    finished = True
            await send(message)

        await self.app(scope, receive, send_recording)
        if recording is None or not finished or status != 200 or ctx.account is None:
            return
        body = b"".join(recording)
        answer = Stored(
            ctype, ctx.account.provider, time.time(), ctype.startswith(b"text/event-stream"), body
        )
        assert ctx.endpoint is not None
        if not answer.stream and not ctype.startswith(b"application/json"):
            return
        if not completed(ctx.endpoint, answer.stream, body):
            return
        lifetime = min(ttl, policy.max_ttl_seconds) if ttl is not None else policy.ttl_seconds
        await self._save(key, answer, lifetime)

    def _cacheable(self, policy: CachePolicy, ctx: RequestContext) -> bool:
        endpoint = ctx.endpoint
        if endpoint not in CACHEABLE:
            return False
        body = ctx.body
        if endpoint is Endpoint.RESPONSES:
            # A stored response is state its id refers to: only `store: false` answers are
            # replayable. A shared cache must not answer from another tenant's thread.
            if body.get("store") is not False or body.get("background"):
                return False
            if policy.shared and ("previous_response_id" in body or "conversation" in body):
                return False
        return policy.cache_nondeterministic or deterministic(body, endpoint)

    def _key(self, policy: CachePolicy, ctx: RequestContext) -> bytes:
        assert ctx.endpoint is not None and ctx.principal is not None
        route = ctx.plan[0]
        semantic = {k: v for k, v in ctx.body.items() if k not in NON_SEMANTIC}
        canonical = orjson.dumps(semantic, option=orjson.OPT_SORT_KEYS)
        mode = b"stream" if ctx.stream else b"json"
        if policy.shared:
            h = self._shared.copy()
            h.update(bind(b"group", route.group, route.pool, ctx.endpoint.value, mode))
            h.update(canonical)
            return h.digest()
        head = bind(b"token", ctx.principal.token, route.pool, ctx.endpoint.value, mode)
        return xxhash.xxh3_128_digest(head + canonical, seed=self._seed)

    async def _lookup(self, key: bytes) -> Stored | None:
        try:
            blob = await self.store.get(key)
        except StoreUnavailable:
            self.counters.store_errors += 1
            return None
        if blob is None:
            return None
        try:
            raw = blob if self.keys is None else self.keys.open(blob, bind(_AAD, key))
            return Stored.decode(raw)
        except (DecryptError, ValueError):
            self.counters.response_decrypt_failures += 1
            return None

    async def _save(self, key: bytes, answer: Stored, ttl: float) -> None:
        raw = answer.encode()
        blob = raw if self.keys is None else self.keys.seal(raw, bind(_AAD, key))
        try:
            await self.store.put(key, blob, ttl)
        except StoreUnavailable:
            self.counters.store_errors += 1
            log.warning("response cache: the store failed; the answer was not cached")

    @staticmethod
    async def _replay(stored: Stored, send: Send) -> None:
        age = str(max(0, int(time.time() - stored.created))).encode()
        headers = [(b"content-type", stored.content_type), _STATUS_HEADER[HIT], (b"age", age)]
        if not stored.stream:
            headers.append((b"content-length", str(len(stored.body)).encode()))
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": stored.body, "more_body": False})
            return
        headers.extend(_SSE_HEADERS)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for chunk in replay_chunks(stored.body):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
