from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.sse import SSEEvent, SSEParser
from gateway.usage import (
    Endpoint,
    Provider,
    StreamUsage,
    Usage,
    add_usage_fields,
    add_usage_fields_to_event,
    estimate_usage,
    usage_from_body,
)

FIXTURES = Path(__file__).parent.parent / "fixtures" / "usage"
FIXTURE_NAMES = sorted(p.name for p in FIXTURES.glob("*.json"))
BODY_FIXTURES = [n for n in FIXTURE_NAMES if "body" in orjson.loads((FIXTURES / n).read_bytes())]
STREAM_FIXTURES = [n for n in FIXTURE_NAMES if n not in BODY_FIXTURES]


def load(name: str) -> dict[str, Any]:
    fixture: dict[str, Any] = orjson.loads((FIXTURES / name).read_bytes())
    return fixture


def sse(events: list[dict[str, Any]], newline: bytes = b"\n") -> list[bytes]:
    """The wire bytes of each event, as providers send them (compact JSON)."""
    out = []
    for ev in events:
        data = ev["data"]
        line = b"data: " + (data.encode() if isinstance(data, str) else orjson.dumps(data))
        head = b"event: " + ev["event"].encode() + newline if "event" in ev else b""
        out.append(head + line + newline + newline)
    return out


def run_stream(fixture: dict[str, Any], chunk_size: int = 13) -> tuple[StreamUsage, list[SSEEvent]]:
    stream = b"".join(sse(fixture["events"]))
    parser = SSEParser()
    usage = StreamUsage(fixture["provider"], fixture["endpoint"])
    events = []
    for i in range(0, len(stream), chunk_size):
        for event in parser.feed(stream[i : i + chunk_size]):
            usage.feed(event)
            events.append(event)
    assert parser.flush() == b""
    return usage, events


def check_invariants(u: Usage) -> None:
    fields = (
        u.prompt_tokens,
        u.cached_tokens,
        u.cache_write_tokens,
        u.cache_write_5m_tokens,
        u.cache_write_1h_tokens,
        u.completion_tokens,
        u.reasoning_tokens,
        u.non_cached_prompt_tokens,
    )
    assert all(n >= 0 for n in fields)
    assert u.cached_tokens <= u.prompt_tokens
    assert u.cached_tokens + u.cache_write_tokens + u.non_cached_prompt_tokens == u.prompt_tokens
    assert u.cache_write_tokens == u.cache_write_5m_tokens + u.cache_write_1h_tokens


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_usage(name: str) -> None:
    fixture = load(name)
    expected = None if fixture["expected"] is None else Usage(**fixture["expected"])
    if "body" in fixture:
        got = usage_from_body(fixture["provider"], fixture["endpoint"], fixture["body"])
    else:
        got = run_stream(fixture)[0].result()
    assert got == expected
    if got is not None:
        check_invariants(got)


@pytest.mark.parametrize("name", STREAM_FIXTURES)
def test_usage_only_chunks_are_recognised(name: str) -> None:
    fixture = load(name)
    usage, events = run_stream(fixture)
    flagged = [i for i, event in enumerate(events) if usage.is_usage_only_chunk(event)]
    assert flagged == fixture["usage_only"]
    fresh = StreamUsage(fixture["provider"], fixture["endpoint"])  # never fed: parses itself
    assert [i for i, e in enumerate(events) if fresh.is_usage_only_chunk(e)] == flagged


def test_dropping_the_usage_only_chunk_is_byte_exact() -> None:
    fixture = load("openai_chat_stream_cached.json")
    wire = sse(fixture["events"])
    parser = SSEParser()
    usage = StreamUsage("openai", "chat")
    forwarded = []
    for event in parser.feed(b"".join(wire)):
        usage.feed(event)
        if not usage.is_usage_only_chunk(event):
            forwarded.append(event.raw)
    assert b"".join(forwarded) == b"".join(wire[:4] + wire[5:])
    assert usage.result() == Usage(prompt_tokens=2006, cached_tokens=1920, completion_tokens=300)


@pytest.mark.parametrize(
    ("body_name", "stream_name"),
    [
        ("openai_chat_cached.json", "openai_chat_stream_cached.json"),
        ("openai_responses.json", "openai_responses_stream.json"),
    ],
)
def test_stream_and_body_report_the_same_usage(body_name: str, stream_name: str) -> None:
    body = load(body_name)
    streamed = run_stream(load(stream_name))[0].result()
    assert streamed is not None
    assert streamed == usage_from_body(body["provider"], body["endpoint"], body["body"])


def anthropic_event(kind: str, **fields: Any) -> SSEEvent:
    data = orjson.dumps({"type": kind, **fields})
    return SSEEvent(kind, data, b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n")


def test_anthropic_message_delta_is_cumulative_not_summed() -> None:
    prompt = {"input_tokens": 100, "cache_read_input_tokens": 50, "cache_creation_input_tokens": 10}
    usage = StreamUsage("anthropic", "messages")
    usage.feed(anthropic_event("message_start", message={"usage": {**prompt, "output_tokens": 1}}))
    assert usage.result() is None  # the stream has not reported its final usage yet
    usage.feed(anthropic_event("message_delta", usage={**prompt, "output_tokens": 20}))
    usage.feed(anthropic_event("message_delta", usage={"output_tokens": 30, "input_tokens": None}))
    assert usage.result() == Usage(
        prompt_tokens=160,
        cached_tokens=50,
        cache_write_tokens=10,
        cache_write_5m_tokens=10,
        completion_tokens=30,
    )


def test_stream_cut_after_message_start_keeps_the_reported_prompt_side() -> None:
    usage = StreamUsage("anthropic", "messages")
    start = {
        "input_tokens": 5,
        "cache_read_input_tokens": 9000,
        "cache_creation_input_tokens": 1000,
        "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 1000},
        "output_tokens": 1,
    }
    usage.feed(anthropic_event("message_start", message={"usage": start}))
    assert usage.result() is None
    assert usage.estimate(prompt_tokens_estimate=7000, streamed_text_bytes=400) == Usage(
        prompt_tokens=10005,
        cached_tokens=9000,
        cache_write_tokens=1000,
        cache_write_1h_tokens=1000,
        completion_tokens=100,
        estimated=True,
    )


def test_stream_cut_before_any_usage_is_estimated() -> None:
    usage = StreamUsage("openai", "chat")
    assert usage.result() is None
    assert usage.estimate(7000, 401) == Usage(
        prompt_tokens=7000, completion_tokens=101, estimated=True
    )


def test_estimate_is_never_zero() -> None:
    assert estimate_usage(0, 0) == Usage(prompt_tokens=1, completion_tokens=1, estimated=True)


@pytest.mark.parametrize(
    ("name", "parses"),
    [
        ("openai_chat_stream_cached.json", 1),
        ("anthropic_messages_stream_5m.json", 2),
        ("openai_responses_stream.json", 1),
        ("deepseek_chat_stream.json", 1),
    ],
)
def test_only_events_carrying_usage_are_parsed(
    name: str, parses: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[bytes] = []
    real_loads = orjson.loads

    def counting_loads(data: bytes) -> Any:
        calls.append(data)
        return real_loads(data)

    fixture = load(name)
    wire = sse(fixture["events"])
    events = [e for chunk in wire for e in SSEParser().feed(chunk)]
    monkeypatch.setattr(orjson, "loads", counting_loads)
    usage = StreamUsage(fixture["provider"], fixture["endpoint"])
    for event in events:
        usage.feed(event)
        usage.is_usage_only_chunk(event)
    assert len(calls) == parses
    assert usage.result() is not None


@pytest.mark.parametrize(
    ("data", "carries"),
    [
        (b'{"choices": [], "usage" : {"prompt_tokens": 5}}', True),
        (b'{"choices":[{"delta":{"content":"x"}}],"usage":null}', False),
        (b'{"delta":{"text":"the \\"usage\\": {x}"}}', False),
        (b'{"kind":"usage","usage":{"prompt_tokens":5}}', True),
        (b"[DONE]", False),
        (b'{"usage":{', False),  # truncated JSON is ignored, not raised
    ],
)
def test_usage_byte_check(data: bytes, carries: bool) -> None:
    usage = StreamUsage("openai", "chat")
    usage.feed(SSEEvent(None, data, b"data: " + data + b"\n\n"))
    assert (usage.result() is not None) == carries


def test_deepseek_without_cache_fields_reads_openai_fields() -> None:
    body = {"usage": {"prompt_tokens": 50, "prompt_tokens_details": {"cached_tokens": 40}}}
    assert usage_from_body("deepseek", "chat", body) == Usage(prompt_tokens=50, cached_tokens=40)


def test_deepseek_speaking_messages_uses_anthropic_fields() -> None:
    body = {"usage": {"input_tokens": 7, "cache_read_input_tokens": 640, "output_tokens": 3}}
    assert usage_from_body("deepseek", "messages", body) == Usage(
        prompt_tokens=647, cached_tokens=640, completion_tokens=3
    )


def test_anthropic_write_split() -> None:
    over = {
        "cache_creation_input_tokens": 100,
        "cache_creation": {"ephemeral_1h_input_tokens": 500},
    }
    assert usage_from_body("anthropic", "messages", {"usage": over}) == Usage(
        prompt_tokens=100, cache_write_tokens=100, cache_write_1h_tokens=100
    )
    split_only = {
        "cache_creation": {"ephemeral_5m_input_tokens": 30, "ephemeral_1h_input_tokens": 20}
    }
    assert usage_from_body("anthropic", "messages", {"usage": split_only}) == Usage(
        prompt_tokens=50, cache_write_tokens=50, cache_write_5m_tokens=30, cache_write_1h_tokens=20
    )


def test_openai_cached_above_prompt_is_capped() -> None:
    body = {"usage": {"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": 64}}}
    assert usage_from_body("openai", "chat", body) == Usage(prompt_tokens=10, cached_tokens=10)


def test_body_without_usage() -> None:
    assert usage_from_body("openai", "chat", {"choices": []}) is None
    assert usage_from_body("anthropic", "messages", {"usage": None}) is None


_COUNT_KEYS = [
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "ephemeral_5m_input_tokens",
    "ephemeral_1h_input_tokens",
    "prompt_cache_hit_tokens",
    "prompt_cache_miss_tokens",
    "promptTokenCount",
    "cachedContentTokenCount",
    "candidatesTokenCount",
    "thoughtsTokenCount",
]
_NESTED_KEYS = [
    "prompt_tokens_details",
    "completion_tokens_details",
    "input_tokens_details",
    "output_tokens_details",
    "cache_creation",
]
_count = st.one_of(
    st.integers(-1000, 10**9), st.none(), st.just("12"), st.floats(allow_nan=False), st.booleans()
)
_counts = st.dictionaries(st.sampled_from(_COUNT_KEYS), _count)
_usage_obj = st.builds(
    lambda top, nested: {**top, **nested},
    _counts,
    st.dictionaries(st.sampled_from(_NESTED_KEYS), _counts),
)
_ROUTES: list[tuple[Provider, Endpoint]] = [
    ("openai", "chat"),
    ("openai", "responses"),
    ("anthropic", "messages"),
    ("anthropic", "chat"),
    ("deepseek", "chat"),
    ("deepseek", "messages"),
    ("gemini-openai", "chat"),
]


@given(_usage_obj, st.sampled_from(_ROUTES))
def test_usage_invariants(raw: dict[str, Any], route: tuple[Provider, Endpoint]) -> None:
    usage = usage_from_body(*route, {"usage": raw})
    assert usage is not None
    check_invariants(usage)
    assert not usage.estimated


@given(st.integers(-10, 10**9), st.integers(-10, 10**9))
def test_estimate_invariants(prompt: int, text_bytes: int) -> None:
    usage = estimate_usage(prompt, text_bytes)
    check_invariants(usage)
    assert usage.estimated and usage.prompt_tokens >= 1 and usage.completion_tokens >= 1


FIELDS = {"cost": 0.0123, "cache_discount": -0.5}


@pytest.mark.parametrize("name", BODY_FIXTURES)
def test_add_usage_fields_to_body(name: str) -> None:
    body = load(name)["body"]
    out = orjson.loads(add_usage_fields(orjson.dumps(body), FIELDS))
    if "usage" not in body:
        assert out == body
        return
    assert out["usage"] == {**body["usage"], **FIELDS}
    assert {k: v for k, v in out.items() if k != "usage"} == {
        k: v for k, v in body.items() if k != "usage"
    }


def test_add_usage_fields_to_parsed_body_and_non_usage_bodies() -> None:
    body = load("anthropic_messages.json")["body"]
    assert orjson.loads(add_usage_fields(body, FIELDS))["usage"]["cost"] == 0.0123
    assert add_usage_fields(b'{"error":{"message":"x"}}', FIELDS) == b'{"error":{"message":"x"}}'
    assert add_usage_fields(b"not json", FIELDS) == b"not json"


@pytest.mark.parametrize(
    ("name", "index", "path"),
    [
        ("openai_chat_stream_cached.json", 4, ("usage",)),
        ("anthropic_messages_stream_1h.json", 8, ("usage",)),
        ("openai_responses_stream.json", 9, ("response", "usage")),
    ],
)
def test_add_usage_fields_to_event(name: str, index: int, path: tuple[str, ...]) -> None:
    fixture = load(name)
    wire = sse(fixture["events"], newline=b"\r\n")[index]
    (event,) = SSEParser().feed(wire)

    raw = add_usage_fields_to_event(event, FIELDS)

    (rewritten,) = SSEParser().feed(raw)
    assert rewritten.event == event.event
    assert raw.startswith(wire[: wire.index(b"data: ") + 6])
    assert raw.endswith(b"\r\n\r\n")
    before, after = orjson.loads(event.data), orjson.loads(rewritten.data)
    usage_before, usage_after = before, after
    for key in path:
        usage_before, usage_after = usage_before[key], usage_after[key]
    assert usage_after == {**usage_before, **FIELDS}


def test_add_usage_fields_to_multiline_and_non_usage_events() -> None:
    (event,) = SSEParser().feed(
        b'event: message_delta\ndata: {"usage":\ndata: {"output_tokens":3}}\n\n'
    )
    assert add_usage_fields_to_event(event, {"cost": 1.5}) == (
        b'event: message_delta\ndata: {"usage":{"output_tokens":3,"cost":1.5}}\n\n'
    )
    (done,) = SSEParser().feed(b"data: [DONE]\n\n")
    assert add_usage_fields_to_event(done, FIELDS) == done.raw
