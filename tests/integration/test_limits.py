"""Hostile and malformed requests are refused cleanly, in the caller's format where the
HTTP layer has been passed."""

from __future__ import annotations

import asyncio

import orjson

from tests.conftest import GatewayHandle


async def raw_request(gw: GatewayHandle, data: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.server.port)
    writer.write(data)
    await writer.drain()
    response = await asyncio.wait_for(reader.read(), 5)  # Connection: close ends it
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


async def post_json(gw: GatewayHandle, body: bytes) -> tuple[int, bytes]:
    length = str(len(body)).encode()
    return await raw_request(
        gw,
        HEAD + b"Content-Type: application/json\r\nContent-Length: " + length + b"\r\n\r\n" + body,
    )


HEAD = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
    b"Authorization: Bearer sk-demo\r\n"
)


async def test_conflicting_content_length_and_transfer_encoding_is_400(
    gateway: GatewayHandle,
) -> None:
    status, _ = await raw_request(
        gateway, HEAD + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    assert status == 400


async def test_duplicate_content_length_is_400(gateway: GatewayHandle) -> None:
    status, _ = await raw_request(
        gateway, HEAD + b"Content-Length: 5\r\nContent-Length: 7\r\n\r\n{}"
    )
    assert status == 400


async def test_oversized_headers_are_refused(gateway: GatewayHandle) -> None:
    status, _ = await raw_request(
        gateway, HEAD + b"X-Big: " + b"a" * 200_000 + b"\r\nContent-Length: 2\r\n\r\n{}"
    )
    assert status in (400, 431)


async def test_chunked_body_over_the_limit_is_413(gateway: GatewayHandle) -> None:
    limit = gateway.app.config.server.max_body_bytes
    chunk = b"x" * (1 << 20)
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.server.port)
    writer.write(HEAD + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    # One byte past the limit and no final chunk: the gateway must answer without
    # waiting for the rest of a body it will never accept.
    for _ in range(limit // len(chunk)):
        writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
    writer.write(b"1\r\nx\r\n")
    await writer.drain()
    response = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert response.split(b" ")[1] == b"413"
    assert b"limit" in response


async def test_deep_json_nesting_is_400(gateway: GatewayHandle) -> None:
    body = b'{"model":"gpt-4o-mini","messages":' + b"[" * 5000 + b"]" * 5000 + b"}"
    status, payload = await post_json(gateway, body)
    assert status == 400
    assert orjson.loads(payload)["error"]["type"] == "invalid_request_error"


async def test_too_many_messages_is_400(gateway: GatewayHandle) -> None:
    body = orjson.dumps(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}] * 10_001}
    )
    status, payload = await post_json(gateway, body)
    assert status == 400
    assert b"too many messages" in payload


async def test_upstream_redirect_fields_in_the_body_are_not_honoured(
    gateway: GatewayHandle, emulator
) -> None:  # type: ignore[no-untyped-def]
    before = emulator.stats()["totals"]["requests"]
    body = orjson.dumps(
        {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 2,
            "base_url": "http://127.0.0.1:1/v1",
            "api_key": "sk-attacker",
            "extra_headers": {"authorization": "Bearer sk-attacker"},
        }
    )
    status, _ = await post_json(gateway, body)
    assert status == 200
    assert emulator.stats()["totals"]["requests"] == before + 1  # it went to our account
    last = emulator.requests()[-1]
    assert last["headers"]["authorization"].startswith("Bearer sk-emu-")
