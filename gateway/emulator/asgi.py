"""Raw-ASGI helpers: headers, bodies, responses, and noticing a client that went away."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import Any

import orjson
from starlette.types import Receive, Send

JSON = b"application/json"
EVENT_STREAM = b"text/event-stream; charset=utf-8"


class BodyTooLarge(Exception):
    pass


class InjectedStreamCut(Exception):
    """Raised mid-stream on purpose: the server then drops the connection without the
    terminating chunk, which is what a client sees when a provider's stream breaks."""


def header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    value = header(headers, b"authorization")
    if value is None or value[:7].lower() != b"bearer ":
        return None
    return value[7:].strip().decode("latin-1")


async def read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body; None if the client disconnected first."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        if not message.get("more_body", False):
            if not chunks:
                return chunk
            chunks.append(chunk)
            return b"".join(chunks)
        chunks.append(chunk)


async def respond(
    send: Send,
    status: int,
    body: bytes,
    headers: Sequence[tuple[bytes, bytes]] = (),
    content_type: bytes = JSON,
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", b"%d" % len(body)),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def respond_json(send: Send, status: int, payload: Any) -> None:
    await respond(send, status, orjson.dumps(payload))


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class ClientWatch:
    """Notices the client going away while the emulator waits or streams.

    After the body is read, the next ``receive()`` only returns when the client
    disconnects (or the response completes), so one background receive per request is
    enough; it is started lazily because a zero-latency request never waits.
    """

    __slots__ = ("_receive", "_task")

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(_until_disconnect(self._receive))

    @property
    def gone(self) -> bool:
        return self._task is not None and self._task.done()

    async def sleep(self, seconds: float) -> bool:
        """Wait; False if the client disconnected first."""
        if seconds <= 0:
            return not self.gone
        self.start()
        assert self._task is not None
        done, _ = await asyncio.wait((self._task,), timeout=seconds)
        return not done

    def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
