"""The OpenAI Responses wire format (``/v1/responses``), as the official SDK parses it.

A turn's prompt is, in cache order, its tools, its instructions, then the conversation:
with ``previous_response_id``, the stored conversation of that response (every earlier
turn's input and output) followed by the new input. Consecutive turns therefore share a
growing prefix on the account that holds the chain; any other account has never heard
of the id and answers 400 ``previous_response_not_found``, as the real API does.

Auth, errors, rate-limit headers and the 128-token block cache are the chat dialect's.
A completed response is stored on its account (unless ``store`` is false) while its last
bytes are built, before they are sent, so a follow-up sent the moment the client has
them finds it; a response cut short or abandoned is never stored.

A stream carries the real events, each named and numbered (``sequence_number``):
response.created, response.in_progress, response.output_item.added,
response.content_part.added, response.output_text.delta (one per chunk),
response.output_text.done, response.content_part.done, response.output_item.done,
response.completed (the whole response, with usage).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import orjson
import xxhash

from gateway.emulator.dialect import Generation, Usage, output_limit
from gateway.emulator.openai_wire import OpenAIDialect, error_body
from gateway.emulator.prompt import (
    ASSISTANT,
    Prompt,
    PromptError,
    responses_head,
    responses_input,
    responses_seed,
)
from gateway.emulator.stored import ResponseStore, StoredResponse

_DEFAULT_TEXT = {"format": {"type": "text"}, "verbosity": "medium"}
_NO_REASONING = {"effort": None, "summary": None}
_MAX_PAGE = 100
# Input item id prefixes by item type, as the real API numbers them.
_ITEM_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}


class PreviousResponseNotFound(PromptError):
    """``previous_response_id`` names no response stored on this account."""

    def __init__(self, response_id: str) -> None:
        super().__init__(f"Previous response with id '{response_id}' not found.")
        self.body = error_body(
            400, str(self), param="previous_response_id", code="previous_response_not_found"
        )


@dataclass(slots=True)
class Turn(Generation):
    """A parsed Responses request, with what it needs to finish and be stored.

    skeleton: the response object in progress (no output, no usage).
    input: the request's ``input`` as sent; serialised_input: as the prompt has it.
    previous: the stored response this turn continues.
    store: where the completed response goes; None when ``store`` is false.
    created: the request's time on the app's clock; the stored response's TTL starts here.
    sequence: the next stream event's ``sequence_number``.
    """

    message_id: str
    skeleton: dict[str, Any]
    input: Any
    serialised_input: bytes
    previous: StoredResponse | None
    store: ResponseStore | None
    created: float
    sequence: int = 0


def _turn(gen: Generation) -> Turn:
    assert isinstance(gen, Turn), "the Responses dialect serves only its own requests"
    return gen


def usage_object(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        # OpenAI does not bill writes to its automatic cache (chat completions report none).
        "input_tokens_details": {"cached_tokens": usage.read_tokens, "cache_write_tokens": 0},
        "output_tokens": usage.output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.prompt_tokens + usage.output_tokens,
    }


def _text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}


def _message(message_id: str, status: str, content: list[Any]) -> dict[str, Any]:
    return {
        "id": message_id,
        "type": "message",
        "status": status,
        "content": content,
        "role": "assistant",
    }


def _event(turn: Turn, kind: str, fields: dict[str, Any]) -> bytes:
    sequence = turn.sequence
    turn.sequence = sequence + 1
    payload = {"type": kind, "sequence_number": sequence, **fields}
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def _response_event(turn: Turn, kind: str, response: bytes) -> bytes:
    """An event carrying a whole response object, already serialised (it may be large:
    it repeats the instructions and tools)."""
    sequence = turn.sequence
    turn.sequence = sequence + 1
    name = kind.encode()
    head = b'{"type":"%s","sequence_number":%d,"response":' % (name, sequence)
    return b"event: " + name + b"\ndata: " + head + response + b"}\n\n"


def _echo(body: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any) -> Any:
    """A request field the response object repeats; the API default when unset."""
    value = body.get(key)
    if value is None:
        return default
    # A bool is an int to Python, never to the API.
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
        raise PromptError(f"{key}: invalid type")
    return value


class ResponsesDialect(OpenAIDialect):
    """The chat dialect's auth, errors, limits and cache, with the Responses bodies.

    seed: the emulator's seed, which goes into every response id so that emulators with
    different seeds never hand out the same id.
    """

    name = "openai-responses"

    def __init__(self, seed: int) -> None:
        self._id_prefix = f"{xxhash.xxh3_64_intdigest(b'responses %d' % seed):016x}"

    def parse(
        self,
        body: dict[str, Any],
        *,
        rid: str,
        default_tokens: int,
        max_tokens: int,
        stored: ResponseStore,
        now: float,
    ) -> Turn:
        seed = responses_seed(body)
        head = responses_head(body)
        value = body.get("input")
        previous_id = body.get("previous_response_id")
        if previous_id is not None and not isinstance(previous_id, str):
            raise PromptError("previous_response_id: a string is required")
        if value is None and previous_id is None:
            raise PromptError("Missing required parameter: 'input'.")
        serialised = responses_input(value) if value is not None else b""
        limit = output_limit(body, "max_output_tokens")
        store = _echo(body, "store", bool, True)
        serial = rid[3:]  # rid is "emu" and 20 hex digits, unique within the emulator
        response_id = f"resp_{self._id_prefix}{serial}"
        skeleton = {
            "id": response_id,
            "object": "response",
            "created_at": int(time.time()),
            "status": "in_progress",
            "background": False,
            "completed_at": None,
            "error": None,
            "incomplete_details": None,
            "instructions": body.get("instructions"),
            "max_output_tokens": limit,
            "max_tool_calls": _echo(body, "max_tool_calls", int, None),
            "model": body["model"],
            "output": [],
            "parallel_tool_calls": _echo(body, "parallel_tool_calls", bool, True),
            "previous_response_id": previous_id,
            "prompt_cache_key": _echo(body, "prompt_cache_key", str, None),
            "reasoning": _NO_REASONING,
            "safety_identifier": _echo(body, "safety_identifier", str, None),
            "service_tier": "default",
            "store": store,
            "temperature": _echo(body, "temperature", (int, float), 1.0),
            "text": _echo(body, "text", dict, _DEFAULT_TEXT),
            "tool_choice": _echo(body, "tool_choice", (str, dict), "auto"),
            "tools": body.get("tools") or [],
            "top_logprobs": _echo(body, "top_logprobs", int, 0),
            "top_p": _echo(body, "top_p", (int, float), 1.0),
            "truncation": _echo(body, "truncation", str, "disabled"),
            "usage": None,
            "user": _echo(body, "user", str, None),
            "metadata": _echo(body, "metadata", dict, {}),
        }
        # Looked up last, like the real API: a malformed body is a plain 400 first.
        previous = None
        if previous_id is not None:
            previous = stored.get(previous_id, now)
            if previous is None:
                raise PreviousResponseNotFound(previous_id)
        if previous is None:
            data = head + serialised
        else:
            data = b"".join((head, *previous.conversation(), serialised))
        return Turn(
            id=response_id,
            model=body["model"],
            prompt=Prompt(data, seed),
            stream=body.get("stream") is True,
            include_usage=True,
            output_tokens=min(limit, max_tokens) if limit is not None else default_tokens,
            message_id=f"msg_{self._id_prefix}{serial}",
            skeleton=skeleton,
            input=value,
            serialised_input=serialised,
            previous=previous,
            store=stored if store else None,
            created=now,
        )

    def _complete(self, turn: Turn, usage: Usage, text: str) -> bytes:
        """The completed response object, stored on the account unless store is false."""
        body = orjson.dumps(
            {
                **turn.skeleton,
                "status": "completed",
                "completed_at": int(time.time()),
                "output": [_message(turn.message_id, "completed", [_text(text)])],
                "usage": usage_object(usage),
            }
        )
        if turn.store is not None:
            conversation = turn.serialised_input + ASSISTANT + text.encode()
            stored = StoredResponse(body, turn.input, conversation, turn.previous)
            turn.store.put(turn.id, stored, turn.created)
        return body

    def response(self, gen: Generation, usage: Usage, tokens: Sequence[str]) -> bytes:
        return self._complete(_turn(gen), usage, "".join(tokens))

    def stream_head(self, gen: Generation, usage: Usage) -> list[bytes]:
        turn = _turn(gen)
        item_id = turn.message_id
        started = orjson.dumps(turn.skeleton)
        return [
            _response_event(turn, "response.created", started),
            _response_event(turn, "response.in_progress", started),
            _event(
                turn,
                "response.output_item.added",
                {"output_index": 0, "item": _message(item_id, "in_progress", [])},
            ),
            _event(
                turn,
                "response.content_part.added",
                {"item_id": item_id, "output_index": 0, "content_index": 0, "part": _text("")},
            ),
        ]

    def stream_chunk(self, gen: Generation, text: str) -> bytes:
        turn = _turn(gen)
        fields = {
            "item_id": turn.message_id,
            "output_index": 0,
            "content_index": 0,
            "delta": text,
            "logprobs": [],
        }
        return _event(turn, "response.output_text.delta", fields)

    def stream_tail(self, gen: Generation, usage: Usage, tokens: Sequence[str]) -> list[bytes]:
        turn = _turn(gen)
        item_id = turn.message_id
        text = "".join(tokens)
        part = _text(text)
        where = {"item_id": item_id, "output_index": 0, "content_index": 0}
        events = [
            _event(turn, "response.output_text.done", {**where, "text": text, "logprobs": []}),
            _event(turn, "response.content_part.done", {**where, "part": part}),
            _event(
                turn,
                "response.output_item.done",
                {"output_index": 0, "item": _message(item_id, "completed", [part])},
            ),
        ]
        body = self._complete(turn, usage, text)
        events.append(_response_event(turn, "response.completed", body))
        return events


# --- the stored-response endpoints ---------------------------------------------------


def not_found(response_id: str) -> bytes:
    """404 for an id this account does not hold (never stored, expired, deleted)."""
    return error_body(
        404,
        f"Response with id '{response_id}' not found.",
        param="response_id",
        code="response_not_found",
    )


def deleted(response_id: str) -> bytes:
    return orjson.dumps({"id": response_id, "object": "response.deleted", "deleted": True})


def _input_item(item: Any, item_id: str) -> dict[str, Any]:
    """An input item as the API lists it: typed, with an id and a status."""
    if not isinstance(item, dict):  # validated when the response was created
        return {"id": item_id, "type": "message", "role": "user", "content": []}
    kind = item.get("type", "message")
    if kind != "message":
        return {"id": item_id, "status": "completed", **item}
    role = item.get("role")
    content = item.get("content")
    if isinstance(content, str):
        part = _text(content) if role == "assistant" else {"type": "input_text", "text": content}
        content = [part]
    return {
        "id": item.get("id") or item_id,
        "type": "message",
        "role": role,
        "content": content,
        "status": item.get("status") or "completed",
    }


def input_items(response_id: str, stored: StoredResponse, query: bytes) -> bytes:
    """``GET /v1/responses/{id}/input_items``: this response's own input, paged by
    ``order`` (default desc), ``limit`` (default 20) and ``after`` (an item id)."""
    params = parse_qs(query.decode("latin-1"))
    order = params.get("order", ["desc"])[-1]
    if order not in ("asc", "desc"):
        raise PromptError("order: must be 'asc' or 'desc'")
    try:
        limit = int(params.get("limit", ["20"])[-1])
    except ValueError:
        limit = 0
    if not 1 <= limit <= _MAX_PAGE:
        raise PromptError(f"limit: an integer from 1 to {_MAX_PAGE} is required")
    value = stored.input
    raw = [{"role": "user", "content": value}] if isinstance(value, str) else value or []
    serial = response_id.removeprefix("resp_")
    items = []
    for index, item in enumerate(raw):
        kind = item.get("type", "message") if isinstance(item, dict) else "message"
        prefix = _ITEM_PREFIX.get(kind, "item")
        items.append(_input_item(item, f"{prefix}_{serial}{index:04x}"))
    if order == "desc":
        items.reverse()
    after = params.get("after", [None])[-1]
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    page = items[:limit]
    return orjson.dumps(
        {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(items) > limit,
        }
    )
