"""Cache statistics from the usage log: cached vs uncached tokens, hit ratio, savings."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from gateway.usagelog import UsageRecord


@dataclass(slots=True)
class _Sums:
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    savings: float = 0.0
    platform_cache_hits: int = 0  # answered by the platform response cache
    platform_prompt_tokens: int = 0  # their prompts: no provider cache was asked

    def add(self, r: UsageRecord) -> None:
        self.requests += 1
        self.prompt_tokens += r.prompt_tokens
        self.cached_tokens += r.cached_tokens
        self.cache_write_tokens += r.cache_write_tokens
        self.completion_tokens += r.completion_tokens
        self.cost += r.cost
        self.savings += r.cache_discount
        if r.decision == "platform_cache":
            self.platform_cache_hits += 1
            self.platform_prompt_tokens += r.prompt_tokens

    def view(self) -> dict[str, Any]:
        provider_prompt = self.prompt_tokens - self.platform_prompt_tokens
        return {
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "uncached_tokens": self.prompt_tokens - self.cached_tokens,
            "cache_write_tokens": self.cache_write_tokens,
            "completion_tokens": self.completion_tokens,
            "hit_ratio": round(self.cached_tokens / provider_prompt, 4) if provider_prompt else 0.0,
            "platform_cache_hits": self.platform_cache_hits,
            "cost_usd": round(self.cost, 6),
            "cost_without_cache_usd": round(self.cost + self.savings, 6),
            "savings_usd": round(self.savings, 6),
        }


def cache_stats(records: Iterable[UsageRecord]) -> dict[str, Any]:
    total = _Sums()
    by_model: dict[str, _Sums] = {}
    by_group: dict[str, _Sums] = {}
    for r in records:
        if r.status >= 400:
            continue
        total.add(r)
        by_model.setdefault(r.model, _Sums()).add(r)
        by_group.setdefault(r.group, _Sums()).add(r)
    return {
        "totals": total.view(),
        "by_model": {k: v.view() for k, v in sorted(by_model.items())},
        "by_group": {k: v.view() for k, v in sorted(by_group.items())},
    }
