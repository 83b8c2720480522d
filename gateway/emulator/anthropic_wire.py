"""The Anthropic messages wire format, as the official SDK parses it."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from gateway.emulator.asgi import bearer_token, header
from gateway.emulator.cache import CachePlan, CachePolicy, PrefixCache
from gateway.emulator.dialect import Generation, Headers, LimitState, Usage, output_limit
from gateway.emulator.prompt import Prompt, PromptError, anthropic_prompt
from gateway.emulator.stored import ResponseStore

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def _event(name: bytes, payload: dict[str, Any]) -> bytes:
    return b"event: " + name + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def _reset_at(seconds: float) -> bytes:
    """Anthropic's reset format: an RFC 3339 time."""
    at = datetime.fromtimestamp(time.time() + seconds, UTC).replace(microsecond=0)
    return at.isoformat().replace("+00:00", "Z").encode()


def _usage(usage: Usage, output_tokens: int) -> dict[str, Any]:
    uncached = usage.prompt_tokens - usage.read_tokens - usage.write_tokens
    return {
        "input_tokens": uncached,
        "cache_creation_input_tokens": usage.write_tokens,
        "cache_read_input_tokens": usage.read_tokens,
        "cache_creation": {
            "ephemeral_5m_input_tokens": usage.write_tokens - usage.write_long_tokens,
            "ephemeral_1h_input_tokens": usage.write_long_tokens,
        },
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }


def error_body(status: int, message: str, kind: str | None = None) -> bytes:
    error_type = _ERROR_TYPES.get(status, "api_error")
    return orjson.dumps({"type": "error", "error": {"type": error_type, "message": message}})


class AnthropicDialect:
    name = "anthropic"
    request_id_header = b"request-id"
    counts_cached_input = False

    def api_key(self, headers: Headers) -> str | None:
        # x-api-key is the classic header; current SDKs send the key as a bearer token.
        value = header(headers, b"x-api-key")
        return value.decode("latin-1") if value is not None else bearer_token(headers)

    def check_headers(self, headers: Headers) -> str | None:
        if header(headers, b"anthropic-version") is None:
            return "anthropic-version: header is required"
        return None

    def parse(
        self,
        body: dict[str, Any],
        *,
        rid: str,
        default_tokens: int,
        max_tokens: int,
        stored: ResponseStore,
        now: float,
    ) -> Generation:
        prompt = anthropic_prompt(body)
        limit = output_limit(body, "max_tokens")
        if limit is None:
            raise PromptError("max_tokens: Field required")
        stream = body.get("stream") is True
        return Generation(f"msg_{rid}", body["model"], prompt, stream, True, min(limit, max_tokens))

    def plan(
        self, policy: CachePolicy, cache: PrefixCache, prompt: Prompt, now: float
    ) -> CachePlan:
        return policy.plan_breakpoints(cache, prompt, now)

    def error(self, status: int, message: str, kind: str | None = None) -> bytes:
        return error_body(status, message, kind)

    def limit_headers(self, state: LimitState) -> Headers:
        headers: Headers = []
        reset = _reset_at(state.reset_in)
        if state.rpm is not None:
            remaining = max(0, state.rpm - state.requests_used)
            headers += [
                (b"anthropic-ratelimit-requests-limit", b"%d" % state.rpm),
                (b"anthropic-ratelimit-requests-remaining", b"%d" % remaining),
                (b"anthropic-ratelimit-requests-reset", reset),
            ]
        if state.itpm is not None:
            remaining = max(0, state.itpm - state.tokens_used)
            headers += [
                (b"anthropic-ratelimit-input-tokens-limit", b"%d" % state.itpm),
                (b"anthropic-ratelimit-input-tokens-remaining", b"%d" % remaining),
                (b"anthropic-ratelimit-input-tokens-reset", reset),
            ]
        return headers

    def _message(
        self, gen: Generation, content: list[Any], usage: dict[str, Any]
    ) -> dict[str, Any]:
        done = bool(content)
        return {
            "id": gen.id,
            "type": "message",
            "role": "assistant",
            "model": gen.model,
            "content": content,
            "stop_reason": "end_turn" if done else None,
            "stop_sequence": None,
            "usage": usage,
        }

    def response(self, gen: Generation, usage: Usage, tokens: Sequence[str]) -> bytes:
        content = [{"type": "text", "text": "".join(tokens)}]
        return orjson.dumps(self._message(gen, content, _usage(usage, usage.output_tokens)))

    def stream_head(self, gen: Generation, usage: Usage) -> list[bytes]:
        # Like the real API, message_start reports the input side and a token of output.
        start = self._message(gen, [], _usage(usage, min(1, usage.output_tokens)))
        return [
            _event(b"message_start", {"type": "message_start", "message": start}),
            _event(
                b"content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            ),
            _event(b"ping", {"type": "ping"}),
        ]

    def stream_chunk(self, gen: Generation, text: str) -> bytes:
        delta = {"type": "text_delta", "text": text}
        return _event(
            b"content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}
        )

    def stream_tail(self, gen: Generation, usage: Usage, tokens: Sequence[str]) -> list[bytes]:
        final = _usage(usage, usage.output_tokens)
        cumulative = {
            key: final[key]
            for key in (
                "input_tokens",
                "cache_creation_input_tokens",
                "cache_read_input_tokens",
                "output_tokens",
            )
        }
        return [
            _event(b"content_block_stop", {"type": "content_block_stop", "index": 0}),
            _event(
                b"message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": cumulative,
                },
            ),
            _event(b"message_stop", {"type": "message_stop"}),
        ]
