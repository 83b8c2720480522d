"""The emulator's Responses API served by real uvicorn, driven by the official openai SDK."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from openai.types.responses import (
    Response,
    ResponseCompletedEvent,
    ResponseStreamEvent,
    ResponseTextDeltaEvent,
)

from gateway.emulator import EmulatorServer, LatencySpec, default_config

FAST = LatencySpec(base_ms=1, prefill_ms_per_1k_uncached=1, decode_ms_per_token=0.2)
LONG = "The quick brown fox jumps over the lazy dog. " * 200  # ~9 KB, ~2,250 tokens
MODEL = "gpt-4o"


@pytest.fixture
async def emulator() -> AsyncIterator[EmulatorServer]:
    async with EmulatorServer(default_config(2, latency=FAST)) as server:
        yield server


def client(server: EmulatorServer, key: str = "sk-emu-0") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


def cached(response: Response) -> int:
    assert response.usage is not None
    return response.usage.input_tokens_details.cached_tokens


def input_tokens(response: Response) -> int:
    assert response.usage is not None
    return response.usage.input_tokens


async def test_a_follow_up_reads_the_conversation_from_its_accounts_cache(
    emulator: EmulatorServer,
) -> None:
    async with client(emulator) as first_account, client(emulator, "sk-emu-1") as second:
        first = await first_account.responses.create(
            model=MODEL, instructions=LONG, input="Summarise."
        )
        follow_up = await first_account.responses.create(
            model=MODEL, instructions=LONG, input="Shorter.", previous_response_id=first.id
        )
        with pytest.raises(openai.BadRequestError) as refused:
            await second.responses.create(
                model=MODEL, instructions=LONG, input="Shorter.", previous_response_id=first.id
            )
    assert first.status == "completed" and first.object == "response"
    assert first.output_text and first.output[0].type == "message"
    assert cached(first) == 0
    assert input_tokens(first) >= 1024
    assert cached(follow_up) >= input_tokens(first) // 128 * 128
    assert cached(follow_up) % 128 == 0
    assert follow_up.previous_response_id == first.id
    assert follow_up.usage is not None
    assert follow_up.usage.total_tokens == input_tokens(follow_up) + follow_up.usage.output_tokens
    assert refused.value.status_code == 400
    assert refused.value.code == "previous_response_not_found"
    assert refused.value.param == "previous_response_id"
    assert first.id in refused.value.message


async def test_streamed_turns_chain_like_the_non_streamed_ones(emulator: EmulatorServer) -> None:
    async with client(emulator) as api:
        stream = await api.responses.create(
            model=MODEL, instructions=LONG, input="Summarise.", stream=True, max_output_tokens=20
        )
        events: list[ResponseStreamEvent] = [event async for event in stream]
        completed = events[-1]
        assert isinstance(completed, ResponseCompletedEvent)
        first = completed.response
        async with api.responses.stream(
            model=MODEL, instructions=LONG, input="Shorter.", previous_response_id=first.id
        ) as helper:
            deltas = [e.delta async for e in helper if isinstance(e, ResponseTextDeltaEvent)]
            second = await helper.get_final_response()
        stored = await api.responses.retrieve(second.id)
    assert [e.type for e in events[:4]] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if isinstance(e, ResponseTextDeltaEvent))
    assert text == first.output_text and len(text.split()) == 20
    assert first.usage is not None and first.usage.output_tokens == 20
    assert "".join(deltas) == second.output_text
    assert cached(second) >= input_tokens(first) // 128 * 128 > 0
    assert stored.output_text == second.output_text
    assert stored.usage == second.usage


async def test_stream_on_another_account_fails_before_any_event(emulator: EmulatorServer) -> None:
    async with client(emulator) as api, client(emulator, "sk-emu-1") as other:
        first = await api.responses.create(model=MODEL, input="Hello.")
        with pytest.raises(openai.BadRequestError) as refused:
            await other.responses.create(
                model=MODEL, input="Again.", previous_response_id=first.id, stream=True
            )
    assert refused.value.code == "previous_response_not_found"


async def test_stats_count_responses_and_refusals(emulator: EmulatorServer) -> None:
    async with client(emulator) as api, client(emulator, "sk-emu-1") as other:
        first = await api.responses.create(model=MODEL, instructions=LONG, input="One.")
        await api.responses.create(
            model=MODEL, instructions=LONG, input="Two.", previous_response_id=first.id
        )
        for _ in range(2):
            with pytest.raises(openai.BadRequestError):
                await other.responses.create(
                    model=MODEL, input="Three.", previous_response_id=first.id
                )
    async with aiohttp.ClientSession() as http, http.get(f"{emulator.url}/stats") as reply:
        stats: dict[str, Any] = await reply.json()
    mine, theirs = stats["accounts"]["acct-0"], stats["accounts"]["acct-1"]
    assert (mine["requests"], mine["stored_responses"], mine["response_not_found"]) == (2, 2, 0)
    assert mine["cached_tokens"] >= 1024
    assert (theirs["requests"], theirs["errors"], theirs["response_not_found"]) == (2, 2, 2)
    assert stats["totals"]["response_not_found"] == 2


async def test_sync_client_retrieves_lists_and_deletes(emulator: EmulatorServer) -> None:
    def run() -> tuple[Response, Response, list[Any], type[Exception] | None]:
        with openai.OpenAI(base_url=f"{emulator.url}/v1", api_key="sk-emu-0", max_retries=0) as api:
            created = api.responses.create(
                model=MODEL,
                input=[
                    {"role": "user", "content": "What is 6 x 7?"},
                    {"type": "function_call", "call_id": "c1", "name": "mul", "arguments": "{}"},
                    {"type": "function_call_output", "call_id": "c1", "output": "42"},
                ],
                tools=[{"type": "function", "name": "mul", "parameters": {}, "strict": False}],
                metadata={"trace": "t1"},
            )
            got = api.responses.retrieve(created.id)
            items = list(api.responses.input_items.list(created.id, order="asc"))
            api.responses.delete(created.id)
            try:
                api.responses.retrieve(created.id)
            except openai.NotFoundError as exc:
                return created, got, items, type(exc)
            return created, got, items, None

    created, got, items, error = await asyncio.to_thread(run)
    assert got.id == created.id and got.output_text == created.output_text
    assert got.metadata == {"trace": "t1"}
    assert [item.type for item in items] == ["message", "function_call", "function_call_output"]
    assert len({item.id for item in items}) == 3
    assert error is openai.NotFoundError
