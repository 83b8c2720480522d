from __future__ import annotations

import base64
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from affinity.fingerprint import MEDIA_TOKENS, fingerprint

SYSTEM = "You are a careful assistant. " * 200  # ~5.8 KB: several blocks


def chat(*turns: str, **params: Any) -> dict[str, Any]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}]
    for index, text in enumerate(turns):
        messages.append({"role": "user" if index % 2 == 0 else "assistant", "content": text})
    return {"model": "gpt-4o", "messages": messages, **params}


def common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_identical_prefix_gives_identical_chain() -> None:
    short = fingerprint(chat("question one"), kind="chat")
    longer = fingerprint(chat("question one", "answer one", "question two"), kind="chat")
    assert longer.hashes[: len(short.hashes)] == short.hashes
    assert longer.tokens[: len(short.tokens)] == short.tokens
    assert len(longer.hashes) > len(short.hashes)
    assert longer.total_tokens > short.total_tokens


def test_tokens_are_cumulative_byte_estimates() -> None:
    fp = fingerprint(chat("x" * 4000), kind="chat")
    assert fp.tokens[0] == 0
    assert list(fp.tokens) == sorted(fp.tokens)
    assert fp.tokens[-1] == fp.total_tokens
    # ~10 KB of canonical JSON at 4 bytes a token
    assert 2400 < fp.total_tokens < 2700


@settings(max_examples=60, deadline=None)
@given(
    turns=st.lists(st.text(min_size=1, max_size=3000), min_size=2, max_size=8),
    data=st.data(),
)
def test_change_in_message_k_changes_every_hash_from_its_blocks_on(
    turns: list[str], data: st.DataObject
) -> None:
    k = data.draw(st.integers(min_value=0, max_value=len(turns) - 1))
    changed = list(turns)
    changed[k] = turns[k] + "!"
    before = fingerprint(chat(*turns[:k]), kind="chat")  # everything ahead of message k
    a = fingerprint(chat(*turns), kind="chat")
    b = fingerprint(chat(*changed), kind="chat")
    start = len(before.hashes)  # first block of message k
    assert a.hashes[:start] == b.hashes[:start] == before.hashes
    first_diff = common_prefix(a.hashes, b.hashes)
    assert first_diff >= start
    assert first_diff < len(a.hashes)
    tail_a, tail_b = a.hashes[first_diff:], b.hashes[first_diff:]
    assert all(x != y for x, y in zip(tail_a, tail_b, strict=False))
    assert a.full != b.full


def test_request_parameters_do_not_change_hashes() -> None:
    base = fingerprint(chat("hello"), kind="chat")
    tuned = fingerprint(
        chat(
            "hello",
            temperature=0.1,
            max_tokens=17,
            stream=True,
            stream_options={"include_usage": True},
            metadata={"x": "y"},
            user="u1",
            top_p=0.5,
        ),
        kind="chat",
    )
    assert tuned.hashes == base.hashes
    assert tuned.root == base.root
    assert tuned.tokens == base.tokens
    # the response cache must still tell them apart
    assert tuned.full != base.full
    streamed_only = fingerprint(chat("hello", stream=True), kind="chat")
    assert streamed_only.full == base.full


def test_key_order_does_not_matter() -> None:
    a = {"model": "m", "messages": [{"role": "user", "content": "hi", "name": "bob"}]}
    b = {"messages": [{"name": "bob", "content": "hi", "role": "user"}], "model": "m"}
    assert fingerprint(a, kind="chat").hashes == fingerprint(b, kind="chat").hashes


def test_model_change_changes_every_hash() -> None:
    a = fingerprint(chat("hello"), kind="chat")
    other = chat("hello")
    other["model"] = "gpt-4o-mini"
    b = fingerprint(other, kind="chat")
    assert len(a.hashes) == len(b.hashes)
    assert all(x != y for x, y in zip(a.hashes, b.hashes, strict=True))


def test_images_are_hashed_not_inlined() -> None:
    pixels = base64.b64encode(bytes(range(256)) * 400).decode()  # ~136 KB of base64

    def with_image(data: str) -> dict[str, Any]:
        source = {"type": "base64", "media_type": "image/png", "data": data}
        part = {"type": "image", "source": source}
        return {
            "model": "claude",
            "system": SYSTEM,
            "messages": [
                {"role": "user", "content": [part, {"type": "text", "text": "what is it?"}]}
            ],
        }

    fp = fingerprint(with_image(pixels), kind="messages")
    plain = fingerprint({"model": "claude", "system": SYSTEM, "messages": []}, kind="messages")
    # one block for the envelope, one for the image, one for the text: not 130+ blocks
    assert len(fp.hashes) == len(plain.hashes) + 3
    assert fp.total_tokens < plain.total_tokens + MEDIA_TOKENS + 100
    other = fingerprint(with_image(pixels[:-4] + "AAAA"), kind="messages")
    n = len(plain.hashes)
    assert other.hashes[: n + 1] == fp.hashes[: n + 1]
    assert other.hashes[n + 1] != fp.hashes[n + 1]


def test_chat_data_url_is_hashed() -> None:
    url = "data:image/png;base64," + "QUJD" * 20000
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}
        ],
    }
    fp = fingerprint(body, kind="chat")
    assert len(fp.hashes) == 3
    assert fp.total_tokens < MEDIA_TOKENS + 50


def test_cache_markers_do_not_change_hashes_and_ttl_is_reported() -> None:
    def body(marker: dict[str, str] | None) -> dict[str, Any]:
        part: dict[str, Any] = {"type": "text", "text": SYSTEM}
        tool: dict[str, Any] = {"name": "t", "input_schema": {"type": "object"}}
        if marker is not None:
            part["cache_control"] = marker
            tool["cache_control"] = marker
        return {
            "model": "claude",
            "tools": [tool],
            "system": [part],
            "messages": [{"role": "user", "content": [dict(part)]}],
        }

    plain = fingerprint(body(None), kind="messages")
    marked = fingerprint(body({"type": "ephemeral"}), kind="messages")
    hour = fingerprint(body({"type": "ephemeral", "ttl": "1h"}), kind="messages")
    assert plain.hashes == marked.hashes == hour.hashes
    assert plain.cache_ttl is None
    assert marked.cache_ttl is None
    assert hour.cache_ttl == 3600.0


def test_cap_holds_but_full_covers_everything() -> None:
    long_text = "y" * 200_000
    fp = fingerprint(chat(long_text), kind="chat", max_blocks=64)
    assert len(fp.hashes) == len(fp.tokens) == 64
    assert fp.total_tokens > 50_000
    changed = fingerprint(chat(long_text[:-1] + "z"), kind="chat", max_blocks=64)
    assert changed.hashes == fp.hashes  # the change lies past the cap
    assert changed.full != fp.full


def test_root_is_first_block_past_min_tokens_and_never_block_zero() -> None:
    fp = fingerprint(chat("q"), kind="chat", min_tokens=1024)
    assert fp.pin_from == next(i for i, t in enumerate(fp.tokens) if t >= 1024)
    assert fp.root == fp.hashes[fp.pin_from]
    tiny = fingerprint({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, kind="chat")
    assert tiny.pin_from == len(tiny.hashes)  # nothing cacheable
    assert tiny.root == tiny.hashes[-1] != tiny.hashes[0]
    empty = fingerprint({"model": "m", "messages": []}, kind="chat")
    assert empty.root == empty.hashes[0]  # nothing but the model exists
    # with min_tokens 0 the root still skips the model block
    zero = fingerprint(chat("q"), kind="chat", min_tokens=0)
    assert zero.root == zero.hashes[1]


def test_siblings_share_root_but_not_tail() -> None:
    a = fingerprint(chat("first conversation"), kind="chat")
    b = fingerprint(chat("second conversation"), kind="chat")
    assert a.root == b.root
    assert a.hashes[-1] != b.hashes[-1]


def test_session_key_refines_root_only() -> None:
    plain = fingerprint(chat("q"), kind="chat")
    keyed = fingerprint(chat("q", prompt_cache_key="conv-1"), kind="chat")
    other = fingerprint(chat("q", prompt_cache_key="conv-2"), kind="chat")
    hinted = fingerprint(chat("q"), kind="chat", session_hint="conv-1")
    assert keyed.session == "conv-1"
    assert keyed.hashes == plain.hashes
    assert len({plain.root, keyed.root, other.root}) == 3
    assert hinted.root == keyed.root
    anthropic = {
        "model": "claude",
        "system": SYSTEM,
        "metadata": {"user_id": "user_abc_session_1"},
        "messages": [{"role": "user", "content": "q"}],
    }
    assert fingerprint(anthropic, kind="messages").session == "user_abc_session_1"


def test_messages_sections_come_in_cache_order() -> None:
    tools = [{"name": "search", "description": "d" * 3000, "input_schema": {"type": "object"}}]
    base = {"model": "claude", "tools": tools, "system": SYSTEM, "messages": []}
    with_turn = {**base, "messages": [{"role": "user", "content": "hi"}]}
    thinking = {**with_turn, "thinking": {"type": "enabled", "budget_tokens": 2000}}
    a = fingerprint(base, kind="messages")
    b = fingerprint(with_turn, kind="messages")
    c = fingerprint(thinking, kind="messages")
    assert b.hashes[: len(a.hashes)] == a.hashes
    # thinking settings partition the cache after the tools, before the system prompt
    tool_blocks = len(fingerprint({"model": "claude", "tools": tools}, kind="messages").hashes)
    assert tool_blocks == 1 + 3  # the model, then the ~3 KB tool in 1 KB pieces
    assert c.hashes[:tool_blocks] == b.hashes[:tool_blocks]
    assert c.hashes[tool_blocks] != b.hashes[tool_blocks]


def test_responses_input_and_instructions() -> None:
    body = {"model": "gpt-4.1", "instructions": SYSTEM, "input": "question"}
    items = {
        "model": "gpt-4.1",
        "instructions": SYSTEM,
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "question"}]},
            {"type": "function_call_output", "call_id": "c1", "output": "z" * 5000},
        ],
        "reasoning": {"effort": "high"},
    }
    a = fingerprint(body, kind="responses")
    b = fingerprint(items, kind="responses")
    assert a.pin_from < len(a.hashes)
    assert a.hashes[: a.pin_from + 1] == b.hashes[: a.pin_from + 1]
    assert b.total_tokens > a.total_tokens + 1200
