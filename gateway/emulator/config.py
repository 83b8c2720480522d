"""Emulator configuration: accounts, cache geometry, latency model, faults.

Everything is plain dataclasses so tests and benchmarks can build a config in one
expression; ``load_config`` validates a YAML file into the same classes (unknown keys
rejected, errors name the bad path).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError, with_config

_STRICT = ConfigDict(extra="forbid")
_POSITIVE = (
    "time_scale",
    "cache_ttl_seconds",
    "cache_long_ttl_seconds",
    "cache_block_tokens",
    "max_cache_entries_per_account",
    "lookback_blocks",
    "max_output_tokens",
    "stream_chunk_tokens",
    "window_seconds",
    "request_log_size",
    "response_ttl_seconds",
    "max_stored_responses_per_account",
)


@with_config(_STRICT)
@dataclass
class FaultSpec:
    """Faults injected into one account's responses.

    error_rate: probability (seeded RNG) that a request is answered with ``status``
        instead of being served.
    status: the HTTP status of an injected error (429 and 529 carry ``retry_after``).
    retry_after: seconds sent as ``retry-after`` with injected 429/529 errors.
    stall_seconds: delay before the first byte of every response of the account.
    cut_after_chunks: for streams, drop the connection after this many content chunks,
        without the terminating events. Non-streamed responses are not cut.
    body: sent verbatim as the injected error's body instead of the provider-format
        error (e.g. an HTML page from a broken proxy).
    """

    error_rate: float = 0.0
    status: int = 500
    retry_after: float | None = None
    stall_seconds: float = 0.0
    cut_after_chunks: int | None = None
    body: str | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError(f"faults.error_rate must be within [0, 1], got {self.error_rate}")
        if not 400 <= self.status <= 599:
            raise ValueError(f"faults.status must be an HTTP error status, got {self.status}")
        if self.stall_seconds < 0:
            raise ValueError("faults.stall_seconds must be >= 0")
        if self.cut_after_chunks is not None and self.cut_after_chunks < 0:
            raise ValueError("faults.cut_after_chunks must be >= 0")


@with_config(_STRICT)
@dataclass
class LimitSpec:
    """One account's rate limits over the sliding window; None means unlimited.

    rpm: requests per window.
    itpm: input tokens per window.
    itpm_counts_cached: whether cache reads count towards itpm. None follows the
        provider: OpenAI counts every prompt token, Anthropic only uncached input.
    concurrency: requests in flight at once.
    """

    rpm: int | None = None
    itpm: int | None = None
    itpm_counts_cached: bool | None = None
    concurrency: int | None = None

    def __post_init__(self) -> None:
        for name in ("rpm", "itpm", "concurrency"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or null, got {value}")


@with_config(_STRICT)
@dataclass
class AccountSpec:
    """One emulated provider account (one API key, its own cache, limits and faults).

    The same key authenticates both the OpenAI and the Anthropic endpoints.
    """

    name: str
    key: str
    rpm: int | None = None
    itpm: int | None = None
    itpm_counts_cached: bool | None = None
    concurrency: int | None = None
    faults: FaultSpec = field(default_factory=FaultSpec)

    def __post_init__(self) -> None:
        self.limits()  # validates the limit fields

    def limits(self) -> LimitSpec:
        return LimitSpec(self.rpm, self.itpm, self.itpm_counts_cached, self.concurrency)


@with_config(_STRICT)
@dataclass
class LatencySpec:
    """Latency model, in milliseconds of emulated time (divided by time_scale).

    Time to first byte = base_ms + prefill_ms_per_1k_uncached * uncached_tokens / 1000,
    then decode_ms_per_token for every output token.
    """

    base_ms: float = 20.0
    prefill_ms_per_1k_uncached: float = 4.0
    decode_ms_per_token: float = 1.0

    def __post_init__(self) -> None:
        if min(self.base_ms, self.prefill_ms_per_1k_uncached, self.decode_ms_per_token) < 0:
            raise ValueError("latency values must be >= 0")


@with_config(_STRICT)
@dataclass
class EmulatorConfig:
    """The whole emulator.

    seed: drives output text, embeddings and fault rolls.
    time_scale: every duration (latency, stall, TTL, rate window) is divided by it.
    cache_ttl_seconds: sliding TTL of cache entries (OpenAI, and Anthropic "5m").
    cache_long_ttl_seconds: TTL of Anthropic ``cache_control.ttl: "1h"`` entries.
    min_cache_tokens: prompts (OpenAI) or prefixes (Anthropic) shorter than this are
        neither read from nor written to the cache.
    cache_block_tokens: OpenAI cache granularity (128 tokens = 512 bytes).
    max_cache_entries_per_account: LRU bound of each account's cache.
    lookback_blocks: Anthropic checks for hits up to this many content blocks before
        each breakpoint, like the real API.
    default_output_tokens / max_output_tokens: output length when the request does not
        set one, and the cap on what it may ask for.
    stream_chunk_tokens: output tokens per streamed content chunk.
    window_seconds: length of the sliding rate-limit window.
    request_log_size: how many requests ``GET /debug/requests`` remembers.
    response_ttl_seconds: how long an account keeps a stored Responses API response
        (``previous_response_id``, ``GET /v1/responses/{id}``), from its creation.
    max_stored_responses_per_account: LRU bound of each account's stored responses.
    """

    accounts: list[AccountSpec]
    seed: int = 0
    time_scale: float = 1.0
    cache_ttl_seconds: float = 300.0
    cache_long_ttl_seconds: float = 3600.0
    min_cache_tokens: int = 1024
    cache_block_tokens: int = 128
    max_cache_entries_per_account: int = 200_000
    lookback_blocks: int = 20
    latency: LatencySpec = field(default_factory=LatencySpec)
    default_output_tokens: int = 32
    max_output_tokens: int = 4096
    stream_chunk_tokens: int = 1
    window_seconds: float = 60.0
    request_log_size: int = 200
    response_ttl_seconds: float = 30 * 86400.0
    max_stored_responses_per_account: int = 10_000

    def __post_init__(self) -> None:
        if not self.accounts:
            raise ValueError("at least one account is required")
        for label, values in (
            ("name", [a.name for a in self.accounts]),
            ("key", [a.key for a in self.accounts]),
        ):
            if len(set(values)) != len(values):
                raise ValueError(f"account {label}s must be unique")
        for name in _POSITIVE:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.min_cache_tokens < 0 or self.default_output_tokens < 1:
            raise ValueError("min_cache_tokens must be >= 0 and default_output_tokens >= 1")

    def scaled(self, seconds: float) -> float:
        """Emulated seconds -> real seconds."""
        return seconds / self.time_scale


def default_config(accounts: int = 4, **kw: Any) -> EmulatorConfig:
    """``accounts`` plain accounts named acct-0.. with keys sk-emu-0..; kw are
    EmulatorConfig fields."""
    specs = [AccountSpec(name=f"acct-{i}", key=f"sk-emu-{i}") for i in range(accounts)]
    return EmulatorConfig(accounts=specs, **kw)


_ADAPTER = TypeAdapter(EmulatorConfig)


def load_config(path: str | Path) -> EmulatorConfig:
    """Read and validate a YAML config. ``accounts`` may also be a count (default accounts)."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    if isinstance(data.get("accounts"), int):
        data["accounts"] = [
            {"name": f"acct-{i}", "key": f"sk-emu-{i}"} for i in range(data["accounts"])
        ]
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as exc:
        raise ValueError(f"{path}: invalid emulator config\n{exc}") from exc
