"""What a normalised usage costs, and what prompt caching saved.

Prices are USD per million tokens. Cost depends on the usage record only, so a
streamed and a non-streamed call with the same usage cost the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, NamedTuple

from gateway.usage import Usage

_PER_TOKENS: Final = 1_000_000


@dataclass(frozen=True, slots=True)
class Price:
    input: float = 0.0
    cached_input: float | None = None  # None: cache reads cost as much as input
    cache_write_5m: float | None = None  # None: the input price
    cache_write_1h: float | None = None  # None: twice the input price
    output: float = 0.0  # reasoning tokens are output tokens
    per_call: float | None = None  # USD per request; replaces every token price


class Cost(NamedTuple):
    cost: float  # USD, multiplier applied
    cache_discount: float  # full_price - cost; negative when writes cost more than reads saved
    full_price: float  # the same tokens with no caching: every prompt token at the input price


def cost(usage: Usage, price: Price, multiplier: float = 1.0) -> Cost:
    if price.per_call is not None:
        charged = price.per_call * multiplier
        return Cost(charged, 0.0, charged)
    inp = price.input
    cached = inp if price.cached_input is None else price.cached_input
    write_5m = inp if price.cache_write_5m is None else price.cache_write_5m
    write_1h = 2 * inp if price.cache_write_1h is None else price.cache_write_1h
    output = usage.completion_tokens * price.output
    charged = (
        (
            usage.non_cached_prompt_tokens * inp
            + usage.cached_tokens * cached
            + usage.cache_write_5m_tokens * write_5m
            + usage.cache_write_1h_tokens * write_1h
            + output
        )
        * multiplier
        / _PER_TOKENS
    )
    full = (usage.prompt_tokens * inp + output) * multiplier / _PER_TOKENS
    return Cost(charged, full - charged, full)
