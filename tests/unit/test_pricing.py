from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.pricing import Cost, Price, cost
from gateway.sse import SSEParser
from gateway.usage import StreamUsage, Usage, usage_from_body

FIXTURES = Path(__file__).parent.parent / "fixtures" / "usage"

SONNET = Price(input=3.0, cached_input=0.3, cache_write_5m=3.75, cache_write_1h=6.0, output=15.0)


def assert_cost(got: Cost, expected: Cost) -> None:
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_anthropic_reads_and_writes() -> None:
    usage = Usage(
        prompt_tokens=10_000,
        cached_tokens=6_000,
        cache_write_tokens=3_000,
        cache_write_5m_tokens=2_000,
        cache_write_1h_tokens=1_000,
        completion_tokens=500,
    )
    # 1000 fresh * 3 + 6000 * 0.3 + 2000 * 3.75 + 1000 * 6 + 500 * 15 = 25,800 µ$
    # without caching: 10,000 * 3 + 500 * 15 = 37,500 µ$
    assert_cost(cost(usage, SONNET), Cost(0.0258, 0.0117, 0.0375))


def test_openai_cached_input() -> None:
    usage = Usage(prompt_tokens=2006, cached_tokens=1920, completion_tokens=300)
    price = Price(input=2.5, cached_input=1.25, output=10.0)
    # 86 * 2.5 + 1920 * 1.25 + 300 * 10 = 5,615 µ$; uncached 2006 * 2.5 + 3000 = 8,015 µ$
    assert_cost(cost(usage, price), Cost(0.005615, 0.0024, 0.008015))


def test_no_cache_tokens_means_no_discount() -> None:
    result = cost(Usage(prompt_tokens=1234, completion_tokens=56), SONNET, multiplier=1.3)
    assert result.cache_discount == 0.0
    assert result.cost == result.full_price == pytest.approx((1234 * 3 + 56 * 15) * 1.3 / 1e6)


def test_unset_prices_default_from_input() -> None:
    price = Price(input=2.0, output=8.0)
    reads = Usage(prompt_tokens=1000, cached_tokens=1000)
    assert_cost(cost(reads, price), Cost(0.002, 0.0, 0.002))
    writes_5m = Usage(prompt_tokens=1000, cache_write_tokens=1000, cache_write_5m_tokens=1000)
    assert_cost(cost(writes_5m, price), Cost(0.002, 0.0, 0.002))
    writes_1h = Usage(prompt_tokens=1000, cache_write_tokens=1000, cache_write_1h_tokens=1000)
    # 1h writes default to twice the input price: caching cost more than it saved
    assert_cost(cost(writes_1h, price), Cost(0.004, -0.002, 0.002))


def test_multiplier_scales_everything() -> None:
    usage = Usage(prompt_tokens=1000, cached_tokens=800, completion_tokens=100)
    base, scaled = cost(usage, SONNET), cost(usage, SONNET, multiplier=0.5)
    assert_cost(scaled, Cost(base.cost / 2, base.cache_discount / 2, base.full_price / 2))


def test_per_call_price_ignores_tokens() -> None:
    usage = Usage(prompt_tokens=10**6, cached_tokens=10**6, completion_tokens=10**6)
    assert cost(usage, Price(input=100.0, per_call=0.04), multiplier=2.0) == Cost(0.08, 0.0, 0.08)


def test_streamed_and_unstreamed_calls_cost_the_same() -> None:
    def fixture(name: str) -> Any:
        return orjson.loads((FIXTURES / name).read_bytes())

    unstreamed = usage_from_body("openai", "responses", fixture("openai_responses.json")["body"])

    stream = StreamUsage("openai", "responses")
    parser = SSEParser()
    for event in fixture("openai_responses_stream.json")["events"]:
        wire = b"data: " + orjson.dumps(event["data"]) + b"\n\n"
        for parsed in parser.feed(wire):
            stream.feed(parsed)
    streamed = stream.result()

    assert unstreamed is not None and streamed is not None
    price = Price(input=2.0, cached_input=0.5, output=8.0)
    assert cost(streamed, price, 1.5) == cost(unstreamed, price, 1.5)
    assert cost(streamed, price, 1.5).cache_discount > 0


_tokens = st.integers(0, 10**7)
_price = st.floats(0, 100, allow_nan=False)


@st.composite
def usages(draw: st.DrawFn) -> Usage:
    cached, write_5m, write_1h, fresh = draw(_tokens), draw(_tokens), draw(_tokens), draw(_tokens)
    return Usage(
        prompt_tokens=cached + write_5m + write_1h + fresh,
        cached_tokens=cached,
        cache_write_tokens=write_5m + write_1h,
        cache_write_5m_tokens=write_5m,
        cache_write_1h_tokens=write_1h,
        completion_tokens=draw(_tokens),
    )


@given(usages(), _price, _price, _price, st.floats(0, 10, allow_nan=False))
def test_cost_properties(usage: Usage, inp: float, cached: float, out: float, mult: float) -> None:
    price = Price(input=inp, cached_input=min(cached, inp), cache_write_5m=inp, output=out)
    result = cost(usage, price, mult)
    assert result.cost >= 0
    assert result.full_price >= 0
    assert math.isclose(result.cache_discount, result.full_price - result.cost, abs_tol=1e-9)
    # with reads no dearer than input and 5m writes at the input price, caching only
    # loses money through 1h writes, and never more than their extra input price
    assert result.cache_discount >= -usage.cache_write_1h_tokens * inp * mult / 1e6 - 1e-9
