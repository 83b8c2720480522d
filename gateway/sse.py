"""Incremental Server-Sent-Events splitter for a proxied byte stream.

Chunks may be cut anywhere: inside a line, between the `\\r` and `\\n` of a line end,
inside a multi-byte UTF-8 sequence. Lines end with `\\n`, `\\r\\n` or `\\r` and a blank
line ends an event, as in the WHATWG rules; `data` lines are joined with `\\n`, a
leading `:` marks a comment and one space after the field's colon is dropped.

Unlike a browser, the parser returns every block, including those without data
(comments used as keep-alives, stray blank lines), so that the concatenated `raw` of
the returned events is exactly the input: a proxy can forward or drop whole events
byte for byte. `id` and `retry` are kept in `raw` but not interpreted.
"""

from __future__ import annotations

from typing import NamedTuple

_LF = 0x0A
_CR = 0x0D
_COLON = 0x3A
_SPACE = 0x20
_BOM = b"\xef\xbb\xbf"


class SSEEvent(NamedTuple):
    """One event. `event` is None when the block had no `event` field."""

    event: str | None
    data: bytes  # the data lines joined with b"\n"; b"" when there were none
    raw: bytes  # the exact bytes of the block, its terminating blank line included


class SSEParser:
    """Split a byte stream into events; the unconsumed tail is kept between feeds.

    Each byte is scanned once: the tail of an incomplete event is kept in a
    `bytearray` (amortised O(1) appends) and the search for the next line end resumes
    where the previous feed stopped, so a large event arriving in many small chunks
    costs linear, not quadratic, time.
    """

    __slots__ = ("_buf", "_data", "_event", "_line", "_scan", "_started")

    def __init__(self) -> None:
        self._buf = bytearray()  # the incomplete event, from its first byte
        self._line = 0  # offset in _buf where the next unparsed line starts
        self._scan = 0  # no line end in _buf[_line:_scan]
        self._event: str | None = None
        self._data: list[bytes | bytearray] = []
        self._started = False  # past the optional byte-order mark

    @property
    def at_boundary(self) -> bool:
        """Nothing is held back: the next byte fed starts a new event."""
        return self._started and not self._buf

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Return the events that `chunk` completes, in order."""
        if self._buf:
            self._buf += chunk
            buf: bytes | bytearray = self._buf
        else:
            buf = chunk  # the common case: parse the chunk in place, no copy
        line = self._line
        scan = self._scan
        if not self._started:
            if len(buf) < len(_BOM) and _BOM.startswith(buf):
                self._keep(buf, 0)  # could still be a split byte-order mark
                return []
            self._started = True
            if buf.startswith(_BOM):
                line = scan = len(_BOM)  # parsed past, but kept in the first event's raw
        n = len(buf)
        start = 0  # where the current event's raw begins
        events: list[SSEEvent] = []
        cr = buf.find(b"\r", scan)  # cached: most streams have none, so find it once
        while True:
            lf = buf.find(b"\n", scan)
            if 0 <= cr < scan:
                cr = buf.find(b"\r", scan)
            if cr < 0 or 0 <= lf < cr:
                if lf < 0:
                    scan = n
                    break
                end, nxt = lf, lf + 1
            else:
                end = cr
                if cr + 1 == n:
                    # Wait for the next byte: it may be the `\n` of a `\r\n` that
                    # belongs to this event's raw.
                    scan = cr
                    break
                nxt = cr + 2 if buf[cr + 1] == _LF else cr + 1
            if end == line:
                events.append(self._dispatch(bytes(buf[start:nxt])))
                start = nxt
            elif buf[line] != _COLON:
                self._field(buf, line, end)
            line = scan = nxt
        self._line = line - start
        self._scan = scan - start
        self._keep(buf, start)
        return events

    def flush(self) -> bytes:
        """Return the bytes of an incomplete trailing event and reset the parser.

        The WHATWG rules discard such an event; the caller decides whether to forward it.
        """
        tail = bytes(self._buf)
        self._buf = bytearray()
        self._line = self._scan = 0
        self._event = None
        self._data = []
        self._started = False
        return tail

    def _keep(self, buf: bytes | bytearray, start: int) -> None:
        if buf is self._buf:
            del self._buf[:start]  # O(1): bytearray moves its start pointer
        elif start < len(buf):
            self._buf = bytearray(buf[start:])

    def _field(self, buf: bytes | bytearray, line: int, end: int) -> None:
        colon = buf.find(b":", line, end)
        if colon < 0:
            colon = value = end  # a bare field name has an empty value
        else:
            value = colon + 1
            if value < end and buf[value] == _SPACE:
                value += 1
        name_len = colon - line
        if name_len == 4 and buf.startswith(b"data", line):
            self._data.append(buf[value:end])
        elif name_len == 5 and buf.startswith(b"event", line):
            self._event = bytes(buf[value:end]).decode("utf-8", "replace")

    def _dispatch(self, raw: bytes) -> SSEEvent:
        parts = self._data
        if not parts:
            data = b""
        elif len(parts) == 1:
            data = bytes(parts[0])
        else:
            data = b"\n".join(parts)
        event = SSEEvent(self._event, data, raw)
        self._event = None
        self._data = []
        return event
