"""OpenAI Responses API through the gateway: a follow-up with previous_response_id must
reach the account that created the response, on a pool of four."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import Emulator, GatewayHandle

INSTRUCTIONS = "You are a careful coding agent. Follow the repository's conventions. " * 60


def client(gw: GatewayHandle) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.key, max_retries=0)


@pytest.mark.parametrize("stream", [False, True])
def test_follow_ups_reach_the_owner_every_time(
    gateway: GatewayHandle, emulator: Emulator, stream: bool
) -> None:
    c = client(gateway)
    before = emulator.stats()["totals"].get("response_not_found", 0)
    ok = 0
    for i in range(50 if stream else 100):
        # Distinct conversations, so rendezvous spreads the first turns over the pool.
        first = c.responses.create(
            model="gpt-4o-mini",
            instructions=f"Project {i}. " + INSTRUCTIONS,
            input=f"task {i}: list the files",
            max_output_tokens=4,
        )
        if stream:
            events = list(
                c.responses.create(
                    model="gpt-4o-mini",
                    previous_response_id=first.id,
                    input="now open the first one",
                    max_output_tokens=4,
                    stream=True,
                )
            )
            done = [e for e in events if e.type == "response.completed"]
            ok += len(done) == 1 and done[0].response.usage is not None
        else:
            second = c.responses.create(
                model="gpt-4o-mini",
                previous_response_id=first.id,
                input="now open the first one",
                max_output_tokens=4,
            )
            ok += bool(second.output_text)
    assert ok == (50 if stream else 100)
    assert emulator.stats()["totals"].get("response_not_found", 0) == before


def test_follow_ups_are_spread_over_the_pool_and_hit_the_cache(gateway: GatewayHandle) -> None:
    c = client(gateway)
    accounts = set()
    for i in range(12):
        raw = c.responses.with_raw_response.create(
            model="gpt-4o-mini",
            instructions=f"Agent {i}. " + INSTRUCTIONS,
            input="hi",
            max_output_tokens=2,
        )
        first = raw.parse()
        accounts.add(raw.headers["x-upstream-account"])
        # Instructions are not carried over by previous_response_id: agents send them again.
        follow = c.responses.with_raw_response.create(
            model="gpt-4o-mini",
            instructions=f"Agent {i}. " + INSTRUCTIONS,
            previous_response_id=first.id,
            input="and then?",
            max_output_tokens=2,
        )
        assert follow.headers["x-upstream-account"] == raw.headers["x-upstream-account"]
        usage = follow.parse().usage
        assert usage is not None and usage.input_tokens_details.cached_tokens >= 1024
    assert len(accounts) >= 3


def test_unknown_previous_response_is_a_clear_400(gateway: GatewayHandle) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client(gateway).responses.create(
            model="gpt-4o-mini",
            previous_response_id="resp_never_seen",
            input="x",
            max_output_tokens=2,
        )
    assert info.value.code == "previous_response_not_found"


def test_get_and_delete_go_to_the_owner_and_only_for_its_token(gateway: GatewayHandle) -> None:
    c = client(gateway)
    created = c.responses.create(model="gpt-4o-mini", input="keep me", max_output_tokens=2)
    fetched = c.responses.retrieve(created.id)
    assert fetched.id == created.id
    stranger = openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-other", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        stranger.responses.retrieve(created.id)
    with pytest.raises(openai.BadRequestError):  # nor continue it
        stranger.responses.create(
            model="gpt-4o-mini",
            previous_response_id=created.id,
            input="mine now",
            max_output_tokens=2,
        )
    c.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(created.id)
