"""RedisState against a real redis-server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.crc import key_slot

from affinity.fingerprint import Fingerprint
from affinity.memory import MemoryState
from affinity.redis_state import RedisState
from affinity.router import WHOLE_READ_EVERY, AffinityRouter
from affinity.select import Selector
from affinity.state import Outcome
from affinity.types import AccountSpec, Demand, Limits, Snapshot
from tests.unit.conftest_affinity import BLOCK, Clock, RedisServer, chain

pytestmark = [
    pytest.mark.redis,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server"),
]

A = AccountSpec("a")
B = AccountSpec("b")
SHARED = AccountSpec("a2", cache_domain="a")
ANTHROPIC = AccountSpec("c", itpm_counts_cached=False)
ACCOUNTS = (A, B, SHARED, ANTHROPIC)
DEMAND = Demand(input_tokens=4096, output_tokens=300)
FP = chain(1, 2, 3, 4, 5, 6, 7, 8)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_server() -> Iterator[RedisServer]:
    """A server this test may pause or kill."""
    server = RedisServer()
    server.start()
    yield server
    if server.process is not None:
        server.resume()
    server.stop()


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def replicas(redis_server: RedisServer, prefix: str) -> AsyncIterator[list[RedisState]]:
    clock = Clock(time.time())
    states = [RedisState(redis_server.url, key_prefix=prefix, clock=clock) for _ in range(2)]
    yield states
    for state in states:
        await state.aclose()


def ok(fp: Fingerprint, **kw: int) -> Outcome:
    fields = {
        "input_tokens": fp.total_tokens,
        "cached_tokens": 0,
        "cache_write_tokens": 0,
        "output_tokens": 100,
        "expected_cached_tokens": 0,
    }
    fields.update(kw)
    return Outcome(ok=True, **fields)


def count_window_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """From now on, the number of account windows each round trip reads, in order."""
    read: list[int] = []
    original = RedisState._pipeline

    async def counting(self: RedisState, calls: Any) -> list[Any]:
        read.append(sum(1 for name, _, _ in calls if name == "WINDOW_READ"))
        result: list[Any] = await original(self, calls)
        return result

    monkeypatch.setattr(RedisState, "_pipeline", counting)
    return read


def loads(snapshot: Snapshot) -> dict[str, tuple[float, float, float, int]]:
    return {
        name: (load.requests, load.input_tokens, load.output_tokens, load.in_flight)
        for name, load in snapshot.load.items()
    }


async def test_replicas_share_pins_and_windows(replicas: list[RedisState]) -> None:
    one, two = replicas
    now = one.now()
    await one.snapshot(ACCOUNTS, FP, now)
    await one.begin(A, FP, DEMAND, now)
    seen = await two.snapshot(ACCOUNTS, chain(1, 2, 3, 4, 5, 6, 7, 8, 9), now)
    assert seen.matched == {"a": 8 * BLOCK, "a2": 8 * BLOCK}
    assert loads(seen)["a"] == (1, 4096, 300, 1)
    await one.end(A, FP, ok(FP, input_tokens=4000, output_tokens=120), now + 1)
    # The end goes out by itself soon after (no further call of replica one needed).
    for _ in range(100):
        seen = await two.snapshot(ACCOUNTS, FP, now + 1)
        if loads(seen)["a"][3] == 0:
            break
        await asyncio.sleep(0.01)
    assert loads(seen)["a"] == (1, 4000, 120, 0)
    assert one.fallbacks_total == two.fallbacks_total == 0


async def test_same_answers_as_memory_state(redis_server: RedisServer, prefix: str) -> None:
    clock = Clock(time.time())
    shared = RedisState(redis_server.url, key_prefix=prefix, clock=clock)
    local = MemoryState(clock=clock)
    probes = [FP, chain(1, 2, 3), chain(1, 2, 3, 4, 99), chain(7, 7, 7, 7)]
    script: list[tuple[str, AccountSpec, Fingerprint, float]] = []
    for n in range(12):
        fp = chain(1, 2, 3, 4, 100 + n, 200 + n)
        account = ACCOUNTS[n % len(ACCOUNTS)]
        script.append(("begin", account, fp, 3.0))
        if n % 3:
            script.append(("end", account, fp, 1.5))
    script += [("begin", ANTHROPIC, FP, 5.0), ("begin", ANTHROPIC, FP, 40.0)]
    script += [("end", ANTHROPIC, FP, 30.0), ("begin", B, FP, 250.0), ("begin", A, FP, 1.0)]
    try:
        for step, account, fp, pause in script:
            now = clock()
            if step == "begin":
                await shared.snapshot(ACCOUNTS, fp, now)  # as the router does
                await shared.begin(account, fp, DEMAND, now)
                await local.begin(account, fp, DEMAND, now)
            else:
                outcome = ok(fp, input_tokens=5000, cached_tokens=2048, output_tokens=50)
                await shared.end(account, fp, outcome, now)
                await local.end(account, fp, outcome, now)
            clock.t += pause
            for probe in probes:
                mine = await shared.snapshot(ACCOUNTS, probe, clock.t)
                theirs = local.snapshot_now(ACCOUNTS, probe, clock.t)
                assert mine.matched == theirs.matched
                assert loads(mine) == loads(theirs)
                assert mine.root_rate == pytest.approx(theirs.root_rate)
                assert mine.shared_index == theirs.shared_index
        assert shared.fallbacks_total == 0
    finally:
        await shared.aclose()


async def test_one_snapshot_is_one_round_trip_and_writes_wait_for_none(
    replicas: list[RedisState], monkeypatch: pytest.MonkeyPatch
) -> None:
    state, other = replicas
    await state.begin(A, FP, DEMAND, state.now())
    await state.flush()  # loads the scripts
    await other.snapshot([A], FP, other.now())  # and on the other replica
    sent: list[int] = []
    timeouts: set[float | None] = set()
    original = AbstractConnection.send_packed_command

    async def counting(self: AbstractConnection, command: Any, check_health: bool = True) -> None:
        sent.append(1)
        timeouts.add(self.socket_timeout)
        await original(self, command, check_health)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", counting)
    accounts = [AccountSpec(f"acct-{i}") for i in range(20)]
    snapshot = await state.snapshot([A, *accounts], FP, state.now())
    assert snapshot.matched == {"a": 8 * BLOCK}
    assert len(sent) == 1
    # Begins and ends are queued, not awaited: the request goes on at once, and the
    # writes of several requests leave together on the next loop iteration.
    await state.begin(B, FP, DEMAND, state.now())
    await state.begin(SHARED, chain(3, 3, 3), DEMAND, state.now())
    await state.end(B, FP, ok(FP, expected_cached_tokens=4096), state.now())
    assert len(sent) == 1
    await asyncio.sleep(0.05)
    assert len(sent) == 2
    seen = await other.snapshot([A, B, SHARED], FP, other.now())
    assert loads(seen)["b"] == (1, 4096, 100, 0)  # begun and ended, in that order
    assert len(sent) == 3
    # A snapshot takes what is queued along: one round trip for all of it.
    await state.end(A, FP, ok(FP), state.now())
    snapshot = await state.snapshot([A, B], FP, state.now())
    assert len(sent) == 4
    assert loads(snapshot)["a"][3] == 0  # the end was applied before the read
    await asyncio.sleep(0.05)
    await state.flush()
    assert len(sent) == 4  # nothing was left to send
    # No redis-py socket timeout: with one, every send is an asyncio.wait_for (a task)
    # and every reply a timeout context; each call has one deadline of its own instead.
    assert timeouts == {None}


def test_keys_of_one_script_share_a_slot(redis_server: RedisServer) -> None:
    state = RedisState(redis_server.url)
    pins = state._pin_keys(FP)
    assert len(pins) == len(FP.hashes) - FP.pin_from
    assert len({key_slot(k.encode()) for k in pins}) == 1
    assert len({key_slot(k.encode()) for k in state._window_keys("acct-1")}) == 1
    other = state._pin_keys(chain(2, 2, 2))
    assert key_slot(other[0].encode()) != key_slot(pins[0].encode())


async def test_pins_expire_with_the_ttl(redis_server: RedisServer, prefix: str) -> None:
    clock = Clock(time.time())
    state = RedisState(redis_server.url, key_prefix=prefix, clock=clock)
    raw = Redis.from_url(redis_server.url)
    try:
        await state.begin(A, FP, DEMAND, clock.t)
        await state.begin(B, replace(chain(5, 5, 5), cache_ttl=3600.0), DEMAND, clock.t)
        await state.flush()
        ttl_ms = await raw.pttl(state._pin_keys(FP)[-1])
        assert 299_000 < ttl_ms <= 300_000
        clock.t += 299
        assert (await state.snapshot([A], FP, clock.t)).matched == {"a": 8 * BLOCK}
        clock.t += 2
        assert (await state.snapshot([A], FP, clock.t)).matched == {}
        assert (await state.snapshot([B], chain(5, 5, 5), clock.t)).matched == {"b": 3 * BLOCK}
        clock.t += 62  # the window has moved on too; the request is still in flight
        assert loads(await state.snapshot([A], FP, clock.t))["a"] == (0, 0, 0, 1)
    finally:
        await raw.aclose()
        await state.aclose()


async def test_correction_drops_shared_pins(replicas: list[RedisState]) -> None:
    one, two = replicas
    now = one.now()
    await one.begin(A, FP, DEMAND, now)
    await two.begin(B, FP, DEMAND, now)
    await one.end(A, FP, ok(FP, expected_cached_tokens=4096), now)
    await one.flush()
    assert (await two.snapshot(ACCOUNTS, FP, now)).matched == {"b": 4096}


async def test_paused_redis_falls_back_fast_and_recovers(
    own_server: RedisServer, prefix: str
) -> None:
    state = RedisState(own_server.url, key_prefix=prefix, socket_timeout=0.05, cooldown=0.3)
    try:
        await state.begin(A, FP, DEMAND, state.now())
        own_server.pause()
        started = time.perf_counter()
        snapshot = await state.snapshot(ACCOUNTS, FP, state.now())
        assert time.perf_counter() - started < 0.3
        assert snapshot.matched == {"a": 8 * BLOCK, "a2": 8 * BLOCK}  # from the local mirror
        assert state.circuit_open
        assert state.fallbacks_total == 1
        started = time.perf_counter()
        await state.begin(B, FP, DEMAND, state.now())  # circuit open: no wait at all
        await state.end(B, FP, ok(FP), state.now())
        assert time.perf_counter() - started < 0.05
        assert state.fallbacks_total == 3
        own_server.resume()
        await asyncio.sleep(0.35)
        snapshot = await state.snapshot(ACCOUNTS, FP, state.now())
        assert not state.circuit_open
        assert state.fallbacks_total == 3
        # served by Redis again: a fresh replica sees the same shared state
        other = RedisState(own_server.url, key_prefix=prefix)
        try:
            theirs = await other.snapshot(ACCOUNTS, FP, other.now())
            assert theirs.matched == snapshot.matched
        finally:
            await other.aclose()
    finally:
        await state.aclose()


async def test_killed_redis_falls_back_and_restart_recovers(
    own_server: RedisServer, prefix: str
) -> None:
    state = RedisState(own_server.url, key_prefix=prefix, cooldown=0.2)
    try:
        await state.begin(A, FP, DEMAND, state.now())
        own_server.stop()
        snapshot = await state.snapshot(ACCOUNTS, FP, state.now())
        assert snapshot.matched == {"a": 8 * BLOCK, "a2": 8 * BLOCK}
        assert state.circuit_open
        await state.end(A, FP, ok(FP), state.now())
        own_server.start()  # same port, empty: the scripts must be loaded again
        await asyncio.sleep(0.25)
        await state.begin(B, FP, DEMAND, state.now())
        await state.flush()  # the first call after the cool-down probes
        assert not state.circuit_open
        snapshot = await state.snapshot(ACCOUNTS, FP, state.now())
        assert snapshot.matched == {"b": 8 * BLOCK}  # only what Redis saw since the restart
        assert state.errors_total >= 1
    finally:
        await state.aclose()


async def test_scripts_write_the_keys_the_chain_names(
    redis_server: RedisServer, prefix: str
) -> None:
    # The scripts rebuild every pin key from one argument; the names are the block hashes
    # in 16 hex digits, leading zeros kept, under the chain's first key's hash tag.
    fp = replace(FP, hashes=(*FP.hashes[:-2], 1, 2**64 - 1))
    state = RedisState(redis_server.url, key_prefix=prefix)
    raw = Redis.from_url(redis_server.url)
    try:
        await state.begin(A, fp, DEMAND, state.now())
        await state.flush()
        written = {k.decode() for k in await raw.keys(f"{prefix}:{{*}}:p:*")}
        tag = f"{fp.hashes[fp.pin_from]:016x}"
        named = {f"{prefix}:{{{tag}}}:p:{h:016x}" for h in fp.hashes[fp.pin_from :]}
        assert written == named == set(state._pin_keys(fp))
        assert f"{prefix}:{{{tag}}}:p:0000000000000001" in written
        field = b"d:" + A.cache_domain.encode()
        assert all([field in await raw.hkeys(k) for k in written])
        # A cache hit expected and not there: the provider lost the prefix, drop the pins.
        await state.end(A, fp, ok(fp, expected_cached_tokens=fp.tokens[-1]), state.now())
        await state.flush()
        assert not any([field in await raw.hkeys(k) for k in written])
    finally:
        await raw.aclose()
        await state.aclose()


async def test_scripts_flushed_on_the_server_are_loaded_again(
    redis_server: RedisServer, prefix: str
) -> None:
    state = RedisState(redis_server.url, key_prefix=prefix)
    raw = Redis.from_url(redis_server.url)
    try:
        await state.begin(A, FP, DEMAND, state.now())
        await raw.script_flush()  # what a restarted, empty server looks like
        snapshot = await state.snapshot([A, B], FP, state.now())
        assert snapshot.matched == {"a": 8 * BLOCK}
        assert loads(snapshot)["a"] == (1, 4096, 300, 1)
        assert state.fallbacks_total == state.errors_total == 0
    finally:
        await raw.aclose()
        await state.aclose()


async def test_a_large_pool_reads_the_head_of_the_order_and_the_holders(
    redis_server: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock(time.time())
    state = RedisState(redis_server.url, key_prefix=prefix, clock=clock, read_ahead=8)
    peer = RedisState(redis_server.url, key_prefix=prefix, clock=clock, read_ahead=8)
    router = AffinityRouter(state, Selector())
    pool = [AccountSpec(f"acct-{i}", limits=Limits(itpm=1_000_000)) for i in range(60)]
    order = Selector().order(pool, FP, mode="prefix")
    assert order is not None
    far = order[40]  # the prefix is cached on an account far down the root's order
    try:
        for i, account in enumerate(pool):  # every window has some use
            other = chain(500 + i, 501, 502)
            await state.begin(account, other, Demand(1000 + i, 10), clock.t)
        await state.begin(far, FP, DEMAND, clock.t)
        await state.end(far, FP, ok(FP), clock.t)
        read = count_window_reads(monkeypatch)
        snap = await state.snapshot(pool, FP, clock.t, order=order)
        # The replica pinned the prefix itself: the holder comes with the head, one trip.
        assert read == [8 + 1]
        # A peer replica learns of the holder from Redis: the head, then the holder.
        read.clear()
        peer_snap = await peer.snapshot(pool, FP, clock.t, order=order)
        assert read == [8, 1]
        for seen in (snap, peer_snap):
            assert seen.partial and set(seen.load) == {a.name for a in [*order[:8], far]}
            assert seen.load[far.name].input_tokens == 1000 + pool.index(far) + FP.total_tokens
            assert seen.matched == {far.name: 8 * BLOCK}
        read.clear()
        choice = await router.choose(pool, FP, DEMAND, mode="prefix")
        assert (choice.candidates[0], choice.reason) == (far, "longest_match")
        assert {a.name for a in choice.candidates} <= set(snap.load)
        # A new prefix: one round trip, placed among the head of its own order.
        read.clear()
        fresh = chain(9, 9, 9, 9)
        choice = await router.choose(pool, fresh, DEMAND, mode="prefix")
        fresh_order = Selector().order(pool, fresh, mode="prefix")
        assert read == [8] and fresh_order is not None
        assert choice.reason == "rendezvous" and choice.candidates[0] == fresh_order[0]
        assert set(choice.candidates) == set(fresh_order[:8])
        # A pool no larger than the read-ahead is read whole, as before.
        read.clear()
        whole = await state.snapshot(pool[:8], FP, clock.t, order=pool[:8])
        assert read == [8] and not whole.partial
        assert state.fallbacks_total == peer.fallbacks_total == 0
    finally:
        await state.aclose()
        await peer.aclose()


async def test_writes_queued_behind_a_cancelled_snapshot_still_reach_redis(
    redis_server: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock(time.time())
    state = RedisState(redis_server.url, key_prefix=prefix, clock=clock)
    reader = RedisState(redis_server.url, key_prefix=prefix, clock=clock)
    try:
        await state.snapshot([A], FP, clock.t)  # the scripts are loaded
        gate = asyncio.Event()
        pool_type = type(state._redis.connection_pool)
        original = pool_type.get_connection

        async def held(self: Any, *args: Any, **kwargs: Any) -> Any:
            await gate.wait()  # no connection yet: nothing has left
            return await original(self, *args, **kwargs)

        monkeypatch.setattr(pool_type, "get_connection", held)

        async def request() -> None:
            await state.begin(B, FP, DEMAND, clock.t)  # another request's write, queued
            await state.snapshot([A], FP, clock.t)  # takes it along, then waits

        task = asyncio.create_task(request())
        await asyncio.sleep(0.05)
        assert not task.done() and not state._pending  # the snapshot holds the write
        task.cancel()  # this request's client went away
        with pytest.raises(asyncio.CancelledError):
            await task
        gate.set()
        await asyncio.sleep(0.05)
        await state.flush()
        monkeypatch.undo()
        seen = await reader.snapshot([B], FP, clock.t)
        assert loads(seen)["b"] == (1, DEMAND.input_tokens, DEMAND.output_tokens, 1)
        assert state.errors_total == 0
    finally:
        await state.aclose()
        await reader.aclose()


async def test_requests_of_a_crashed_replica_age_out_of_in_flight(
    redis_server: RedisServer, prefix: str
) -> None:
    clock = Clock(time.time())
    crashed = RedisState(redis_server.url, key_prefix=prefix, clock=clock, max_request_seconds=5)
    alive = RedisState(redis_server.url, key_prefix=prefix, clock=clock, max_request_seconds=5)
    raw = Redis.from_url(redis_server.url)
    try:
        await crashed.begin(A, FP, DEMAND, clock.t)  # and never ends
        await crashed.flush()
        assert loads(await alive.snapshot([A], FP, clock.t))["a"][3] == 1
        clock.t += 4.9
        assert loads(await alive.snapshot([A], FP, clock.t))["a"][3] == 1
        clock.t += 0.2  # past its deadline: no longer counted, though still stored
        assert loads(await alive.snapshot([A], FP, clock.t))["a"][3] == 0
        in_flight = alive._window_keys("a")[1]
        assert await raw.zcard(in_flight) == 1
        await alive.begin(A, FP, DEMAND, clock.t)  # a begin purges the expired tickets
        await alive.flush()
        assert await raw.zcard(in_flight) == 1
        assert loads(await alive.snapshot([A], FP, clock.t))["a"][3] == 1
    finally:
        await raw.aclose()
        for state in (crashed, alive):
            await state.aclose()


async def test_an_end_whose_begin_never_reached_redis_corrects_nothing(
    replicas: list[RedisState],
) -> None:
    one, two = replicas
    now = one.now()
    await two.begin(A, chain(9, 9), DEMAND, now)  # someone else's request on A
    await two.flush()
    await one.begin(A, FP, DEMAND, now)
    one._pending.clear()  # its begin is lost on the way (a failed or cancelled call)
    await one.end(A, FP, ok(FP, input_tokens=1000, output_tokens=20), now)
    await one.flush()
    # The end's correction (1000 - 4096 input) would have come off the other request.
    assert loads(await two.snapshot([A], FP, now))["a"] == (1, 4096, 300, 1)


async def test_no_headroom_in_the_head_reads_further_before_refusing(
    redis_server: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock(time.time())
    state = RedisState(redis_server.url, key_prefix=prefix, clock=clock, read_ahead=4)
    router = AffinityRouter(state, Selector())
    pool = [AccountSpec(f"acct-{i}", limits=Limits(rpm=10)) for i in range(40)]
    fresh = chain(9, 9, 9, 9)
    order = Selector().order(pool, fresh, mode="prefix")
    assert order is not None
    try:
        for account in order[:6]:  # the first six of the order are at their request limit
            for _ in range(10):
                await state.begin(account, chain(700, 1), DEMAND, clock.t)
        await state.flush()
        read = count_window_reads(monkeypatch)
        choice = await router.choose(pool, fresh, DEMAND, mode="prefix")
        assert read == [4, 16]  # the head, then four times as far
        assert (choice.candidates[0], choice.reason) == (order[6], "spill_headroom")
        assert list(choice.candidates) == order[6:16]
        # No headroom as far as the longer read goes: the next read is the whole pool.
        for account in order[6:16]:
            for _ in range(10):
                await state.begin(account, chain(700, 1), DEMAND, clock.t)
        await state.flush()
        read.clear()
        choice = await router.choose(pool, fresh, DEMAND, mode="prefix")
        assert read == [4, 16, 40]
        assert (choice.candidates[0], choice.reason) == (order[16], "spill_headroom")
        # The whole pool saturated: refused, with a wait; for a while the decisions of
        # this pool then stop at the two partial reads.
        for account in order[16:]:
            for _ in range(10):
                await state.begin(account, chain(700, 1), DEMAND, clock.t)
        await state.flush()
        read.clear()
        choice = await router.choose(pool, fresh, DEMAND, mode="prefix")
        assert read == [4, 16, 40] and choice.reason == "saturated"
        assert choice.retry_after is not None
        read.clear()
        choice = await router.choose(pool, chain(8, 8, 8, 8), DEMAND, mode="prefix")
        assert read == [4, 16] and choice.reason == "saturated"
        clock.t += WHOLE_READ_EVERY
        read.clear()
        choice = await router.choose(pool, fresh, DEMAND, mode="prefix")
        assert read == [4, 16, 40] and choice.reason == "saturated"
    finally:
        await state.aclose()
