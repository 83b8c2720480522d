"""Read a request body once, bounded, and parse it once."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.types import Receive, Scope

from gateway.errors import BadRequest, ClientGone, PayloadTooLarge, UnsupportedMediaType


def _header(scope: Scope, name: bytes) -> bytes | None:
    for k, v in scope["headers"]:
        if k == name:
            return bytes(v)
    return None


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole body, refused with 413 before reading past `limit` (chunked bodies too)."""
    declared = _header(scope, b"content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest("invalid Content-Length")
        if int(declared) > limit:
            raise PayloadTooLarge(f"request body is larger than the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone("client went away while sending the body")
        chunk: bytes = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body is larger than the {limit}-byte limit")
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def parse_json_object(scope: Scope, raw: bytes) -> dict[str, Any]:
    ctype = _header(scope, b"content-type")
    if ctype is not None and not ctype.split(b";", 1)[0].strip().lower().endswith(b"json"):
        raise UnsupportedMediaType("the request body must be JSON (Content-Type: application/json)")
    if not raw:
        raise BadRequest("the request body is empty; a JSON object is required")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(
            f"the request body is not valid JSON: {exc.msg} at byte {exc.pos}"
        ) from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body
