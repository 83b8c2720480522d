"""Per-account prompt caches with the two providers' exact-prefix semantics.

An entry is the chained hash of a prompt prefix, so holding an entry means holding
exactly that prefix (the chain seed separates providers and models).

* OpenAI: the prompt is cut into fixed blocks of ``block_tokens``; a prompt of at
  least ``min_tokens`` reads the longest run of leading blocks the account holds
  (counted only from ``min_tokens`` on) and writes all its whole blocks.
* Anthropic: entries exist only at ``cache_control`` breakpoints. A request reads the
  longest held prefix ending at a block boundary within ``lookback`` blocks of one of
  its breakpoints, and writes every breakpoint prefix of at least ``min_tokens``;
  ``cache_creation`` is the span from what was read to the last breakpoint, split by
  the TTL of the breakpoint that closes each piece.

Lookups and writes are separate steps: ``plan`` only looks, ``CachePlan.commit``
writes, so a request turned away by a rate limit leaves the cache untouched, and a
prefix becomes readable only once its request has finished prefill.
All times are real seconds on the caller's monotonic clock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import xxhash

from gateway.emulator.prompt import Prompt, estimate_tokens

_hash = xxhash.xxh3_64_intdigest


class PrefixCache:
    """One account's entries: prefix hash -> (expiry, ttl), least recently used first."""

    __slots__ = ("_entries", "max_entries")

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[int, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def holds(self, key: int, now: float) -> bool:
        entry = self._entries.get(key)
        if entry is None:
            return False
        if entry[0] <= now:
            del self._entries[key]
            return False
        return True

    def touch(self, key: int, now: float, ttl: float) -> None:
        """Write or refresh an entry (sliding TTL); a live entry keeps its longer TTL."""
        entries = self._entries
        old = entries.get(key)
        if old is not None:
            if old[0] > now and old[1] > ttl:
                ttl = old[1]
            entries.move_to_end(key)
        entries[key] = (now + ttl, ttl)
        if len(entries) > self.max_entries:
            entries.popitem(last=False)


@dataclass(slots=True, frozen=True)
class CachePlan:
    """What a request reads and writes.

    read_tokens: served from the cache (OpenAI ``cached_tokens``, Anthropic
        ``cache_read_input_tokens``).
    write_tokens: newly written (Anthropic ``cache_creation_input_tokens``; for OpenAI,
        which does not bill writes, the tokens of blocks not read).
    write_long_tokens: the part of write_tokens written with the long (1h) TTL.
    touches: (entry keys, ttl) to write or refresh on commit.
    """

    read_tokens: int = 0
    write_tokens: int = 0
    write_long_tokens: int = 0
    touches: tuple[tuple[Sequence[int], float], ...] = ()

    def commit(self, cache: PrefixCache, now: float) -> None:
        for keys, ttl in self.touches:
            for key in keys:
                cache.touch(key, now, ttl)


NO_CACHE = CachePlan()


class CachePolicy:
    """The cache geometry of one emulator; ttls are already in real seconds."""

    __slots__ = ("block_bytes", "block_tokens", "long_ttl", "lookback", "min_tokens", "ttl")

    def __init__(
        self, *, min_tokens: int, block_tokens: int, ttl: float, long_ttl: float, lookback: int
    ) -> None:
        self.min_tokens = min_tokens
        self.block_tokens = block_tokens
        self.block_bytes = block_tokens * 4  # the inverse of estimate_tokens
        self.ttl = ttl
        self.long_ttl = long_ttl
        self.lookback = lookback

    def plan_blocks(self, cache: PrefixCache, prompt: Prompt, now: float) -> CachePlan:
        """OpenAI: fixed blocks, automatic, longest held leading run."""
        if prompt.tokens < self.min_tokens:
            return NO_CACHE
        step = self.block_bytes
        view = memoryview(prompt.data)
        key = prompt.seed
        keys: list[int] = []
        for start in range(0, len(view) - step + 1, step):
            key = _hash(view[start : start + step], key)
            keys.append(key)
        hits = 0
        for key in keys:
            if not cache.holds(key, now):
                break
            hits += 1
        read = hits * self.block_tokens
        if read < self.min_tokens:
            read = 0
        written = (len(keys) - hits) * self.block_tokens
        return CachePlan(read, written, 0, ((keys, self.ttl),))

    def plan_breakpoints(self, cache: PrefixCache, prompt: Prompt, now: float) -> CachePlan:
        """Anthropic: explicit breakpoints, lookback over earlier block boundaries."""
        breakpoints = prompt.breakpoints
        if not breakpoints:
            return NO_CACHE
        bounds = prompt.boundaries
        view = memoryview(prompt.data)
        key = prompt.seed
        keys: list[int] = []
        start = 0
        for end in bounds[: breakpoints[-1][0] + 1]:
            key = _hash(view[start:end], key)
            keys.append(key)
            start = end

        minimum = self.min_tokens
        read_at = -1
        for index, _ in breakpoints:
            for j in range(index, max(read_at, index - self.lookback), -1):
                if estimate_tokens(bounds[j]) < minimum:
                    break  # earlier boundaries are shorter still
                if cache.holds(keys[j], now):
                    read_at = j
                    break
        read = estimate_tokens(bounds[read_at]) if read_at >= 0 else 0

        touches: list[tuple[Sequence[int], float]] = []
        if read_at >= 0:
            touches.append(((keys[read_at],), self.ttl))
        written = written_long = 0
        covered = read
        for index, long in breakpoints:
            tokens = estimate_tokens(bounds[index])
            if tokens < minimum:
                continue
            touches.append(((keys[index],), self.long_ttl if long else self.ttl))
            if tokens > covered:
                written += tokens - covered
                if long:
                    written_long += tokens - covered
                covered = tokens
        return CachePlan(read, written, written_long, tuple(touches))
