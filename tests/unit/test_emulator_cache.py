"""Prompt-cache semantics of the emulator: OpenAI blocks and Anthropic breakpoints."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.emulator.cache import NO_CACHE, CachePlan, CachePolicy, PrefixCache
from gateway.emulator.prompt import (
    Prompt,
    PromptError,
    anthropic_prompt,
    estimate_tokens,
    openai_prompt,
)

TTL = 300.0
LONG_TTL = 3600.0


def policy(min_tokens: int = 1024, block_tokens: int = 128, lookback: int = 20) -> CachePolicy:
    return CachePolicy(
        min_tokens=min_tokens,
        block_tokens=block_tokens,
        ttl=TTL,
        long_ttl=LONG_TTL,
        lookback=lookback,
    )


def run(
    pol: CachePolicy, cache: PrefixCache, prompt: Prompt, now: float, *, anthropic: bool = False
) -> CachePlan:
    """Look up then commit, as a served request does."""
    plan = (pol.plan_breakpoints if anthropic else pol.plan_blocks)(cache, prompt, now)
    plan.commit(cache, now)
    return plan


def text(nbytes: int, salt: str = "") -> str:
    """ASCII text of exactly nbytes bytes, distinct per salt."""
    unit = f"{salt}lorem ipsum dolor sit amet "
    return (unit * (nbytes // len(unit) + 1))[:nbytes]


def chat(system: str, *turns: str, model: str = "gpt-4o") -> Prompt:
    messages = [{"role": "system", "content": system}]
    messages += [{"role": "user", "content": t} for t in turns]
    return openai_prompt({"model": model, "messages": messages})


# --- PrefixCache -------------------------------------------------------------------


def test_entry_expires_after_its_ttl_and_reading_does_not_extend_it() -> None:
    cache = PrefixCache(10)
    cache.touch(1, now=0.0, ttl=10.0)
    assert cache.holds(1, 9.9)
    assert not cache.holds(1, 10.0)
    assert len(cache) == 0  # an expired entry is dropped when found


def test_touch_slides_the_ttl() -> None:
    cache = PrefixCache(10)
    cache.touch(1, now=0.0, ttl=10.0)
    cache.touch(1, now=8.0, ttl=10.0)
    assert cache.holds(1, 17.9)
    assert not cache.holds(1, 18.0)


def test_a_live_entry_keeps_its_longer_ttl_but_an_expired_one_does_not() -> None:
    cache = PrefixCache(10)
    cache.touch(1, now=0.0, ttl=100.0)
    cache.touch(1, now=1.0, ttl=10.0)
    assert cache.holds(1, 100.0)
    cache.touch(2, now=0.0, ttl=100.0)
    cache.touch(2, now=200.0, ttl=10.0)  # the long entry had expired: a fresh short one
    assert not cache.holds(2, 210.0)


def test_lru_bound_evicts_the_least_recently_used() -> None:
    cache = PrefixCache(3)
    for key in (1, 2, 3):
        cache.touch(key, now=0.0, ttl=TTL)
    cache.touch(1, now=1.0, ttl=TTL)  # 2 is now the least recently used
    cache.touch(4, now=2.0, ttl=TTL)
    assert len(cache) == 3
    assert not cache.holds(2, 3.0)
    assert all(cache.holds(key, 3.0) for key in (1, 3, 4))


# --- OpenAI: automatic caching in 128-token blocks -----------------------------------


def test_first_request_misses_and_the_repeat_reads_all_whole_blocks() -> None:
    pol, cache = policy(), PrefixCache(1000)
    prompt = chat(text(8000), "question")
    first = run(pol, cache, prompt, 0.0)
    assert first.read_tokens == 0
    whole_blocks = len(prompt.data) // 512
    assert first.write_tokens == whole_blocks * 128
    second = run(pol, cache, prompt, 1.0)
    assert second.read_tokens == whole_blocks * 128
    assert second.read_tokens < prompt.tokens  # the partial tail block is never cached
    assert second.write_tokens == 0


def test_shared_prefix_is_read_up_to_the_last_whole_common_block() -> None:
    pol, cache = policy(), PrefixCache(1000)
    system = text(6000)
    first = chat(system, "what is the weather like")
    second = chat(system, "tell me a story")
    run(pol, cache, first, 0.0)
    common = 0
    while first.data[common] == second.data[common]:
        common += 1
    plan = run(pol, cache, second, 1.0)
    assert plan.read_tokens == (common // 512) * 128
    assert plan.read_tokens >= 1024


def test_prompts_below_the_minimum_are_neither_read_nor_written() -> None:
    pol, cache = policy(), PrefixCache(1000)
    short = chat(text(3000))  # ~750 tokens
    assert short.tokens < 1024
    assert run(pol, cache, short, 0.0) is NO_CACHE
    assert len(cache) == 0


def test_a_common_prefix_shorter_than_the_minimum_is_not_reported_as_cached() -> None:
    pol, cache = policy(), PrefixCache(1000)
    run(pol, cache, chat(text(3000, "a"), text(3000, "x")), 0.0)
    plan = run(pol, cache, chat(text(3000, "a"), text(3000, "y")), 1.0)
    assert plan.read_tokens == 0  # ~5 blocks in common: less than 1,024 tokens


def test_entries_expire_after_the_ttl_and_reads_refresh_them() -> None:
    pol, cache = policy(), PrefixCache(1000)
    prompt = chat(text(8000))
    run(pol, cache, prompt, 0.0)
    assert run(pol, cache, prompt, 250.0).read_tokens > 0  # refreshed at 250
    assert run(pol, cache, prompt, 540.0).read_tokens > 0  # still alive thanks to 250
    assert run(pol, cache, prompt, 540.0 + TTL).read_tokens == 0


def test_lookup_alone_writes_nothing() -> None:
    pol, cache = policy(), PrefixCache(1000)
    prompt = chat(text(8000))
    pol.plan_blocks(cache, prompt, 0.0)
    assert pol.plan_blocks(cache, prompt, 1.0).read_tokens == 0


def test_accounts_and_models_do_not_share_entries() -> None:
    pol, mine, other = policy(), PrefixCache(1000), PrefixCache(1000)
    prompt = chat(text(8000))
    run(pol, mine, prompt, 0.0)
    assert run(pol, other, prompt, 1.0).read_tokens == 0
    assert run(pol, mine, chat(text(8000), model="gpt-4o-mini"), 1.0).read_tokens == 0


def test_lru_bound_limits_what_an_account_remembers() -> None:
    pol, cache = policy(), PrefixCache(40)
    first, second = chat(text(16000, "a")), chat(text(16000, "b"))  # ~31 blocks each
    run(pol, cache, first, 0.0)
    run(pol, cache, second, 1.0)
    assert len(cache) == 40
    assert run(pol, cache, first, 2.0).read_tokens == 0  # its leading blocks were evicted


@settings(max_examples=200, deadline=None)
@given(
    prefix=st.binary(max_size=400),
    tail_a=st.binary(max_size=200),
    tail_b=st.binary(max_size=200),
)
def test_read_is_the_whole_common_blocks_of_a_cached_prompt(
    prefix: bytes, tail_a: bytes, tail_b: bytes
) -> None:
    pol, cache = policy(min_tokens=16, block_tokens=4), PrefixCache(10_000)  # 16-byte blocks
    a, b = Prompt(prefix + tail_a, seed=7), Prompt(prefix + tail_b, seed=7)
    run(pol, cache, a, 0.0)
    common = 0
    while common < min(len(a.data), len(b.data)) and a.data[common] == b.data[common]:
        common += 1
    expected = (common // 16) * 4
    if expected < 16 or a.tokens < 16 or b.tokens < 16:
        expected = 0
    assert pol.plan_blocks(cache, b, 1.0).read_tokens == expected


# --- Anthropic: explicit breakpoints -----------------------------------------------


def marked(content: str, ttl: str | None = None) -> dict[str, Any]:
    control: dict[str, Any] = {"type": "ephemeral"}
    if ttl:
        control["ttl"] = ttl
    return {"type": "text", "text": content, "cache_control": control}


def messages_body(system: list[dict[str, Any]] | str, *turns: Any, **extra: Any) -> dict[str, Any]:
    messages = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": turn}
        for i, turn in enumerate(turns or ("hello",))
    ]
    return {
        "model": "claude-sonnet-4-6",
        "max_tokens": 16,
        "system": system,
        "messages": messages,
        **extra,
    }


def claude(system: list[dict[str, Any]] | str, *turns: Any, **extra: Any) -> Prompt:
    return anthropic_prompt(messages_body(system, *turns, **extra))


def test_breakpoint_prefix_is_written_then_read() -> None:
    pol, cache = policy(), PrefixCache(1000)
    prompt = claude([marked(text(6000))], "question")
    first = run(pol, cache, prompt, 0.0, anthropic=True)
    prefix = estimate_tokens(prompt.boundaries[0])
    assert (first.read_tokens, first.write_tokens, first.write_long_tokens) == (0, prefix, 0)
    second = run(pol, cache, prompt, 1.0, anthropic=True)
    assert (second.read_tokens, second.write_tokens) == (prefix, 0)
    assert prompt.tokens - second.read_tokens - second.write_tokens > 0  # the uncached rest


def test_without_breakpoints_nothing_is_cached() -> None:
    pol, cache = policy(), PrefixCache(1000)
    prompt = claude(text(6000), "question")
    assert run(pol, cache, prompt, 0.0, anthropic=True) is NO_CACHE
    assert run(pol, cache, prompt, 1.0, anthropic=True) is NO_CACHE


def test_breakpoint_below_the_minimum_is_ignored() -> None:
    pol, cache = policy(), PrefixCache(1000)
    prompt = claude([marked(text(2000))], text(6000))  # marked prefix ~500 tokens
    assert run(pol, cache, prompt, 0.0, anthropic=True).write_tokens == 0
    assert len(cache) == 0


def test_one_hour_and_five_minute_breakpoints_split_the_write_and_expire_apart() -> None:
    pol, cache = policy(), PrefixCache(1000)
    body = messages_body([marked(text(6000, "tools"), ttl="1h")], [marked(text(6000, "conv"))])
    prompt = anthropic_prompt(body)
    first_bp = estimate_tokens(prompt.boundaries[prompt.breakpoints[0][0]])
    second_bp = estimate_tokens(prompt.boundaries[prompt.breakpoints[1][0]])
    plan = run(pol, cache, prompt, 0.0, anthropic=True)
    assert plan.write_tokens == second_bp
    assert plan.write_long_tokens == first_bp
    # After the 5-minute TTL only the 1-hour prefix is left.
    later = run(pol, cache, prompt, TTL + 1.0, anthropic=True)
    assert later.read_tokens == first_bp
    assert (later.write_tokens, later.write_long_tokens) == (second_bp - first_bp, 0)
    # And after an hour nothing.
    assert run(pol, cache, prompt, 2 * TTL + LONG_TTL, anthropic=True).read_tokens == 0


def test_moving_breakpoint_reads_the_previous_turn_through_lookback() -> None:
    pol, cache = policy(), PrefixCache(1000)
    history = [text(6000, "t1"), "answer one"]
    turn1 = claude("system prompt", [marked(history[0])])
    run(pol, cache, turn1, 0.0, anthropic=True)
    # Next turn: the breakpoint moves to the new last block; the old one is not marked.
    turn2 = claude("system prompt", history[0], history[1], [marked("second question")])
    plan = run(pol, cache, turn2, 1.0, anthropic=True)
    read_expected = estimate_tokens(turn1.boundaries[turn1.breakpoints[0][0]])
    assert plan.read_tokens == read_expected
    assert plan.write_tokens == turn2.tokens - read_expected


def test_lookback_is_bounded() -> None:
    pol, cache = policy(lookback=3), PrefixCache(1000)
    turn1 = claude("system", [marked(text(6000))])
    run(pol, cache, turn1, 0.0, anthropic=True)
    filler = ["a", "b", "c"]  # three more blocks: the old boundary is 3 blocks back + 1
    turn2 = claude("system", text(6000), *filler, [marked("new")])
    assert run(pol, cache, turn2, 1.0, anthropic=True).read_tokens == 0


def test_top_level_cache_control_marks_the_end_of_the_prompt() -> None:
    pol, cache = policy(), PrefixCache(1000)
    body = messages_body("system", text(6000), cache_control={"type": "ephemeral"})
    prompt = anthropic_prompt(body)
    assert prompt.breakpoints == [(len(prompt.boundaries) - 1, False)]
    run(pol, cache, prompt, 0.0, anthropic=True)
    assert run(pol, cache, prompt, 1.0, anthropic=True).read_tokens == prompt.tokens


def test_tool_definitions_are_part_of_the_cached_prefix() -> None:
    pol, cache = policy(), PrefixCache(1000)
    tool = {"name": "search", "description": text(6000), "input_schema": {"type": "object"}}
    prompt = claude("system", "q", tools=[{**tool, "cache_control": {"type": "ephemeral"}}])
    run(pol, cache, prompt, 0.0, anthropic=True)
    assert run(pol, cache, prompt, 1.0, anthropic=True).read_tokens > 1024
    changed = claude(
        "system", "q", tools=[{**tool, "name": "find", "cache_control": {"type": "ephemeral"}}]
    )
    assert run(pol, cache, changed, 2.0, anthropic=True).read_tokens == 0


def test_more_than_four_breakpoints_is_an_error() -> None:
    with pytest.raises(PromptError, match="maximum of 4"):
        claude([marked(f"block {i}") for i in range(5)])


def test_invalid_ttl_is_an_error() -> None:
    with pytest.raises(PromptError, match="ttl"):
        claude([marked("x", ttl="10m")])


# --- serialisation -----------------------------------------------------------------


def test_token_estimate_is_utf8_bytes_over_four_rounded_up() -> None:
    assert [estimate_tokens(n) for n in (0, 1, 4, 5)] == [0, 1, 1, 2]
    prompt = openai_prompt({"model": "m", "messages": [{"role": "user", "content": "é" * 10}]})
    assert prompt.tokens == estimate_tokens(len(prompt.data))
    assert b"\xc3\xa9" * 10 in prompt.data


def test_images_enter_the_prompt_as_a_hash_of_their_data() -> None:
    def with_image(data: str) -> Prompt:
        image = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}
        content = [{"type": "text", "text": "look"}, image]
        return openai_prompt({"model": "m", "messages": [{"role": "user", "content": content}]})

    big, other = with_image("A" * 100_000), with_image("B" * 100_000)
    assert len(big.data) < 200
    assert big.data != other.data


def test_tools_come_before_messages_in_openai_prompts() -> None:
    tools = [{"type": "function", "function": {"name": "lookup"}}]
    prompt = openai_prompt(
        {"model": "m", "tools": tools, "messages": [{"role": "user", "content": "hi"}]}
    )
    assert prompt.data.index(b"lookup") < prompt.data.index(b"hi")


@pytest.mark.parametrize(
    "body",
    [
        {"messages": [{"role": "user", "content": "x"}]},
        {"model": "m", "messages": []},
        {"model": "m", "messages": [{"content": "x"}]},
        {"model": "m", "messages": [{"role": "user", "content": 5}]},
    ],
)
def test_invalid_openai_bodies_are_rejected(body: dict[str, Any]) -> None:
    with pytest.raises(PromptError):
        openai_prompt(body)
