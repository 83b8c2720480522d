"""What differs between the OpenAI and Anthropic endpoints, behind one protocol.

The app runs one request flow (auth, faults, cache, limits, latency, streaming); a
dialect supplies the provider's auth header, request parsing, cache semantics and the
exact bytes of its responses, errors and stream events.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.emulator.cache import CachePlan, CachePolicy, PrefixCache
from gateway.emulator.prompt import Prompt, PromptError
from gateway.emulator.stored import ResponseStore

Headers = list[tuple[bytes, bytes]]


@dataclass(slots=True)
class Generation:
    """A parsed generation request."""

    id: str
    model: str
    prompt: Prompt
    stream: bool
    include_usage: bool  # OpenAI stream_options.include_usage; Anthropic always reports
    output_tokens: int


@dataclass(slots=True)
class Usage:
    prompt_tokens: int  # all input tokens, cached or not
    read_tokens: int
    write_tokens: int
    write_long_tokens: int
    output_tokens: int


@dataclass(slots=True)
class LimitState:
    """One account's rate-limit position after this request, for response headers."""

    rpm: int | None
    requests_used: int
    itpm: int | None
    tokens_used: int
    reset_in: float


def output_limit(body: dict[str, Any], *keys: str) -> int | None:
    """The request's output cap, validated."""
    for key in keys:
        value = body.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PromptError(f"{key}: a positive integer is required")
        return value
    return None


class Dialect(Protocol):
    name: str
    request_id_header: bytes
    counts_cached_input: bool  # whether cache reads count towards input TPM by default

    def api_key(self, headers: Headers) -> str | None: ...

    def check_headers(self, headers: Headers) -> str | None:
        """A problem with the request headers, reported as a 400."""
        ...

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
        """Raises PromptError on an invalid body; rid makes the response id.

        stored: the account's stored responses, the server-side conversation state of
        the Responses API (the stateless endpoints ignore it).
        """
        ...

    def plan(
        self, policy: CachePolicy, cache: PrefixCache, prompt: Prompt, now: float
    ) -> CachePlan: ...

    def error(self, status: int, message: str, kind: str | None = None) -> bytes:
        """An error body in the provider's format; kind refines the error type."""
        ...

    def limit_headers(self, state: LimitState) -> Headers: ...

    def response(self, gen: Generation, usage: Usage, tokens: Sequence[str]) -> bytes: ...

    def stream_head(self, gen: Generation, usage: Usage) -> list[bytes]: ...

    def stream_chunk(self, gen: Generation, text: str) -> bytes: ...

    def stream_tail(self, gen: Generation, usage: Usage, tokens: Sequence[str]) -> list[bytes]:
        """The closing events, once every token of the output has been sent."""
        ...
