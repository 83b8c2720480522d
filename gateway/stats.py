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

    def add(self, r: UsageRecord) -> None:
        self.requests += 1
        self.prompt_tokens += r.prompt_tokens
        self.cached_tokens += r.cached_tokens
        self.cache_write_tokens += r.cache_write_tokens
        self.completion_tokens += r.completion_tokens
        self.cost += r.cost
        self.savings += r.cache_discount

    def view(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "uncached_tokens": self.prompt_tokens - self.cached_tokens,
            "cache_write_tokens": self.cache_write_tokens,
            "completion_tokens": self.completion_tokens,
            "hit_ratio": round(self.cached_tokens / self.prompt_tokens, 4)
            if self.prompt_tokens
            else 0.0,
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
