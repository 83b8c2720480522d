"""The OpenAI chat-completions wire format, as the official SDK parses it."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import orjson

from gateway.emulator.asgi import bearer_token
from gateway.emulator.cache import CachePlan, CachePolicy, PrefixCache
from gateway.emulator.dialect import Generation, Headers, LimitState, Usage, output_limit
from gateway.emulator.prompt import Prompt, openai_prompt
from gateway.emulator.stored import ResponseStore

_FINGERPRINT = "fp_emulator"
_DONE = b"data: [DONE]\n\n"


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _duration(seconds: float) -> bytes:
    """OpenAI's reset format: "250ms", "1.5s"."""
    if seconds < 1.0:
        return b"%dms" % round(seconds * 1000)
    return b"%gs" % round(seconds, 3)


def usage_object(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.prompt_tokens + usage.output_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.read_tokens, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


_ERROR_CODES = {401: "invalid_api_key", 404: "unknown_url", 429: "rate_limit_exceeded"}


def error_body(
    status: int,
    message: str,
    kind: str | None = None,
    *,
    param: str | None = None,
    code: str | None = None,
) -> bytes:
    if status == 429:
        kind = "tokens" if kind == "tokens" else "requests"
    elif status >= 500:
        kind = "server_error"
    else:
        kind = "invalid_request_error"
    error = {
        "message": message,
        "type": kind,
        "param": param,
        "code": code or _ERROR_CODES.get(status),
    }
    return orjson.dumps({"error": error})


class OpenAIDialect:
    name = "openai"
    request_id_header = b"x-request-id"
    counts_cached_input = True

    def api_key(self, headers: Headers) -> str | None:
        return bearer_token(headers)

    def check_headers(self, headers: Headers) -> str | None:
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
        prompt = openai_prompt(body)
        stream = body.get("stream") is True
        options = body.get("stream_options")
        include_usage = (
            stream and isinstance(options, dict) and options.get("include_usage") is True
        )
        limit = output_limit(body, "max_completion_tokens", "max_tokens")
        output = min(limit, max_tokens) if limit is not None else default_tokens
        return Generation(f"chatcmpl-{rid}", body["model"], prompt, stream, include_usage, output)

    def plan(
        self, policy: CachePolicy, cache: PrefixCache, prompt: Prompt, now: float
    ) -> CachePlan:
        return policy.plan_blocks(cache, prompt, now)

    def error(self, status: int, message: str, kind: str | None = None) -> bytes:
        return error_body(status, message, kind)

    def limit_headers(self, state: LimitState) -> Headers:
        headers: Headers = []
        reset = _duration(state.reset_in)
        if state.rpm is not None:
            headers += [
                (b"x-ratelimit-limit-requests", b"%d" % state.rpm),
                (
                    b"x-ratelimit-remaining-requests",
                    b"%d" % max(0, state.rpm - state.requests_used),
                ),
                (b"x-ratelimit-reset-requests", reset),
            ]
        if state.itpm is not None:
            headers += [
                (b"x-ratelimit-limit-tokens", b"%d" % state.itpm),
                (b"x-ratelimit-remaining-tokens", b"%d" % max(0, state.itpm - state.tokens_used)),
                (b"x-ratelimit-reset-tokens", reset),
            ]
        return headers

    def _chunk(self, gen: Generation, delta: dict[str, Any], finish: str | None) -> bytes:
        payload: dict[str, Any] = {
            "id": gen.id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": gen.model,
            "system_fingerprint": _FINGERPRINT,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if gen.include_usage:
            payload["usage"] = None
        return _event(payload)

    def response(self, gen: Generation, usage: Usage, tokens: Sequence[str]) -> bytes:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(tokens),
            "refusal": None,
            "annotations": [],
        }
        return orjson.dumps(
            {
                "id": gen.id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": gen.model,
                "choices": [
                    {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
                ],
                "usage": usage_object(usage),
                "service_tier": "default",
                "system_fingerprint": _FINGERPRINT,
            }
        )

    def stream_head(self, gen: Generation, usage: Usage) -> list[bytes]:
        return [self._chunk(gen, {"role": "assistant", "content": "", "refusal": None}, None)]

    def stream_chunk(self, gen: Generation, text: str) -> bytes:
        return self._chunk(gen, {"content": text}, None)

    def stream_tail(self, gen: Generation, usage: Usage, tokens: Sequence[str]) -> list[bytes]:
        events = [self._chunk(gen, {}, "stop")]
        if gen.include_usage:
            events.append(
                _event(
                    {
                        "id": gen.id,
                        "object": "chat.completion.chunk",
                        "created": int(time.time()),
                        "model": gen.model,
                        "system_fingerprint": _FINGERPRINT,
                        "choices": [],
                        "usage": usage_object(usage),
                    }
                )
            )
        events.append(_DONE)
        return events
