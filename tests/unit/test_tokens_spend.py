"""Token spend: counted by the replica at once, shared through the store in batches."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping

import pytest

from gateway import tokens
from gateway.tokens import MemoryTokenStore, RedisTokenStore, Tokens, TokenSpec, periods
from tests.conftest import RedisServer

SECRET = "s" * 32
TIGHT = TokenSpec(name="tight", key_hash="00", group="default", budget_usd_day=1.0).principal()


class CountingStore(MemoryTokenStore):
    """The memory store, counting add_spend calls; it can be made to fail."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict[str, float]] = []
        self.failing = False

    async def add_spend(self, spent: Mapping[str, float], day: str, month: str) -> None:
        if self.failing:
            raise ConnectionError("store down")
        self.calls.append(dict(spent))
        await super().add_spend(spent, day, month)


@pytest.fixture(autouse=True)
def quick_share(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens, "SHARE_DELAY", 0.01)


async def test_spend_counts_here_at_once_and_is_shared_in_one_batch() -> None:
    store = CountingStore()
    one, two = Tokens(SECRET, {}, store), Tokens(SECRET, {}, store)  # two replicas
    for usd in (0.25, 0.25, 0.5):
        await one.spent("tight", usd)
    assert one.over_budget(TIGHT) == "daily"  # no wait for the store
    assert store.calls == []
    await asyncio.sleep(0.05)
    assert store.calls == [{"tight": 1.0}]  # three requests, one call
    await two.refresh()
    assert two.over_budget(TIGHT) == "daily"
    assert await store.spend(*periods()) == {"tight": (1.0, 1.0)}


async def test_a_failed_share_is_kept_for_the_next_batch() -> None:
    store = CountingStore()
    one = Tokens(SECRET, {}, store)
    store.failing = True
    await one.spent("tight", 0.5)
    await asyncio.sleep(0.05)
    assert store.calls == []
    store.failing = False
    await one.spent("tight", 0.25)
    await asyncio.sleep(0.05)
    assert store.calls == [{"tight": 0.75}]


async def test_close_shares_what_is_pending() -> None:
    store = CountingStore()
    one = Tokens(SECRET, {}, store)
    await one.spent("tight", 0.5)
    await one.aclose()
    assert store.calls == [{"tight": 0.5}]


async def test_redis_store_adds_a_batch_of_tokens(redis_server: RedisServer) -> None:
    store = RedisTokenStore(redis_server.url, prefix=f"t{uuid.uuid4().hex[:8]}")
    try:
        day, month = periods()
        await store.add_spend({"a": 0.5, "b": 2.0}, day, month)
        await store.add_spend({"a": 0.25}, day, month)
        assert await store.spend(day, month) == {"a": (0.75, 0.75), "b": (2.0, 2.0)}
    finally:
        await store.aclose()
