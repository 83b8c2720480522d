"""Fingerprint a request as a chain of block hashes in the provider's cache order.

Blocks follow the order a provider matches its prompt cache in: the model (h0), tools,
cache-partitioning settings, system, then messages / input items. Each message and each
content block is cut on its own boundary and every ~block_bytes inside, so two requests
that share a byte-identical prefix share exactly the hashes of that prefix. Anything that
does not reach the prompt (sampling, streaming, metadata, cache markers) stays out of the
chain; it only enters ``full``, the identity of the whole request.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson
import xxhash

Kind = Literal["chat", "messages", "responses"]

_SORT = orjson.OPT_SORT_KEYS
_hash = xxhash.xxh3_64_intdigest

# Top-level keys that form the prompt, per request family: the tools, the settings that
# partition a provider's cache (a change invalidates what follows them), the system part,
# and the conversation. Every other key is a request parameter.
_TOOLS = "tools"
_SETTINGS: dict[str, tuple[str, ...]] = {
    "chat": ("response_format", "tool_choice", "parallel_tool_calls"),
    "messages": ("tool_choice", "thinking"),
    "responses": ("text", "tool_choice", "previous_response_id", "conversation"),
}
_SYSTEM: dict[str, str | None] = {"chat": None, "messages": "system", "responses": "instructions"}
_TURNS: dict[str, str] = {"chat": "messages", "messages": "messages", "responses": "input"}
_PROMPT_KEYS: dict[str, frozenset[str]] = {
    kind: frozenset(("model", _TOOLS, _TURNS[kind], *_SETTINGS[kind]))
    | frozenset(key for key in (_SYSTEM[kind],) if key is not None)
    for kind in _SETTINGS
}
# Parameters that change neither the prompt nor the response's content.
_TRANSPORT_KEYS = frozenset(
    (
        "stream",
        "stream_options",
        "metadata",
        "prompt_cache_key",
        "prompt_cache_retention",
        "user",
        "safety_identifier",
        "store",
        "service_tier",
    )
)

_TEXT_PARTS = frozenset(("text", "input_text", "output_text"))
_INLINE_DATA_KEYS = frozenset(("data", "file_data"))
# Inline media are replaced by a content hash; their token cost is not proportional to
# their base64 size, so count a typical image's worth instead.
MEDIA_TOKENS = 1024
_INLINE_MIN_CHARS = 64
_CACHE_TTLS = {"5m": 300.0, "1h": 3600.0, "24h": 86400.0}


@dataclass(frozen=True, slots=True)
class Fingerprint:
    hashes: tuple[int, ...]  # h_0 = H(model), h_i = H(h_{i-1} || block_i), xxh3_64
    tokens: tuple[int, ...]  # cumulative token estimate at the end of each block
    root: int  # the routing key of the prompt's first cacheable prefix
    total_tokens: int
    session: str | None  # explicit session key from the body or the caller's hint
    full: int  # the whole request: every block (uncapped) and its parameters
    # Index of the first block at or past the minimum cacheable length (len(hashes) if none):
    # shorter prefixes can never be a cache hit, so they are never pinned.
    pin_from: int = 0
    cache_ttl: float | None = None  # cache lifetime the request explicitly asks for


class _Chain:
    """The request's canonical JSON, fed segment by segment (one per message or content
    block) in cache order, hashed as it comes: a segment's bytes are dropped right away."""

    __slots__ = ("block_bytes", "h", "hashes", "media_tokens", "nbytes", "room", "tokens", "ttl")

    def __init__(self, h0: int, block_bytes: int, cap: int) -> None:
        self.h = h0
        self.hashes = [h0]
        self.tokens = [0]
        self.room = cap - 1  # blocks still kept; past the cap only the chain goes on
        self.nbytes = 0
        self.media_tokens = 0
        self.ttl = 0.0
        self.block_bytes = block_bytes

    def add(self, data: bytes) -> None:
        """One segment, cut every block_bytes. The per-request hot path: locals only."""
        size = len(data)
        step = self.block_bytes
        h = self.h
        base = self.nbytes
        if size <= step:
            h = _hash(data, h)
            if self.room > 0:
                self.room -= 1
                self.hashes.append(h)
                self.tokens.append(((base + size) >> 2) + self.media_tokens)
        else:
            view = memoryview(data)
            keep = min(self.room, -(-size // step))
            self.room -= keep
            hashes = self.hashes
            tokens = self.tokens
            media = self.media_tokens
            for start in range(0, size, step):
                h = _hash(view[start : start + step], h)
                if keep:
                    keep -= 1
                    hashes.append(h)
                    tokens.append((min(base + start + step, base + size) >> 2) + media)
        self.h = h
        self.nbytes = base + size

    def note_cache_control(self, marker: Any) -> None:
        if isinstance(marker, Mapping) and "ttl" in marker:
            ttl = _CACHE_TTLS.get(marker["ttl"], 0.0)
            if ttl > self.ttl:
                self.ttl = ttl

    def scrub(self, obj: Any) -> Any:
        """A copy without cache markers and with inline media replaced by their hash."""
        if type(obj) is dict or isinstance(obj, Mapping):
            out: dict[str, Any] = {}
            for key, value in obj.items():
                if key == "cache_control":
                    self.note_cache_control(value)
                elif type(value) is str:
                    out[key] = self._inline(key, value)
                elif isinstance(value, Mapping | list):
                    out[key] = self.scrub(value)
                else:
                    out[key] = value
            return out
        if type(obj) is list:
            return [self.scrub(item) for item in obj]
        return obj

    def _inline(self, key: str, value: str) -> str:
        if len(value) < _INLINE_MIN_CHARS or not (
            key in _INLINE_DATA_KEYS or value.startswith("data:")
        ):
            return value
        self.media_tokens += MEDIA_TOKENS
        return f"xxh3:{_hash(value.encode()):016x}"

    def part(self, part: Any) -> None:
        """A content block, a tool, or a system block."""
        if type(part) is dict or isinstance(part, Mapping):
            if part.get("type") in _TEXT_PARTS:
                if "cache_control" in part:
                    self.note_cache_control(part["cache_control"])
                    part = {k: v for k, v in part.items() if k != "cache_control"}
            else:
                part = self.scrub(part)
        self.add(orjson.dumps(part, option=_SORT))

    def message(self, message: Any) -> None:
        """A message or input item: its envelope, then each content block on its own."""
        if not (type(message) is dict or isinstance(message, Mapping)):
            self.part(message)
            return
        content = message.get("content")
        if type(content) is list:
            self.part({k: v for k, v in message.items() if k != "content"})
            for part in content:
                self.part(part)
        elif type(content) is str and "cache_control" not in message:
            self.add(orjson.dumps(message, option=_SORT))
        else:
            self.add(orjson.dumps(self.scrub(message), option=_SORT))

    def all(self, items: Iterable[Any], *, messages: bool) -> None:
        add = self.message if messages else self.part
        for item in items:
            add(item)


def fingerprint(
    body: Mapping[str, Any],
    *,
    kind: Kind,
    min_tokens: int = 1024,
    block_bytes: int = 1024,
    max_blocks: int = 512,
    session_hint: str | None = None,
) -> Fingerprint:
    chain = _Chain(_hash(orjson.dumps(body.get("model"))), block_bytes, max_blocks)
    tools = body.get(_TOOLS)
    if type(tools) is list:
        chain.all(tools, messages=False)
    settings = {key: body[key] for key in _SETTINGS[kind] if body.get(key) is not None}
    if settings:
        chain.part(settings)
    system_key = _SYSTEM[kind]
    if system_key is not None:
        system = body.get(system_key)
        if type(system) is list:
            chain.all(system, messages=False)
        elif system is not None:
            chain.part(system)
    turns = body.get(_TURNS[kind])
    if type(turns) is list:
        chain.all(turns, messages=True)
    elif turns is not None:
        chain.part(turns)

    hashes = chain.hashes
    tokens = chain.tokens
    # Cumulative estimates never decrease; block 0 (the model) is never cacheable alone.
    pin_from = bisect_left(tokens, min_tokens, 1)
    # Block 0 alone is the model, shared by every conversation: never a root.
    root = hashes[min(max(pin_from, 1), len(hashes) - 1)]
    session = session_hint or _session_of(body)
    if session is not None:
        root = _hash(session.encode(), root)

    prompt_keys = _PROMPT_KEYS[kind]
    params = {k: v for k, v in body.items() if k not in prompt_keys and k not in _TRANSPORT_KEYS}
    full = _hash(orjson.dumps(params, option=_SORT), chain.h) if params else chain.h

    retention = body.get("prompt_cache_retention")
    ttl = max(chain.ttl, _CACHE_TTLS.get(retention, 0.0) if isinstance(retention, str) else 0.0)
    return Fingerprint(
        hashes=tuple(hashes),
        tokens=tuple(tokens),
        root=root,
        total_tokens=(chain.nbytes >> 2) + chain.media_tokens,
        session=session,
        full=full,
        pin_from=pin_from,
        cache_ttl=ttl or None,
    )


def _session_of(body: Mapping[str, Any]) -> str | None:
    key = body.get("prompt_cache_key")
    if isinstance(key, str) and key:
        return key
    metadata = body.get("metadata")
    if isinstance(metadata, Mapping):
        user_id = metadata.get("user_id")
        if isinstance(user_id, str) and user_id:
            return user_id
    return None
