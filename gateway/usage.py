"""Provider usage reports normalised into one record, from bodies and from streams.

Providers disagree on what "input tokens" means. OpenAI, DeepSeek and Gemini count
cache reads inside the prompt total; Anthropic's `input_tokens` excludes both cache
reads and cache writes. `Usage.prompt_tokens` is always the whole prompt, so
`cached + cache_write + non_cached == prompt` holds for every provider, and
`completion_tokens` is every billed output token, reasoning included.

Streams are watched event by event: this runs on every chunk of every stream, so an
event's JSON is parsed only when a byte check says it carries a `usage` object, and
then once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson

from gateway.sse import SSEEvent

Provider = Literal["openai", "anthropic", "deepseek", "gemini-openai"]
Endpoint = Literal["chat", "messages", "responses"]
JSONScalar = str | int | float | bool | None

# Typical English text in UTF-8; only used when a stream was cut before its usage.
_BYTES_PER_TOKEN: Final = 4
_EMPTY: Final[Mapping[str, Any]] = {}
_USAGE_KEY: Final = b'"usage"'
_SKIPPED_AFTER_KEY: Final = b" \t\r\n:"


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0  # all input tokens, cached or not
    cached_tokens: int = 0  # cache reads
    cache_write_tokens: int = 0  # = cache_write_5m_tokens + cache_write_1h_tokens
    cache_write_5m_tokens: int = 0
    cache_write_1h_tokens: int = 0
    completion_tokens: int = 0  # reasoning included
    reasoning_tokens: int = 0
    estimated: bool = False  # the stream was cut before its usage: tokens are estimates

    @property
    def non_cached_prompt_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens - self.cache_write_tokens


def usage_from_body(
    provider: Provider, endpoint: Endpoint, body: Mapping[str, Any]
) -> Usage | None:
    """The usage of a non-streamed response, or None when it reports none."""
    usage = body.get("usage")
    if not isinstance(usage, dict) and provider == "gemini-openai":
        usage = body.get("usageMetadata", body.get("usage_metadata"))
    if not isinstance(usage, dict):
        return None
    return _normaliser(provider, endpoint)(usage)


def estimate_usage(prompt_tokens_estimate: int, streamed_text_bytes: int) -> Usage:
    """A usage for a stream cut before the provider reported one; never zero tokens."""
    return Usage(
        prompt_tokens=max(prompt_tokens_estimate, 1),
        completion_tokens=max(-(-streamed_text_bytes // _BYTES_PER_TOKEN), 1),
        estimated=True,
    )


class StreamUsage:
    """Accumulates the usage a provider reports in a stream of SSE events.

    - chat: the chunk with a `usage` object (with `stream_options.include_usage`, a
      final chunk with `choices: []`); the last one wins.
    - messages: `message_start.message.usage`, then `message_delta.usage`, whose
      counts are cumulative: later values replace earlier ones, never add to them.
    - responses: `response.usage` of `response.completed` (or `.incomplete`/`.failed`).
    """

    __slots__ = ("_endpoint", "_final", "_last", "_last_usage_only", "_normalise", "_raw")

    def __init__(self, provider: Provider, endpoint: Endpoint) -> None:
        self._endpoint = endpoint
        self._normalise = _normaliser(provider, endpoint)
        self._raw: dict[str, Any] | None = None  # the provider's usage fields so far
        self._final = False  # the report that closes the stream has arrived
        self._last: SSEEvent | None = None
        self._last_usage_only = False

    def feed(self, event: SSEEvent) -> None:
        self._last = event
        self._last_usage_only = False
        obj = _parse_if_usage(event.data)
        if obj is None:
            return
        if self._endpoint == "chat":
            usage = obj.get("usage")
            if isinstance(usage, dict):
                self._raw = usage
                self._final = True
                self._last_usage_only = not obj.get("choices")
        elif self._endpoint == "messages":
            self._feed_messages(obj)
        else:
            usage = _dict(_dict(obj, "response"), "usage")
            if usage:
                self._raw = dict(usage)
                self._final = True

    def result(self) -> Usage | None:
        """The provider's final usage, or None if the stream ended before it."""
        if not self._final or self._raw is None:
            return None
        return self._normalise(self._raw)

    def estimate(self, prompt_tokens_estimate: int, streamed_text_bytes: int) -> Usage:
        """A usage for a stream cut before its final report.

        What the provider already reported is kept (Anthropic sends the exact prompt
        side, cache reads and writes included, in `message_start`); the rest is
        estimated as in `estimate_usage`.
        """
        usage = estimate_usage(prompt_tokens_estimate, streamed_text_bytes)
        if self._raw is not None:
            known = self._normalise(self._raw)
            if known.prompt_tokens:
                known.completion_tokens = max(known.completion_tokens, usage.completion_tokens)
                known.estimated = True
                return known
        return usage

    def is_usage_only_chunk(self, event: SSEEvent) -> bool:
        """Whether `event` is a chat chunk that carries usage and no choices.

        A gateway that asked for usage on the client's behalf drops it, byte-exactly,
        from the client's stream. Answered without a second parse for the event most
        recently passed to `feed`.
        """
        if self._endpoint != "chat":
            return False
        if event is self._last:
            return self._last_usage_only
        obj = _parse_if_usage(event.data)
        return obj is not None and _is_usage_only(obj)

    def _feed_messages(self, obj: dict[str, Any]) -> None:
        kind = obj.get("type")
        if kind == "message_start":
            usage = _dict(_dict(obj, "message"), "usage")
            if usage:
                self._raw = dict(usage)
        elif kind == "message_delta":
            usage = _dict(obj, "usage")
            if usage:
                raw = self._raw if self._raw is not None else {}
                raw.update((k, v) for k, v in usage.items() if v is not None)
                self._raw = raw
                self._final = True


def add_usage_fields(body: bytes | dict[str, Any], fields: Mapping[str, JSONScalar]) -> bytes:
    """A JSON response body with `fields` added inside its `usage` object.

    Pass the already parsed body (it is updated in place) to avoid parsing it twice.
    A body that is not JSON or has no usage object comes back unchanged.
    """
    if isinstance(body, dict):
        obj: Any = body
    else:
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            return body
    usage = _usage_holder(obj)
    if usage is None:
        return body if isinstance(body, bytes) else orjson.dumps(obj)
    usage.update(fields)
    return orjson.dumps(obj)


def add_usage_fields_to_event(event: SSEEvent, fields: Mapping[str, JSONScalar]) -> bytes:
    """The raw bytes of `event` with `fields` added inside its usage object.

    Everything but the JSON of the data line is kept byte for byte (field order,
    other fields, line endings). An event without a usage object comes back unchanged.
    """
    try:
        obj = orjson.loads(event.data)
    except orjson.JSONDecodeError:
        return event.raw
    usage = _usage_holder(obj)
    if usage is None:
        return event.raw
    usage.update(fields)
    data = orjson.dumps(obj)
    if b"\n" not in event.data:
        at = event.raw.rfind(event.data)  # the data line is the one holding the whole JSON
        return event.raw[:at] + data + event.raw[at + len(event.data) :]
    # Data split over several lines: write it back as one line.
    head = b"" if event.event is None else b"event: " + event.event.encode() + b"\n"
    return head + b"data: " + data + b"\n\n"


def _dict(obj: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = obj.get(key)
    return value if isinstance(value, dict) else _EMPTY


def _int(value: object) -> int:
    # Counts are JSON integers; anything else (null, missing, a negative) counts as 0.
    return value if type(value) is int and value > 0 else 0


def _first_int(obj: Mapping[str, Any], *keys: str) -> int:
    for key in keys:
        if key in obj:
            return _int(obj[key])
    return 0


def has_usage_object(data: bytes) -> bool:
    # A byte check before any parse: `"usage"` as a key followed by an object. Inside
    # JSON strings quotes are escaped, so streamed text cannot fake the key, and
    # chunks that carry `"usage":null` (OpenAI with include_usage) are skipped.
    at = data.find(_USAGE_KEY)
    while at >= 0:
        i = at + len(_USAGE_KEY)
        while i < len(data) and data[i] in _SKIPPED_AFTER_KEY:
            i += 1
        if i < len(data) and data[i] == 0x7B:  # "{"
            return True
        at = data.find(_USAGE_KEY, i)
    return False


def _parse_if_usage(data: bytes) -> dict[str, Any] | None:
    if not has_usage_object(data):
        return None
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def _is_usage_only(obj: Mapping[str, Any]) -> bool:
    return isinstance(obj.get("usage"), dict) and not obj.get("choices")


def _usage_holder(obj: Any) -> dict[str, Any] | None:
    """The usage object of a response body or a stream event, where providers put it."""
    if not isinstance(obj, dict):
        return None
    for owner in (obj, obj.get("response"), obj.get("message")):
        if isinstance(owner, dict):
            usage = owner.get("usage")
            if isinstance(usage, dict):
                return usage
    return None


def _inclusive(prompt: int, cached: int, completion: int, reasoning: int) -> Usage:
    # The prompt count already includes cache reads; a larger cached count is bad
    # data and is capped rather than turned into a negative remainder.
    return Usage(
        prompt_tokens=prompt,
        cached_tokens=min(cached, prompt),
        completion_tokens=completion,
        reasoning_tokens=reasoning,
    )


def _openai_chat(usage: Mapping[str, Any]) -> Usage:
    return _inclusive(
        _int(usage.get("prompt_tokens")),
        _int(_dict(usage, "prompt_tokens_details").get("cached_tokens")),
        _int(usage.get("completion_tokens")),
        _int(_dict(usage, "completion_tokens_details").get("reasoning_tokens")),
    )


def _openai_responses(usage: Mapping[str, Any]) -> Usage:
    return _inclusive(
        _int(usage.get("input_tokens")),
        _int(_dict(usage, "input_tokens_details").get("cached_tokens")),
        _int(usage.get("output_tokens")),
        _int(_dict(usage, "output_tokens_details").get("reasoning_tokens")),
    )


def _deepseek_chat(usage: Mapping[str, Any]) -> Usage:
    if "prompt_cache_hit_tokens" not in usage and "prompt_cache_miss_tokens" not in usage:
        return _openai_chat(usage)
    hit = _int(usage.get("prompt_cache_hit_tokens"))
    miss = _int(usage.get("prompt_cache_miss_tokens"))
    return _inclusive(
        hit + miss,
        hit,
        _int(usage.get("completion_tokens")),
        _int(_dict(usage, "completion_tokens_details").get("reasoning_tokens")),
    )


def _gemini_chat(usage: Mapping[str, Any]) -> Usage:
    prompt = _first_int(usage, "prompt_tokens", "promptTokenCount", "prompt_token_count")
    cached = _int(_dict(usage, "prompt_tokens_details").get("cached_tokens")) or _first_int(
        usage, "cachedContentTokenCount", "cached_content_token_count"
    )
    if "completion_tokens" in usage:
        completion = _int(usage["completion_tokens"])
        reasoning = _int(_dict(usage, "completion_tokens_details").get("reasoning_tokens"))
        # The compatibility layer may leave thinking tokens out of completion_tokens
        # while counting them in total_tokens; they are billed as output.
        hidden = _int(usage.get("total_tokens")) - prompt - completion
        if hidden > 0:
            completion += hidden
            reasoning = max(reasoning, hidden)
    else:  # native usageMetadata: candidates exclude thoughts
        reasoning = _first_int(usage, "thoughtsTokenCount", "thoughts_token_count")
        completion = reasoning + _first_int(usage, "candidatesTokenCount", "candidates_token_count")
    return _inclusive(prompt, cached, completion, reasoning)


def _anthropic_messages(usage: Mapping[str, Any]) -> Usage:
    fresh = _int(usage.get("input_tokens"))
    read = _int(usage.get("cache_read_input_tokens"))
    split = _dict(usage, "cache_creation")
    write_1h = _int(split.get("ephemeral_1h_input_tokens"))
    if usage.get("cache_creation_input_tokens") is None:
        write = _int(split.get("ephemeral_5m_input_tokens")) + write_1h
    else:
        write = _int(usage["cache_creation_input_tokens"])
        write_1h = min(write_1h, write)  # the total is authoritative; without a split, all 5m
    return Usage(
        prompt_tokens=fresh + read + write,
        cached_tokens=read,
        cache_write_tokens=write,
        cache_write_5m_tokens=write - write_1h,
        cache_write_1h_tokens=write_1h,
        completion_tokens=_int(usage.get("output_tokens")),
    )


_Normaliser = Callable[[Mapping[str, Any]], Usage]
_CHAT_NORMALISERS: Final[Mapping[str, _Normaliser]] = {
    "openai": _openai_chat,
    "anthropic": _openai_chat,  # Anthropic's OpenAI-compatible endpoint
    "deepseek": _deepseek_chat,
    "gemini-openai": _gemini_chat,
}


def _normaliser(provider: Provider, endpoint: Endpoint) -> _Normaliser:
    # The wire shape follows the endpoint (DeepSeek also speaks Anthropic's messages);
    # the provider only refines the chat shape.
    if endpoint == "messages":
        return _anthropic_messages
    if endpoint == "responses":
        return _openai_responses
    return _CHAT_NORMALISERS[provider]


def stream_usage_patch(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """`stream_options` that make an OpenAI-style chat stream report its usage, when the
    caller streams without asking for it; None when nothing needs to change."""
    if body.get("stream") is not True:
        return None
    opts = body.get("stream_options")
    if isinstance(opts, dict):
        if opts.get("include_usage") is True:
            return None
        return {**opts, "include_usage": True}
    return {"include_usage": True}
