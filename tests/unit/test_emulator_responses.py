"""The emulator's Responses API driven through raw ASGI, with a fake clock and no network."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from starlette.types import Message

from gateway.emulator import AccountSpec, EmulatorConfig, FaultSpec, LatencySpec, default_config
from gateway.emulator.app import EmulatorApp
from gateway.emulator.asgi import InjectedStreamCut
from gateway.emulator.stored import ResponseStore, StoredResponse

NO_LATENCY = LatencySpec(0.0, 0.0, 0.0)
LONG = "lorem ipsum dolor sit amet " * 300  # ~8 KB, ~2,000 tokens
TOOLS = [{"type": "function", "name": "lookup", "parameters": {"type": "object"}}]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Reply:
    status: int
    chunks: list[bytes] = field(default_factory=list)

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def json(self) -> Any:
        return orjson.loads(self.body)

    def events(self) -> list[tuple[str, Any]]:
        """(event name, data) of each server-sent event."""
        events = []
        for block in self.body.decode().split("\n\n"):
            if block:
                name, data = block.split("\n")
                assert name.startswith("event: ") and data.startswith("data: ")
                events.append((name[7:], orjson.loads(data[6:])))
        return events


class Client:
    def __init__(self, app: EmulatorApp) -> None:
        self.app = app

    async def request(
        self, method: str, path: str, body: Any = None, key: str = "sk-emu-0", query: bytes = b""
    ) -> Reply:
        raw = b"" if body is None else orjson.dumps(body)
        scope = {
            "type": "http",
            "method": method,
            "path": path,
            "query_string": query,
            "headers": [(b"authorization", b"Bearer " + key.encode())],
        }
        delivered = False

        async def receive() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": raw, "more_body": False}
            await asyncio.Event().wait()  # a client that never leaves
            raise AssertionError("unreachable")

        reply = Reply(0)

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                reply.status = message["status"]
            elif message.get("body"):
                reply.chunks.append(message["body"])

        await self.app(scope, receive, send)
        return reply

    async def create(self, key: str = "sk-emu-0", **body: Any) -> Reply:
        body.setdefault("model", "gpt-4o")
        body.setdefault("instructions", LONG)
        body.setdefault("input", "hi")
        return await self.request("POST", "/v1/responses", body, key)


def make(config: EmulatorConfig | None = None, **kw: Any) -> tuple[EmulatorApp, Client, FakeClock]:
    clock = FakeClock()
    app = EmulatorApp(config or default_config(2, latency=NO_LATENCY, **kw), clock=clock)
    return app, Client(app), clock


def cached(response: Any) -> int:
    details: dict[str, int] = response["usage"]["input_tokens_details"]
    return details["cached_tokens"]


def text(response: Any) -> str:
    result: str = response["output"][0]["content"][0]["text"]
    return result


# --- the conversation's growing prefix ---------------------------------------------


async def test_each_turn_reads_the_whole_previous_turn_from_the_cache() -> None:
    app, client, _ = make()
    first = (await client.create(tools=TOOLS)).json()
    second = (await client.create(tools=TOOLS, previous_response_id=first["id"])).json()
    third = (
        await client.create(tools=TOOLS, input="and then?", previous_response_id=second["id"])
    ).json()
    assert first["object"] == "response" and first["status"] == "completed"
    assert first["id"].startswith("resp_") and first["output"][0]["id"].startswith("msg_")
    assert second["previous_response_id"] == first["id"]
    one, two = first["usage"]["input_tokens"], second["usage"]["input_tokens"]
    assert one >= 1024
    assert cached(first) == 0
    # Turn 2's prompt is turn 1's prompt, its answer and the new input.
    assert two > one + first["usage"]["output_tokens"]
    assert cached(second) >= one // 128 * 128
    assert cached(third) >= two // 128 * 128
    assert cached(third) % 128 == 0
    usage = third["usage"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert usage["output_tokens_details"] == {"reasoning_tokens": 0}
    stats = app.stats()["accounts"]["acct-0"]
    assert stats["requests"] == 3
    assert stats["prompt_tokens"] == one + two + usage["input_tokens"]
    assert stats["cached_tokens"] == cached(second) + cached(third)
    assert stats["completion_tokens"] == 3 * 32
    assert stats["stored_responses"] == 3


async def test_a_conversation_replayed_by_the_client_is_the_same_prompt() -> None:
    _, client, _ = make()
    first = (await client.create(input=[{"role": "user", "content": "hi"}])).json()
    chained = (await client.create(input="next", previous_response_id=first["id"])).json()
    replayed = (
        await client.create(
            input=[
                {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "hi"}],
                },
                first["output"][0],  # the assistant message, ids, status and all
                {"role": "user", "content": "next"},
            ],
            store=False,
        )
    ).json()
    assert replayed["usage"]["input_tokens"] == chained["usage"]["input_tokens"]
    assert cached(replayed) == chained["usage"]["input_tokens"] // 128 * 128
    assert text(replayed) == text(chained)  # the output follows the prompt's bytes


async def test_instructions_are_not_carried_over() -> None:
    _, client, _ = make()
    first = (await client.create()).json()
    follow_up = (await client.create(instructions=None, previous_response_id=first["id"])).json()
    assert follow_up["instructions"] is None
    assert follow_up["usage"]["input_tokens"] < first["usage"]["input_tokens"]
    assert cached(follow_up) == 0


async def test_function_call_items_are_accepted_and_change_the_prompt() -> None:
    _, client, _ = make()
    call = {"type": "function_call", "call_id": "c1", "name": "lookup", "arguments": "{}"}
    output = {"type": "function_call_output", "call_id": "c1", "output": "42"}
    first = (await client.create(tools=TOOLS, input=[{"role": "user", "content": "x"}])).json()
    with_tools = await client.create(
        tools=TOOLS, input=[call, output], previous_response_id=first["id"]
    )
    assert with_tools.status == 200
    other = (
        await client.create(
            tools=TOOLS,
            input=[call, {**output, "output": "43"}],
            previous_response_id=first["id"],
        )
    ).json()
    assert text(other) != text(with_tools.json())
    # Item ids never reach the model.
    same = (
        await client.create(
            tools=TOOLS,
            input=[{**call, "id": "fc_1", "status": "completed"}, output],
            previous_response_id=first["id"],
        )
    ).json()
    assert text(same) == text(with_tools.json())


# --- per-account state ----------------------------------------------------------------


async def test_another_account_has_never_heard_of_the_response() -> None:
    app, client, _ = make()
    first = (await client.create()).json()
    reply = await client.create(key="sk-emu-1", previous_response_id=first["id"])
    assert reply.status == 400
    assert reply.json() == {
        "error": {
            "message": f"Previous response with id '{first['id']}' not found.",
            "type": "invalid_request_error",
            "param": "previous_response_id",
            "code": "previous_response_not_found",
        }
    }
    assert (await client.create(previous_response_id=first["id"])).status == 200
    assert (
        await client.request("GET", f"/v1/responses/{first['id']}", key="sk-emu-1")
    ).status == 404
    stats = app.stats()
    other = stats["accounts"]["acct-1"]
    assert (other["requests"], other["errors"], other["response_not_found"]) == (1, 1, 1)
    assert other["prompt_tokens"] == 0  # refused before it reached the model
    assert stats["accounts"]["acct-0"]["response_not_found"] == 0
    assert stats["totals"]["response_not_found"] == 1
    assert stats["totals"]["stored_responses"] == 2


async def test_ids_are_unique_across_accounts_and_follow_the_seed() -> None:
    _, client, _ = make(seed=1)
    _, same_seed, _ = make(seed=1)
    _, other_seed, _ = make(seed=2)
    ids = [(await client.create(key=f"sk-emu-{i % 2}")).json()["id"] for i in range(4)]
    assert len(set(ids)) == 4
    assert all(len(i) > len("resp_") and int(i[5:], 16) >= 0 for i in ids)
    assert (await same_seed.create()).json()["id"] == ids[0]
    assert (await other_seed.create()).json()["id"] != ids[0]


async def test_store_false_keeps_nothing() -> None:
    app, client, _ = make()
    first = (await client.create(store=False)).json()
    assert first["store"] is False
    assert (await client.request("GET", f"/v1/responses/{first['id']}")).status == 404
    reply = await client.create(previous_response_id=first["id"])
    assert reply.json()["error"]["code"] == "previous_response_not_found"
    assert app.stats()["accounts"]["acct-0"]["stored_responses"] == 0


async def test_a_stored_response_expires_after_its_ttl_even_if_read() -> None:
    # 100 s of emulated time at time_scale 10: 10 real seconds on the app's clock.
    _, client, clock = make(response_ttl_seconds=100.0, time_scale=10.0)
    first = (await client.create()).json()
    clock.now += 9.9
    assert (await client.request("GET", f"/v1/responses/{first['id']}")).status == 200
    assert (await client.create(previous_response_id=first["id"])).status == 200
    clock.now += 0.2
    reply = await client.create(previous_response_id=first["id"])
    assert reply.json()["error"]["code"] == "previous_response_not_found"


async def test_the_least_recently_used_response_goes_first() -> None:
    _, client, _ = make(max_stored_responses_per_account=2)
    first, second = [(await client.create(input=str(i))).json()["id"] for i in range(2)]
    assert (await client.request("GET", f"/v1/responses/{first}")).status == 200
    await client.create(input="third")  # evicts the second, read less recently
    assert (await client.request("GET", f"/v1/responses/{first}")).status == 200
    assert (await client.request("GET", f"/v1/responses/{second}")).status == 404


# --- retrieval, deletion, input items ----------------------------------------------


async def test_get_returns_the_response_and_delete_forgets_it() -> None:
    _, client, _ = make()
    created = await client.create(metadata={"k": "v"}, prompt_cache_key="conv-1")
    response_id = created.json()["id"]
    got = await client.request("GET", f"/v1/responses/{response_id}")
    assert (got.status, got.body) == (200, created.body)
    assert got.json()["metadata"] == {"k": "v"}
    assert got.json()["prompt_cache_key"] == "conv-1"
    gone = await client.request("DELETE", f"/v1/responses/{response_id}")
    assert gone.json() == {"id": response_id, "object": "response.deleted", "deleted": True}
    again = await client.request("DELETE", f"/v1/responses/{response_id}")
    assert again.status == 404
    missing = await client.request("GET", f"/v1/responses/{response_id}")
    assert missing.status == 404
    assert missing.json()["error"]["code"] == "response_not_found"
    assert response_id in missing.json()["error"]["message"]
    reply = await client.create(previous_response_id=response_id)
    assert reply.json()["error"]["code"] == "previous_response_not_found"


async def test_a_continuation_outlives_the_response_it_continued() -> None:
    _, client, _ = make()
    first = (await client.create()).json()
    second = (await client.create(previous_response_id=first["id"])).json()
    await client.request("DELETE", f"/v1/responses/{first['id']}")
    third = (await client.create(previous_response_id=second["id"])).json()
    assert cached(third) >= second["usage"]["input_tokens"] // 128 * 128


async def test_input_items_list_this_responses_input_in_pages() -> None:
    _, client, _ = make()
    items = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "c"}]},
    ]
    response_id = (await client.create(input=items)).json()["id"]
    path = f"/v1/responses/{response_id}/input_items"
    page = (await client.request("GET", path)).json()
    assert page["object"] == "list" and page["has_more"] is False
    data = page["data"]
    assert [item["content"][0]["text"] for item in data] == ["c", "b", "a"]  # newest first
    assert all(item["type"] == "message" and item["status"] == "completed" for item in data)
    assert data[1]["content"][0]["type"] == "output_text"
    assert data[2]["content"][0]["type"] == "input_text"
    assert len({item["id"] for item in data}) == 3
    first = (await client.request("GET", path, query=b"order=asc&limit=2")).json()
    assert [item["content"][0]["text"] for item in first["data"]] == ["a", "b"]
    assert first["has_more"] is True and first["last_id"] == first["data"][1]["id"]
    after = f"order=asc&after={first['last_id']}".encode()
    rest = (await client.request("GET", path, query=after)).json()
    assert [item["content"][0]["text"] for item in rest["data"]] == ["c"]
    assert (await client.request("GET", path, query=b"limit=0")).status == 400
    string = (await client.create(input="plain")).json()["id"]
    listed = (await client.request("GET", f"/v1/responses/{string}/input_items")).json()
    assert listed["data"][0]["role"] == "user"
    assert listed["data"][0]["content"] == [{"type": "input_text", "text": "plain"}]


async def test_paths_and_methods_under_responses() -> None:
    app, client, _ = make()
    assert (await client.request("POST", "/v1/responses/resp_1")).status == 405
    assert (await client.request("DELETE", "/v1/responses/resp_1/input_items")).status == 405
    assert (await client.request("GET", "/v1/responses/resp_1/other")).status == 404
    assert (await client.request("GET", "/v1/responses/")).status == 404
    assert (await client.request("GET", "/v1/responses")).status == 405
    unauthorized = await client.request("GET", "/v1/responses/resp_1", key="sk-wrong")
    assert unauthorized.status == 401
    assert app.stats()["totals"]["requests"] == 0  # reads are not generation requests


# --- streaming ------------------------------------------------------------------------


async def test_stream_events_are_named_numbered_and_end_with_the_stored_response() -> None:
    _, client, _ = make(stream_chunk_tokens=2)
    reply = await client.create(stream=True, max_output_tokens=5)
    assert reply.status == 200
    assert all(chunk.count(b"\n\n") == 1 for chunk in reply.chunks)  # one event per write
    events = reply.events()
    names = [name for name, _ in events]
    assert names == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 3,  # 5 tokens, 2 a chunk
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert all(data["type"] == name for name, data in events)
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    created = events[0][1]["response"]
    assert (created["status"], created["output"], created["usage"]) == ("in_progress", [], None)
    item_id = events[2][1]["item"]["id"]
    deltas = "".join(data["delta"] for name, data in events if name.endswith(".delta"))
    assert all(data.get("item_id", item_id) == item_id for _, data in events[3:-1])
    assert events[7][1]["text"] == deltas
    final = events[-1][1]["response"]
    assert final["status"] == "completed"
    assert text(final) == deltas and len(deltas.split()) == 5
    assert final["usage"]["output_tokens"] == 5
    stored = await client.request("GET", f"/v1/responses/{final['id']}")
    assert stored.json() == final


async def test_a_cut_stream_is_not_stored() -> None:
    config = EmulatorConfig(
        accounts=[AccountSpec("a", "sk-emu-0", faults=FaultSpec(cut_after_chunks=2))],
        latency=NO_LATENCY,
    )
    app, client, _ = make(config)
    with pytest.raises(InjectedStreamCut):
        await client.create(stream=True)
    assert app.stats()["accounts"]["a"]["stored_responses"] == 0


# --- failures -------------------------------------------------------------------------


async def test_invalid_bodies_are_plain_400s() -> None:
    app, client, _ = make()
    for body in (
        {"input": 5},
        {"input": None},
        {"input": ["x"]},
        {"input": [{"role": "user", "content": 1}]},
        {"previous_response_id": 7},
        {"store": "no"},
        {"max_output_tokens": 0},
        {"model": ""},
        {"instructions": ["x"]},
    ):
        reply = await client.create(**body)
        assert reply.status == 400, body
        assert reply.json()["error"]["type"] == "invalid_request_error"
        assert reply.json()["error"]["code"] is None
    stats = app.stats()["accounts"]["acct-0"]
    assert (stats["errors"], stats["response_not_found"]) == (9, 0)


async def test_limits_and_injected_errors_store_nothing() -> None:
    faults = FaultSpec(error_rate=1.0, status=503)
    config = EmulatorConfig(
        accounts=[AccountSpec("a", "sk-emu-0", rpm=1), AccountSpec("b", "sk-emu-1", faults=faults)],
        latency=NO_LATENCY,
    )
    app, client, _ = make(config)
    assert (await client.create()).status == 200
    limited = await client.create()
    assert limited.status == 429
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert (await client.create(key="sk-emu-1")).status == 503
    stats = app.stats()["accounts"]
    assert (stats["a"]["rate_limited"], stats["a"]["stored_responses"]) == (1, 1)
    assert (stats["b"]["faults_injected"], stats["b"]["stored_responses"]) == (1, 0)


# --- the store on its own -------------------------------------------------------------


def test_store_expiry_lru_and_delete() -> None:
    store = ResponseStore(ttl=10.0, max_entries=2)
    one = StoredResponse(b"{}", "a", b"a", None)
    two = StoredResponse(b"{}", "b", b"b", one)
    store.put("r1", one, 0.0)
    store.put("r2", two, 5.0)
    assert two.conversation() == [b"a", b"b"]
    assert store.get("r1", 9.9) is one
    assert store.get("r1", 10.0) is None  # expired: gone, whatever the reads
    assert len(store) == 1
    store.put("r3", one, 6.0)
    store.put("r4", one, 7.0)  # over the bound: the least recently used (r2) goes
    assert store.get("r2", 7.0) is None and store.get("r3", 7.0) is one
    assert store.delete("r3", 8.0) and not store.delete("r3", 8.0)
    store.put("r5", one, 20.0)  # the expired r4 at the cold end goes with the write
    assert len(store) == 1
