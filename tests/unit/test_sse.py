from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.sse import SSEEvent, SSEParser


def feed_all(chunks: list[bytes]) -> tuple[list[SSEEvent], bytes]:
    parser = SSEParser()
    events: list[SSEEvent] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    return events, parser.flush()


def test_openai_chunks_in_one_feed() -> None:
    stream = (
        b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":3}}\n\n'
        b"data: [DONE]\n\n"
    )
    events = SSEParser().feed(stream)
    assert [e.data for e in events] == [
        b'{"choices":[{"delta":{"content":"Hi"}}]}',
        b'{"choices":[],"usage":{"prompt_tokens":3}}',
        b"[DONE]",
    ]
    assert all(e.event is None for e in events)
    assert b"".join(e.raw for e in events) == stream


def test_event_field_and_multiline_data() -> None:
    (event,) = SSEParser().feed(b"event: message_delta\ndata: a\ndata: b\n\n")
    assert event.event == "message_delta"
    assert event.data == b"a\nb"


def test_field_value_spacing() -> None:
    events = SSEParser().feed(b"data:x\n\ndata:  x\n\ndata\n\ndata\ndata\n\nevent\ndata: y\n\n")
    assert [e.data for e in events] == [b"x", b" x", b"", b"\n", b"y"]
    assert events[-1].event == ""


def test_comments_and_unknown_fields_are_kept_in_raw_only() -> None:
    stream = b": keep-alive\n\nid: 7\nretry: 10\nfoo: bar\n: note\ndata: z\n\n"
    events = SSEParser().feed(stream)
    assert [(e.event, e.data) for e in events] == [(None, b""), (None, b"z")]
    assert b"".join(e.raw for e in events) == stream


def test_line_endings_cr_and_crlf() -> None:
    events = SSEParser().feed(b"event: a\rdata: 1\r\rdata: 2\r\n\r\ndata: 3\n\r\n")
    assert [(e.event, e.data) for e in events] == [("a", b"1"), (None, b"2"), (None, b"3")]


def test_trailing_cr_waits_for_next_byte() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: x\r\r") == []
    (event,) = parser.feed(b"\ndata: y\r\r")
    assert event.raw == b"data: x\r\r\n"
    (event,) = parser.feed(b"data")
    assert event.raw == b"data: y\r\r"
    assert parser.flush() == b"data"


def test_crlf_split_between_chunks() -> None:
    events, tail = feed_all([b"data: 1\r", b"\n\r", b"\ndata: 2\r\n", b"\r\n"])
    assert [e.raw for e in events] == [b"data: 1\r\n\r\n", b"data: 2\r\n\r\n"]
    assert tail == b""


def test_split_utf8_event_name() -> None:
    name = "données".encode()
    cut = name.index(b"\xc3") + 1  # inside the two-byte sequence
    events, _ = feed_all([b"event: " + name[:cut], name[cut:] + b"\ndata: 1\n\n"])
    assert events[0].event == "données"


def test_byte_order_mark_is_skipped_but_kept_in_raw() -> None:
    events, _ = feed_all([b"\xef", b"\xbb", b"\xbfevent", b": e\ndata: 1\n\n"])
    assert events == [SSEEvent("e", b"1", b"\xef\xbb\xbfevent: e\ndata: 1\n\n")]


def test_byte_order_mark_only_at_stream_start() -> None:
    (_, second), _ = feed_all([b"data: 1\n\n\xef\xbb\xbfdata: 2\n\n"])
    assert second.data == b""  # the field name is "\ufeffdata", an unknown field


def test_flush_returns_incomplete_event_and_resets() -> None:
    parser = SSEParser()
    assert parser.feed(b"event: x\ndata: partial") == []
    assert parser.flush() == b"event: x\ndata: partial"
    (event,) = parser.feed(b"data: fresh\n\n")
    assert event == SSEEvent(None, b"fresh", b"data: fresh\n\n")


def test_large_event_in_many_small_chunks() -> None:
    payload = b"x" * 200_000
    stream = b"data: " + payload + b"\n\n"
    events, tail = feed_all([stream[i : i + 7] for i in range(0, len(stream), 7)])
    assert [e.data for e in events] == [payload]
    assert tail == b""


# A generated stream: each event is a list of lines built so that its expected
# (event, data, raw) is known by construction, with every line ending style.

_ENDINGS = ("\n", "\r\n", "\r")
_value = st.text(st.characters(codec="utf-8", exclude_characters="\r\n"))
_name = st.sampled_from(["data", "event", "id", "retry", "foo", ""])  # "" = comment
_line = st.tuples(_name, st.booleans(), st.booleans(), _value, st.sampled_from(_ENDINGS))
_block = st.tuples(st.lists(_line, min_size=1, max_size=5), st.sampled_from(_ENDINGS))


def _build(block: tuple[list[tuple[str, bool, bool, str, str]], str]) -> SSEEvent:
    lines, blank_end = block
    raw: list[str] = []
    event: str | None = None
    data: list[str] = []
    for name, bare, spaced, value, end in lines:
        if name == "":
            raw.append(":" + value + end)
            continue
        if bare:
            raw.append(name + end)
            value = ""
        else:
            raw.append(name + (": " if spaced else ":") + value + end)
            if not spaced and value.startswith(" "):
                value = value[1:]
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value
    if lines[-1][4] == "\r" and blank_end != "\r":
        blank_end = "\r"  # a "\n" here would merge with the "\r" into one line end
    raw.append(blank_end)
    return SSEEvent(event, "\n".join(data).encode(), "".join(raw).encode())


@given(st.lists(_block.map(_build), max_size=8), st.data())
def test_any_split_gives_the_same_events(expected: list[SSEEvent], draw: st.DataObject) -> None:
    stream = b"".join(e.raw for e in expected)
    cuts = sorted(draw.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]

    events, tail = feed_all(chunks)

    if expected and expected[-1].raw.endswith(b"\r"):
        # A final bare "\r" could still become "\r\n": the event stays pending.
        assert tail == expected[-1].raw
        expected = expected[:-1]
    else:
        assert tail == b""
    assert events == expected
    assert b"".join(e.raw for e in events) + tail == stream


@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=10))
def test_arbitrary_bytes_are_never_lost(stream: bytes, cuts: list[int]) -> None:
    bounds = sorted(min(c, len(stream)) for c in cuts)
    chunks = [stream[a:b] for a, b in zip([0, *bounds], [*bounds, len(stream)], strict=True)]
    events, tail = feed_all(chunks)
    whole, whole_tail = feed_all([stream])
    assert events == whole
    assert tail == whole_tail
    assert b"".join(e.raw for e in events) + tail == stream
