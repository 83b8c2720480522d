"""Canonical prompt serialisation: the text a provider's prompt cache sees.

Order is the providers' cache order: tools, then system (Responses: instructions), then
the messages (Responses: the conversation); for each message its role and content.
Text goes in verbatim (so the token estimate tracks the text), anything structured as
sorted-key JSON, images and files by a hash of their data.
Anthropic prompts also record where each content block ends and which ends carry a
``cache_control`` breakpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
import xxhash

_hash = xxhash.xxh3_64_intdigest
_SORTED = orjson.OPT_SORT_KEYS
MAX_BREAKPOINTS = 4  # the Anthropic API rejects more


class PromptError(ValueError):
    """The body is not a valid prompt; rendered as a 400 in the caller's format."""


def estimate_tokens(nbytes: int) -> int:
    """The emulator's tokenizer: four UTF-8 bytes a token, rounded up."""
    return (nbytes + 3) // 4


@dataclass(slots=True)
class Prompt:
    """A serialised prompt.

    seed: starts the cache hash chain; it separates providers and models, whose caches
        never share entries.
    boundaries: byte offsets where content blocks end (Anthropic only).
    breakpoints: (index into boundaries, wants the 1h TTL) per ``cache_control``.
    """

    data: bytes
    seed: int
    boundaries: list[int] = field(default_factory=list)
    breakpoints: list[tuple[int, bool]] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return estimate_tokens(len(self.data))

    def digest(self) -> int:
        """Hash of the whole prompt, which seeds the deterministic output."""
        return _hash(self.data, self.seed)


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise PromptError("model: a non-empty string is required")
    return model


def _messages(body: dict[str, Any]) -> list[Any]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise PromptError("messages: a non-empty array is required")
    return messages


def _role(message: Any, index: int) -> bytes:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise PromptError(f"messages.{index}: an object with a string role is required")
    role: str = message["role"]
    return b"\n<|" + role.encode() + b"|>\n"


def _opaque(kind: bytes, value: Any) -> bytes:
    """Binary-ish content (images, audio, files) enters the prompt as a hash."""
    raw: bytes = value.encode() if isinstance(value, str) else orjson.dumps(value, option=_SORTED)
    return b"<" + kind + b":" + b"%016x" % _hash(raw) + b">"


# --- OpenAI chat completions -------------------------------------------------------

_OPENAI_OPAQUE = {"image_url": b"image", "input_audio": b"audio", "file": b"file"}
_OPENAI_MESSAGE_EXTRAS = ("name", "tool_calls", "tool_call_id", "function_call")


def _openai_part(part: Any) -> bytes:
    if isinstance(part, dict):
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            return part["text"].encode()  # type: ignore[no-any-return]
        if kind in _OPENAI_OPAQUE:
            return _opaque(_OPENAI_OPAQUE[kind], part.get(kind))
    return orjson.dumps(part, option=_SORTED)


def openai_prompt(body: dict[str, Any]) -> Prompt:
    """Serialise a chat-completions request body."""
    seed = _hash(b"openai\0" + _model(body).encode())
    parts: list[bytes] = []
    tools = body.get("tools")
    if tools:
        parts.append(b"<|tools|>" + orjson.dumps(tools, option=_SORTED))
    for index, message in enumerate(_messages(body)):
        parts.append(_role(message, index))
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content.encode())
        elif isinstance(content, list):
            parts.extend(_openai_part(part) for part in content)
        elif content is not None:
            raise PromptError(f"messages.{index}.content: a string or an array is required")
        if len(message) > 2:
            extras = {key: message[key] for key in _OPENAI_MESSAGE_EXTRAS if key in message}
            if extras:
                parts.append(orjson.dumps(extras, option=_SORTED))
    return Prompt(b"".join(parts), seed)


# --- OpenAI responses ------------------------------------------------------------------
#
# A turn serialises like chat messages (role marker, then content), so a message replayed
# by the client and the same message recalled through previous_response_id are the same
# bytes. Item ids and statuses never reach the model; other items (function calls and
# their outputs, reasoning...) go in as sorted-key JSON under their type.

_RESPONSES_TEXT = ("input_text", "output_text")
_RESPONSES_OPAQUE = {"input_image": b"image", "input_file": b"file", "input_audio": b"audio"}
_RESPONSES_UNSEEN = frozenset(("id", "status", "type"))
ASSISTANT = b"\n<|assistant|>\n"


def responses_seed(body: dict[str, Any]) -> int:
    """The cache chain seed of a Responses request: the chat one, per model."""
    return _hash(b"openai\0" + _model(body).encode())


def responses_head(body: dict[str, Any]) -> bytes:
    """What precedes the conversation: tools, then instructions (never carried over)."""
    parts: list[bytes] = []
    tools = body.get("tools")
    if tools:
        if not isinstance(tools, list):
            raise PromptError("tools: an array is required")
        parts.append(b"<|tools|>" + orjson.dumps(tools, option=_SORTED))
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        parts.append(b"\n<|system|>\n" + instructions.encode())
    elif instructions is not None:
        raise PromptError("instructions: a string is required")
    return b"".join(parts)


def _responses_part(part: Any) -> bytes:
    if isinstance(part, dict):
        kind = part.get("type")
        if kind in _RESPONSES_TEXT and isinstance(part.get("text"), str):
            return part["text"].encode()  # type: ignore[no-any-return]
        if kind in _RESPONSES_OPAQUE:
            source = {k: v for k, v in part.items() if k not in ("type", "detail")}
            return _opaque(_RESPONSES_OPAQUE[kind], source)
    return orjson.dumps(part, option=_SORTED)


def responses_input(value: Any) -> bytes:
    """Serialise a turn's ``input``: a string (one user message) or input items."""
    if isinstance(value, str):
        return b"\n<|user|>\n" + value.encode()
    if not isinstance(value, list):
        raise PromptError("input: a string or an array of input items is required")
    parts: list[bytes] = []
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise PromptError(f"input.{index}: an input item object is required")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if not isinstance(role, str):
                raise PromptError(f"input.{index}.role: a string is required")
            parts.append(b"\n<|" + role.encode() + b"|>\n")
            content = item.get("content")
            if isinstance(content, str):
                parts.append(content.encode())
            elif isinstance(content, list):
                parts.extend(_responses_part(part) for part in content)
            else:
                raise PromptError(f"input.{index}.content: a string or an array is required")
        elif isinstance(kind, str):
            seen = {k: v for k, v in item.items() if k not in _RESPONSES_UNSEEN}
            parts.append(b"\n<|" + kind.encode() + b"|>\n" + orjson.dumps(seen, option=_SORTED))
        else:
            raise PromptError(f"input.{index}.type: a string is required")
    return b"".join(parts)


# --- Anthropic messages ------------------------------------------------------------


class _Blocks:
    """Accumulates content blocks, their end offsets and their breakpoints."""

    __slots__ = ("boundaries", "breakpoints", "offset", "parts")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.offset = 0
        self.boundaries: list[int] = []
        self.breakpoints: list[tuple[int, bool]] = []

    def text(self, data: bytes) -> None:
        """Bytes that belong to the next block (role markers)."""
        self.parts.append(data)
        self.offset += len(data)

    def block(self, data: bytes, cache_control: Any, where: str) -> None:
        self.text(data)
        self.boundaries.append(self.offset)
        if cache_control is not None:
            self.breakpoint(len(self.boundaries) - 1, cache_control, where)

    def breakpoint(self, index: int, cache_control: Any, where: str) -> None:
        if not isinstance(cache_control, dict) or cache_control.get("type") != "ephemeral":
            raise PromptError(f"{where}.cache_control: type must be 'ephemeral'")
        ttl = cache_control.get("ttl", "5m")
        if ttl not in ("5m", "1h"):
            raise PromptError(f"{where}.cache_control.ttl: must be '5m' or '1h'")
        self.breakpoints.append((index, ttl == "1h"))


def _anthropic_block(block: Any, where: str) -> bytes:
    if not isinstance(block, dict):
        raise PromptError(f"{where}: a content block object is required")
    kind = block.get("type")
    if kind == "text":
        if not isinstance(block.get("text"), str):
            raise PromptError(f"{where}.text: a string is required")
        return block["text"].encode()  # type: ignore[no-any-return]
    if kind in ("image", "document"):
        return _opaque(kind.encode(), block.get("source"))
    if kind == "tool_result" and isinstance(block.get("content"), list):
        inner = [
            _anthropic_block(b, f"{where}.content.{i}") for i, b in enumerate(block["content"])
        ]
        head = {k: v for k, v in block.items() if k not in ("content", "cache_control")}
        return orjson.dumps(head, option=_SORTED) + b"".join(inner)
    if "cache_control" in block:
        block = {k: v for k, v in block.items() if k != "cache_control"}
    return orjson.dumps(block, option=_SORTED)


def anthropic_prompt(body: dict[str, Any]) -> Prompt:
    """Serialise a messages request body, with its block ends and breakpoints."""
    seed = _hash(b"anthropic\0" + _model(body).encode())
    messages = _messages(body)
    blocks = _Blocks()
    tools = body.get("tools") or []
    if not isinstance(tools, list):
        raise PromptError("tools: an array is required")
    for i, tool in enumerate(tools):
        where = f"tools.{i}"
        if not isinstance(tool, dict):
            raise PromptError(f"{where}: an object is required")
        clean = {k: v for k, v in tool.items() if k != "cache_control"}
        blocks.block(orjson.dumps(clean, option=_SORTED), tool.get("cache_control"), where)
    system = body.get("system")
    if system:
        blocks.text(b"<|system|>\n")
        if isinstance(system, str):
            blocks.block(system.encode(), None, "system")
        elif isinstance(system, list):
            for i, block in enumerate(system):
                where = f"system.{i}"
                blocks.block(_anthropic_block(block, where), block.get("cache_control"), where)
        else:
            raise PromptError("system: a string or an array of text blocks is required")
    for index, message in enumerate(messages):
        blocks.text(_role(message, index))
        content = message.get("content")
        if isinstance(content, str):
            blocks.block(content.encode(), None, f"messages.{index}")
        elif isinstance(content, list) and content:
            for i, block in enumerate(content):
                where = f"messages.{index}.content.{i}"
                blocks.block(_anthropic_block(block, where), block.get("cache_control"), where)
        else:
            raise PromptError(f"messages.{index}.content: a string or a non-empty array")
    if body.get("cache_control") is not None:
        # A top-level cache_control is automatic caching: a breakpoint at the prompt's end.
        blocks.breakpoint(len(blocks.boundaries) - 1, body["cache_control"], "cache_control")
    if len(blocks.breakpoints) > MAX_BREAKPOINTS:
        raise PromptError(
            f"A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided. "
            f"Found {len(blocks.breakpoints)}."
        )
    blocks.breakpoints.sort()
    return Prompt(b"".join(blocks.parts), seed, blocks.boundaries, blocks.breakpoints)
