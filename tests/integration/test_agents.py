"""What coding agents rely on: session headers as conversation keys, token counting."""

from __future__ import annotations

import anthropic
import openai
import pytest

from gateway.presets import emulated_config
from tests.conftest import Emulator, GatewayHandle, LoopThread, start_gateway


@pytest.fixture(scope="module")
def session_gateway(loop_thread: LoopThread, emulator: Emulator):  # type: ignore[no-untyped-def]
    handle = start_gateway(loop_thread, emulated_config(emulator.url, affinity="session"))
    yield handle
    handle.stop()


@pytest.mark.parametrize(
    "header", ["x-claude-code-session-id", "session_id", "conversation_id", "x-session-id"]
)
def test_session_header_keeps_a_conversation_on_one_account(
    session_gateway: GatewayHandle, header: str
) -> None:
    """Each turn here is a different short prompt: only the session key ties them."""
    for n in range(6):
        c = openai.OpenAI(
            base_url=session_gateway.url + "/v1",
            api_key=session_gateway.key,
            max_retries=0,
            default_headers={header: f"agent-session-{header}-{n}"},
        )
        homes = set()
        for turn in range(5):
            raw = c.chat.completions.with_raw_response.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": f"turn {turn} {n}"}],
                max_tokens=1,
            )
            homes.add(raw.headers["x-upstream-account"])
        assert len(homes) == 1


def test_sessions_spread_over_the_pool(session_gateway: GatewayHandle) -> None:
    homes = set()
    for n in range(24):
        c = openai.OpenAI(
            base_url=session_gateway.url + "/v1",
            api_key=session_gateway.key,
            max_retries=0,
            default_headers={"x-claude-code-session-id": f"spread-{n}"},
        )
        raw = c.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=1
        )
        homes.add(raw.headers["x-upstream-account"])
    assert len(homes) >= 3


def test_count_tokens_passes_through_and_is_not_billed(
    gateway: GatewayHandle, emulator: Emulator
) -> None:
    c = anthropic.Anthropic(base_url=gateway.url, api_key=gateway.key, max_retries=0)
    before = emulator.stats()["totals"]["requests"]
    counted = c.messages.count_tokens(
        model="claude-sonnet-4-6",
        messages=[{"role": "user", "content": "count these words please " * 50}],
    )
    assert counted.input_tokens > 100
    # Token counting is not a completion: no completion request reached a provider.
    assert emulator.stats()["totals"]["requests"] == before
