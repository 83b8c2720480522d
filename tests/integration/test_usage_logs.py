"""The usage log: one record per request, each token reading only its own."""

from __future__ import annotations

import time

import aiohttp
import openai
import orjson

from gateway.savings import fetch_all
from gateway.usagelog import Query, RedisUsageLog, UsageRecord
from tests.conftest import GatewayHandle, RedisServer


async def _logs(gw: GatewayHandle, key: str, query: str = "") -> dict[str, object]:
    async with (
        aiohttp.ClientSession() as s,
        s.get(gw.url + "/v1/usage/logs" + query, headers={"authorization": f"Bearer {key}"}) as r,
    ):
        assert r.status == 200, await r.text()
        doc: dict[str, object] = orjson.loads(await r.read())
        return doc


def _call(gw: GatewayHandle, key: str, text: str) -> str:
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": text}], max_tokens=3
    )
    return raw.headers["x-request-id"]


async def test_each_token_reads_only_its_own_records(gateway: GatewayHandle) -> None:
    mine = _call(gateway, "sk-demo", "from demo")
    theirs = _call(gateway, "sk-other", "from other")
    demo = await _logs(gateway, "sk-demo", "?limit=1000")
    other = await _logs(gateway, "sk-other", "?limit=1000")
    demo_ids = {r["request_id"] for r in demo["data"]}  # type: ignore[attr-defined]
    other_ids = {r["request_id"] for r in other["data"]}  # type: ignore[attr-defined]
    assert mine in demo_ids and mine not in other_ids
    assert theirs in other_ids and theirs not in demo_ids
    assert {r["token"] for r in demo["data"]} == {"demo"}  # type: ignore[attr-defined]
    # Asking for another token's records is not a way around it.
    sneaky = await _logs(gateway, "sk-other", "?token=demo&limit=1000")
    assert {r["token"] for r in sneaky["data"]} <= {"other"}  # type: ignore[attr-defined]


async def test_record_carries_usage_cost_and_routing(gateway: GatewayHandle) -> None:
    rid = _call(gateway, "sk-demo", "a record please " * 10)
    doc = await _logs(gateway, "sk-demo", "?model=gpt-4o-mini&limit=1000")
    record = next(r for r in doc["data"] if r["request_id"] == rid)  # type: ignore[attr-defined]
    assert record["status"] == 200
    assert record["prompt_tokens"] > 0 and record["completion_tokens"] > 0
    assert record["cost"] > 0
    assert record["account"].startswith("openai-")
    assert record["decision"] in {"longest_match", "rendezvous", "spill_headroom", "hot_spread"}
    assert record["attempts"] == 1
    assert record["group"] == "default"


async def test_paging_and_bad_parameters(gateway: GatewayHandle) -> None:
    for i in range(3):
        _call(gateway, "sk-demo", f"page {i}")
    first = await _logs(gateway, "sk-demo", "?limit=2")
    assert len(first["data"]) == 2  # type: ignore[arg-type]
    cursor = first["next_cursor"]
    assert cursor is not None
    second = await _logs(gateway, "sk-demo", f"?limit=2&cursor={cursor}")
    first_ids = {r["request_id"] for r in first["data"]}  # type: ignore[attr-defined]
    assert not first_ids & {r["request_id"] for r in second["data"]}  # type: ignore[attr-defined]
    async with (
        aiohttp.ClientSession() as s,
        s.get(
            gateway.url + "/v1/usage/logs?limit=abc", headers={"authorization": "Bearer sk-demo"}
        ) as r,
    ):
        assert r.status == 400


def _record(token: str, rid: str, t: float) -> UsageRecord:
    return UsageRecord(
        time=t,
        request_id=rid,
        token=token,
        user=token,
        group="g",
        model="m",
        endpoint="chat/completions",
        account="a",
        status=200,
        prompt_tokens=10,
        cached_tokens=0,
        cache_write_tokens=0,
        completion_tokens=1,
        reasoning_tokens=0,
        cost=0.1,
        cache_discount=0.0,
        estimated=False,
        latency_ms=1.0,
        ttfb_ms=1.0,
        decision="rendezvous",
        attempts=1,
    )


async def test_redis_log_is_isolated_and_retries_do_not_double_count(
    redis_server: RedisServer,
) -> None:
    log = RedisUsageLog(redis_server.url, prefix=f"t{time.monotonic_ns()}")
    now = time.time()
    log.append(_record("a", "r1", now))
    log.append(_record("b", "r2", now))
    assert await log.flush()
    # The same records again (a batch retried after an ambiguous failure): no duplicates.
    log.append(_record("a", "r1", now))
    assert await log.flush()
    a = await log.query(Query(token="a"))
    assert [r.request_id for r in a] == ["r1"]
    every = await log.query(Query(token=None))
    assert sorted(r.request_id for r in every) == ["r1", "r2"]
    await log.aclose()


async def test_redis_log_buffers_while_redis_is_away() -> None:
    log = RedisUsageLog("redis://127.0.0.1:1/0", socket_timeout=0.05)
    log.append(_record("a", "r1", time.time()))
    assert not await log.flush()
    assert log.failures == 1
    assert len(log._buffer) == 1  # kept for later, not lost
    await log.aclose()


async def test_usage_export_pages_through_the_log(gateway: GatewayHandle) -> None:
    ids = {_call(gateway, "sk-demo", f"export {i}") for i in range(3)}
    records = await fetch_all(gateway.url, "sk-demo", page=2)
    assert ids <= {r["request_id"] for r in records}
    assert {r["token"] for r in records} == {"demo"}
    assert len({r["request_id"] for r in records}) == len(records)  # paging repeats nothing
