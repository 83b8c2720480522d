"""The emulator as one pure-ASGI app: many provider accounts behind one server.

API endpoints (an account's key authenticates both families; point the OpenAI SDK at
``<url>/v1`` and the Anthropic SDK at ``<url>``):
  POST /v1/chat/completions, /v1/embeddings, GET /v1/models    OpenAI (Bearer key)
  POST /v1/responses; GET, DELETE /v1/responses/{id};          OpenAI Responses, stored
  GET /v1/responses/{id}/input_items                           per account
  POST /v1/messages, /v1/messages/count_tokens                 Anthropic (x-api-key or
                                                               Bearer; anthropic-version)
  GET /v1/models with an anthropic-version header answers in the Anthropic format.
Operator endpoints (no key): GET /stats, POST /stats/reset, GET /debug/requests (the
last API requests with their headers as received), POST /control/faults and
POST /control/limits (``{"account": name, ...fields}``; the name alone clears them).

A generation request runs: authenticate (401) -> parse (400, including a
previous_response_id the account does not hold) -> injected error -> cache lookup ->
rate limits (429) -> stall + prefill latency -> cache write -> decode latency and the
response, streamed or not (a completed Responses answer is stored on its account just
before its last bytes go out). A client that goes away during any wait is noticed at
once and counted; with zero latency there is no wait to notice it in.
"""

from __future__ import annotations

import base64
import math
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import orjson
from pydantic import TypeAdapter, ValidationError
from starlette.types import Receive, Scope, Send

from gateway.emulator.accounts import COUNTERS, Account, Stats
from gateway.emulator.anthropic_wire import AnthropicDialect
from gateway.emulator.asgi import (
    EVENT_STREAM,
    JSON,
    BodyTooLarge,
    ClientWatch,
    InjectedStreamCut,
    header,
    read_body,
    respond,
    respond_json,
)
from gateway.emulator.cache import CachePlan, CachePolicy
from gateway.emulator.config import EmulatorConfig, FaultSpec, LimitSpec
from gateway.emulator.dialect import Dialect, Generation, Headers, LimitState, Usage, output_limit
from gateway.emulator.limits import admit
from gateway.emulator.openai_wire import OpenAIDialect
from gateway.emulator.prompt import PromptError, anthropic_prompt, estimate_tokens
from gateway.emulator.responses_wire import (
    PreviousResponseNotFound,
    ResponsesDialect,
    deleted,
    input_items,
    not_found,
)
from gateway.emulator.text import TextSource, embedding

OPENAI: Dialect = OpenAIDialect()
ANTHROPIC: Dialect = AnthropicDialect()

MAX_BODY_BYTES = 32 * 1024 * 1024
RESPONSE_PATH = "/v1/responses/"
DEFAULT_EMBEDDING_DIMENSIONS = 16
MODELS = (
    ("gpt-4o", "openai"),
    ("gpt-4o-mini", "openai"),
    ("text-embedding-3-small", "openai"),
    ("claude-sonnet-4-6", "anthropic"),
    ("claude-haiku-4-5", "anthropic"),
)

_FAULTS = TypeAdapter(FaultSpec)
_LIMITS = TypeAdapter(LimitSpec)

Handler = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(slots=True)
class _Call:
    """One authenticated API request with its parsed JSON body."""

    account: Account
    dialect: Dialect
    send: Send
    watch: ClientWatch
    headers: Headers  # response headers every answer carries (request id)
    rid: str
    body: dict[str, Any]


def _retry_headers(seconds: float) -> Headers:
    return [
        (b"retry-after", b"%d" % max(1, math.ceil(seconds))),
        (b"retry-after-ms", b"%d" % max(1, math.ceil(seconds * 1000))),
    ]


class EmulatorApp:
    def __init__(
        self, config: EmulatorConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self.clock = clock
        self.accounts = {spec.name: Account(spec, config) for spec in config.accounts}
        self._by_key = {spec.key: self.accounts[spec.name] for spec in config.accounts}
        self.policy = CachePolicy(
            min_tokens=config.min_cache_tokens,
            block_tokens=config.cache_block_tokens,
            ttl=config.scaled(config.cache_ttl_seconds),
            long_ttl=config.scaled(config.cache_long_ttl_seconds),
            lookback=config.lookback_blocks,
        )
        self.text = TextSource(config.seed, config.max_output_tokens)
        self._responses = ResponsesDialect(config.seed)
        latency = config.latency
        self._base = config.scaled(latency.base_ms / 1e3)
        self._prefill_per_token = config.scaled(latency.prefill_ms_per_1k_uncached / 1e6)
        self._decode_per_token = config.scaled(latency.decode_ms_per_token / 1e3)
        # (unix time, method, path, account name, raw headers), newest last
        self.requests: deque[tuple[float, str, str, str | None, Headers]] = deque(
            maxlen=config.request_log_size
        )
        self.unauthorized = 0
        self._next_id = 0
        self._routes: dict[tuple[str, str], Handler] = {
            ("POST", "/v1/chat/completions"): self._chat_completions,
            ("POST", "/v1/messages"): self._messages,
            ("POST", "/v1/responses"): self._create_response,
            ("POST", "/v1/messages/count_tokens"): self._count_tokens,
            ("POST", "/v1/embeddings"): self._embeddings,
            ("GET", "/v1/models"): self._models,
            ("GET", "/stats"): self._stats,
            ("POST", "/stats/reset"): self._reset_stats,
            ("GET", "/debug/requests"): self._debug_requests,
            ("POST", "/control/faults"): self._set_faults,
            ("POST", "/control/limits"): self._set_limits,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        handler = self._routes.get((scope["method"], scope["path"]))
        if handler is not None:
            await handler(scope, receive, send)
            return
        if scope["path"].startswith(RESPONSE_PATH):
            await self._stored_response(scope, receive, send)
            return
        dialect = ANTHROPIC if scope["path"].startswith("/v1/messages") else OPENAI
        known = any(path == scope["path"] for _, path in self._routes)
        status = 405 if known else 404
        await respond(send, status, dialect.error(status, f"{scope['method']} {scope['path']}"))

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    # --- the request preamble shared by every API endpoint ----------------------

    async def _open(
        self, dialect: Dialect, scope: Scope, receive: Receive, send: Send, *, count: bool = True
    ) -> _Call | None:
        """Authenticate and read the JSON body; answers the failures itself."""
        self._next_id += 1
        rid = f"emu{self._next_id:020x}"
        headers: Headers = scope["headers"]
        reply: Headers = [(dialect.request_id_header, b"req_" + rid.encode())]
        key = dialect.api_key(headers)
        account = self._by_key.get(key) if key is not None else None
        self.requests.append(
            (
                time.time(),
                scope["method"],
                scope["path"],
                account.name if account else None,
                headers,
            )
        )
        if account is None:
            self.unauthorized += 1
            message = "invalid x-api-key" if dialect is ANTHROPIC else "Incorrect API key provided."
            await respond(send, 401, dialect.error(401, message), reply)
            return None
        if count:
            account.stats.requests += 1
        call = _Call(account, dialect, send, ClientWatch(receive), reply, rid, {})
        try:
            raw = await read_body(receive, MAX_BODY_BYTES) if scope["method"] == "POST" else b"{}"
        except BodyTooLarge:
            await self._fail(call, 413, f"request body exceeds {MAX_BODY_BYTES} bytes")
            return None
        if raw is None:
            account.disconnected()
            return None
        problem = dialect.check_headers(headers)
        if problem is not None:
            await self._fail(call, 400, problem)
            return None
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            await self._fail(call, 400, f"the request body is not valid JSON: {exc}")
            return None
        if not isinstance(body, dict):
            await self._fail(call, 400, "the request body must be a JSON object")
            return None
        call.body = body
        return call

    async def _answer(
        self, call: _Call, status: int, body: bytes, headers: Headers, content_type: bytes
    ) -> None:
        """Send a complete response after the account's stall, unless the client leaves."""
        try:
            if not await call.watch.sleep(self._stall(call.account)):
                call.account.disconnected()
                return
            await respond(call.send, status, body, call.headers + headers, content_type)
        finally:
            call.watch.close()  # the call's last word: its failure paths have no other exit

    def _stall(self, account: Account) -> float:
        """The injected delay before this response's first byte, in real seconds."""
        stall = self.config.scaled(account.faults.stall_seconds)
        if stall > 0:
            account.stats.faults_injected += 1
        return stall

    async def _fail(self, call: _Call, status: int, message: str) -> None:
        await self._refuse(call, status, call.dialect.error(status, message))

    async def _refuse(self, call: _Call, status: int, body: bytes) -> None:
        call.account.stats.errors += 1
        await self._answer(call, status, body, self._limit_headers(call, self.clock()), JSON)

    def _limit_headers(self, call: _Call, now: float) -> Headers:
        account = call.account
        limits = account.limits
        if limits.rpm is None and limits.itpm is None:
            return []
        requests, tokens = account.window.usage(now)
        state = LimitState(limits.rpm, requests, limits.itpm, tokens, account.window.reset_in(now))
        return call.dialect.limit_headers(state)

    async def _injected_error(self, call: _Call) -> bool:
        """Roll the account's error dice; True if an error was sent instead."""
        account = call.account
        if not account.roll_error():
            return False
        faults = account.faults
        account.stats.faults_injected += 1
        headers = self._limit_headers(call, self.clock())
        if faults.retry_after is not None and faults.status in (429, 529):
            headers += _retry_headers(self.config.scaled(faults.retry_after))
        if faults.body is not None:
            body = faults.body.encode()
            content_type = b"text/plain; charset=utf-8"
        else:
            body = call.dialect.error(faults.status, "Injected fault.", "requests")
            content_type = JSON
        await self._answer(call, faults.status, body, headers, content_type)
        return True

    async def _admit(self, call: _Call, counted_tokens: int, now: float) -> Headers | None:
        """Apply the rate limits; the headers to send if admitted, else None (429 sent)."""
        account = call.account
        denial = admit(
            account.limits,
            account.window,
            active=account.active,
            tokens=counted_tokens,
            now=now,
            concurrency_retry=self.config.scaled(1.0),
        )
        headers = self._limit_headers(call, now)
        if denial is None:
            return headers
        account.stats.rate_limited += 1
        body = call.dialect.error(429, denial.message, denial.kind)
        await self._answer(call, 429, body, headers + _retry_headers(denial.retry_after), JSON)
        return None

    # --- generation ----------------------------------------------------------------

    async def _chat_completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._generate(OPENAI, scope, receive, send)

    async def _messages(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._generate(ANTHROPIC, scope, receive, send)

    async def _create_response(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._generate(self._responses, scope, receive, send)

    async def _generate(self, dialect: Dialect, scope: Scope, receive: Receive, send: Send) -> None:
        call = await self._open(dialect, scope, receive, send)
        if call is None:
            return
        try:
            try:
                gen = dialect.parse(
                    call.body,
                    rid=call.rid,
                    default_tokens=self.config.default_output_tokens,
                    max_tokens=self.config.max_output_tokens,
                    stored=call.account.responses,
                    now=self.clock(),
                )
            except PreviousResponseNotFound as exc:
                call.account.stats.response_not_found += 1
                await self._refuse(call, 400, exc.body)
                return
            except PromptError as exc:
                await self._fail(call, 400, str(exc))
                return
            if await self._injected_error(call):
                return
            await self._serve(call, gen)
        finally:
            call.watch.close()

    async def _serve(self, call: _Call, gen: Generation) -> None:
        account = call.account
        now = self.clock()
        plan = call.dialect.plan(self.policy, account.cache, gen.prompt, now)
        prompt_tokens = gen.prompt.tokens
        uncached = prompt_tokens - plan.read_tokens
        counts_cached = account.limits.itpm_counts_cached
        if counts_cached is None:
            counts_cached = call.dialect.counts_cached_input
        headers = await self._admit(call, prompt_tokens if counts_cached else uncached, now)
        if headers is None:
            return
        account.active += 1
        try:
            stats = account.stats
            stats.prompt_tokens += prompt_tokens
            stats.cached_tokens += plan.read_tokens
            await self._respond(call, gen, plan, uncached, headers)
        finally:
            account.active -= 1

    async def _respond(
        self, call: _Call, gen: Generation, plan: CachePlan, uncached: int, headers: Headers
    ) -> None:
        account = call.account
        ttfb = self._stall(account) + self._base + self._prefill_per_token * uncached
        if not await call.watch.sleep(ttfb):
            account.disconnected()
            return
        plan.commit(account.cache, self.clock())
        account.stats.cache_write_tokens += plan.write_tokens
        usage = Usage(
            gen.prompt.tokens,
            plan.read_tokens,
            plan.write_tokens,
            plan.write_long_tokens,
            gen.output_tokens,
        )
        tokens = self.text.tokens(gen.prompt.digest(), gen.output_tokens)
        if gen.stream:
            await self._stream(call, gen, usage, tokens, headers)
            return
        if not await call.watch.sleep(self._decode_per_token * len(tokens)):
            account.disconnected()
            return
        body = call.dialect.response(gen, usage, tokens)
        await respond(call.send, 200, body, call.headers + headers)
        account.stats.completion_tokens += len(tokens)

    async def _stream(
        self, call: _Call, gen: Generation, usage: Usage, tokens: list[str], headers: Headers
    ) -> None:
        account, dialect, send, watch = call.account, call.dialect, call.send, call.watch
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", EVENT_STREAM),
                    (b"cache-control", b"no-cache"),
                    *call.headers,
                    *headers,
                ],
            }
        )
        for event in dialect.stream_head(gen, usage):
            await send({"type": "http.response.body", "body": event, "more_body": True})
        cut = account.faults.cut_after_chunks
        step = self.config.stream_chunk_tokens
        decode = self._decode_per_token
        watch.start()
        started = self.clock()
        sent = chunks = 0
        try:
            while True:
                if chunks == cut:
                    account.stats.faults_injected += 1
                    raise InjectedStreamCut(f"cut after {cut} chunks")
                if sent >= len(tokens):
                    break
                piece = tokens[sent : sent + step]
                # Pace against the start so that sleep overshoot does not accumulate.
                wait = started + decode * (sent + len(piece)) - self.clock()
                if not await watch.sleep(wait):
                    account.disconnected()
                    return
                await send(
                    {
                        "type": "http.response.body",
                        "body": dialect.stream_chunk(gen, "".join(piece)),
                        "more_body": True,
                    }
                )
                sent += len(piece)
                chunks += 1
            tail = dialect.stream_tail(gen, usage, tokens)
            for event in tail[:-1]:
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": tail[-1]})
            if watch.gone:
                account.disconnected()
        finally:
            account.stats.completion_tokens += sent

    # --- other API endpoints -----------------------------------------------------------

    async def _count_tokens(self, scope: Scope, receive: Receive, send: Send) -> None:
        call = await self._open(ANTHROPIC, scope, receive, send, count=False)
        if call is None:
            return
        try:
            tokens = anthropic_prompt(call.body).tokens
        except PromptError as exc:
            await self._fail(call, 400, str(exc))
            return
        await respond(send, 200, orjson.dumps({"input_tokens": tokens}), call.headers)

    async def _embeddings(self, scope: Scope, receive: Receive, send: Send) -> None:
        call = await self._open(OPENAI, scope, receive, send)
        if call is None:
            return
        try:
            await self._embed(call)
        finally:
            call.watch.close()

    async def _embed(self, call: _Call) -> None:
        body = call.body
        try:
            texts = _embedding_inputs(body.get("input"))
            dimensions = output_limit(body, "dimensions") or DEFAULT_EMBEDDING_DIMENSIONS
            if dimensions > self.config.max_output_tokens:
                raise PromptError(f"dimensions: at most {self.config.max_output_tokens}")
            model = body.get("model")
            if not isinstance(model, str):
                raise PromptError("model: a string is required")
        except PromptError as exc:
            await self._fail(call, 400, str(exc))
            return
        if await self._injected_error(call):
            return
        tokens = sum(estimate_tokens(len(text)) for text in texts)
        headers = await self._admit(call, tokens, self.clock())
        if headers is None:
            return
        call.account.stats.prompt_tokens += tokens
        call.account.active += 1
        try:
            if not await call.watch.sleep(self._stall(call.account) + self._base):
                call.account.disconnected()
                return
        finally:
            call.account.active -= 1
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for index, text in enumerate(texts):
            vector: Any = embedding(text, dimensions, self.config.seed)
            if as_base64:
                vector = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": vector})
        payload = {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        await respond(call.send, 200, orjson.dumps(payload), call.headers + headers)

    async def _models(self, scope: Scope, receive: Receive, send: Send) -> None:
        anthropic = header(scope["headers"], b"anthropic-version") is not None
        dialect = ANTHROPIC if anthropic else OPENAI
        call = await self._open(dialect, scope, receive, send, count=False)
        if call is None:
            return
        if anthropic:
            data: list[dict[str, Any]] = [
                {"type": "model", "id": m, "display_name": m, "created_at": "2025-01-01T00:00:00Z"}
                for m, provider in MODELS
                if provider == "anthropic"
            ]
            payload: dict[str, Any] = {
                "data": data,
                "has_more": False,
                "first_id": data[0]["id"],
                "last_id": data[-1]["id"],
            }
        else:
            models = [
                {"id": m, "object": "model", "created": 1735689600, "owned_by": p}
                for m, p in MODELS
            ]
            payload = {"object": "list", "data": models}
        await respond(send, 200, orjson.dumps(payload), call.headers)

    async def _stored_response(self, scope: Scope, receive: Receive, send: Send) -> None:
        """GET or DELETE /v1/responses/{id}, GET /v1/responses/{id}/input_items: on the
        caller's account only, like the previous_response_id they serve."""
        response_id, _, rest = scope["path"][len(RESPONSE_PATH) :].partition("/")
        methods = ("GET", "DELETE") if not rest else ("GET",) if rest == "input_items" else ()
        if not response_id or not methods or scope["method"] not in methods:
            status = 405 if methods and response_id else 404
            message = f"{scope['method']} {scope['path']}"
            await respond(send, status, OPENAI.error(status, message))
            return
        call = await self._open(self._responses, scope, receive, send, count=False)
        if call is None:
            return
        now = self.clock()
        stored = call.account.responses
        if scope["method"] == "DELETE":
            if stored.delete(response_id, now):
                await respond(send, 200, deleted(response_id), call.headers)
            else:
                await respond(send, 404, not_found(response_id), call.headers)
            return
        response = stored.get(response_id, now)
        if response is None:
            await respond(send, 404, not_found(response_id), call.headers)
            return
        if not rest:
            await respond(send, 200, response.body, call.headers)
            return
        try:
            page = input_items(response_id, response, scope.get("query_string", b""))
        except PromptError as exc:
            await respond(send, 400, OPENAI.error(400, str(exc)), call.headers)
            return
        await respond(send, 200, page, call.headers)

    # --- stats, debugging and control ---------------------------------------------

    def stats(self) -> dict[str, Any]:
        """What ``GET /stats`` serves."""
        accounts = {name: account.snapshot() for name, account in self.accounts.items()}
        totals: dict[str, Any] = {
            key: sum(a[key] for a in accounts.values())
            for key in (*COUNTERS, "active", "cache_entries", "stored_responses")
        }
        moments = [a["last_disconnect_at"] for a in accounts.values() if a["last_disconnect_at"]]
        totals["last_disconnect_at"] = max(moments, default=None)
        totals["unauthorized"] = self.unauthorized
        return {"accounts": accounts, "totals": totals}

    async def _stats(self, scope: Scope, receive: Receive, send: Send) -> None:
        await respond_json(send, 200, self.stats())

    async def _reset_stats(self, scope: Scope, receive: Receive, send: Send) -> None:
        for account in self.accounts.values():
            account.stats = Stats()
        self.unauthorized = 0
        await respond_json(send, 200, self.stats())

    async def _debug_requests(self, scope: Scope, receive: Receive, send: Send) -> None:
        entries = []
        for at, method, path, account, headers in self.requests:
            pairs = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in headers]
            merged: dict[str, str] = {}
            for key, value in pairs:
                merged[key] = f"{merged[key]}, {value}" if key in merged else value
            entries.append(
                {
                    "time": at,
                    "method": method,
                    "path": path,
                    "account": account,
                    "headers": merged,
                    "raw_headers": pairs,
                }
            )
        await respond_json(send, 200, {"requests": entries})

    async def _control(
        self, receive: Receive, send: Send, apply: Callable[[Account, dict[str, Any]], Any]
    ) -> None:
        try:
            raw = await read_body(receive, MAX_BODY_BYTES)
            body = orjson.loads(raw or b"")
        except (BodyTooLarge, orjson.JSONDecodeError):
            await respond_json(send, 400, {"error": "a JSON object is required"})
            return
        if not isinstance(body, dict):
            await respond_json(send, 400, {"error": "a JSON object is required"})
            return
        name = body.pop("account", None)
        account = self.accounts.get(name) if isinstance(name, str) else None
        if account is None:
            await respond_json(
                send, 404, {"error": "unknown account", "accounts": list(self.accounts)}
            )
            return
        try:
            result = apply(account, body)
        except ValidationError as exc:
            await respond_json(send, 400, {"error": str(exc)})
            return
        await respond_json(send, 200, {"account": account.name, **asdict(result)})

    async def _set_faults(self, scope: Scope, receive: Receive, send: Send) -> None:
        def apply(account: Account, body: dict[str, Any]) -> FaultSpec:
            account.faults = _FAULTS.validate_python(body)
            return account.faults

        await self._control(receive, send, apply)

    async def _set_limits(self, scope: Scope, receive: Receive, send: Send) -> None:
        def apply(account: Account, body: dict[str, Any]) -> LimitSpec:
            account.limits = _LIMITS.validate_python(body)
            return account.limits

        await self._control(receive, send, apply)


def _embedding_inputs(value: Any) -> Sequence[bytes]:
    """The texts to embed; token-id arrays are embedded by their JSON form."""
    if isinstance(value, str):
        return [value.encode()]
    if isinstance(value, list) and value:
        if all(isinstance(v, int) for v in value):
            return [orjson.dumps(value)]
        if all(isinstance(v, str | list) for v in value):
            return [v.encode() if isinstance(v, str) else orjson.dumps(v) for v in value]
    raise PromptError("input: a string, an array of strings or an array of token arrays")
