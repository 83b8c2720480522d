from __future__ import annotations

import gc
from dataclasses import replace

import pytest

from affinity.fingerprint import Fingerprint
from affinity.memory import MemoryState
from affinity.router import AffinityRouter
from affinity.select import Selector
from affinity.state import Outcome
from affinity.types import IDLE, AccountSpec, Demand, Limits, Loads, input_total
from affinity.window import SlidingWindow
from tests.unit.conftest_affinity import BLOCK, Clock, chain

A = AccountSpec("a")
B = AccountSpec("b")
SHARED = AccountSpec("a2", cache_domain="a")
ANTHROPIC = AccountSpec("c", itpm_counts_cached=False)
DEMAND = Demand(input_tokens=4096, output_tokens=300)
FP = chain(1, 2, 3, 4, 5, 6, 7, 8)  # 8 blocks of 512 tokens


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


def matched(state: MemoryState, fp: Fingerprint, *accounts: AccountSpec) -> dict[str, int]:
    return dict(state.snapshot_now(accounts or (A, B), fp, state.now()).matched)


async def test_pins_slide_and_expire() -> None:
    clock = Clock()
    state = MemoryState(ttl_seconds=300, clock=clock)
    await state.begin(A, FP, DEMAND, clock.t)
    clock.t += 299
    assert matched(state, FP) == {"a": 8 * BLOCK}
    await state.begin(A, FP, DEMAND, clock.t)  # used again: the provider keeps it longer
    clock.t += 250
    assert matched(state, FP) == {"a": 8 * BLOCK}
    clock.t += 51
    assert matched(state, FP) == {}


async def test_ttl_override_and_requested_ttl() -> None:
    clock = Clock()
    state = MemoryState(ttl_seconds=300, clock=clock)
    await state.begin(A, FP, DEMAND, clock.t, ttl_seconds=3600)
    asks_an_hour = replace(chain(9, 9, 9), cache_ttl=3600.0)
    await state.begin(B, asks_an_hour, DEMAND, clock.t)
    await state.begin(B, chain(5, 5, 5), DEMAND, clock.t)
    clock.t += 1800
    assert matched(state, FP) == {"a": 8 * BLOCK}
    assert matched(state, asks_an_hour) == {"b": 3 * BLOCK}
    assert matched(state, chain(5, 5, 5)) == {}


async def test_longest_live_prefix_per_domain() -> None:
    clock = Clock()
    state = MemoryState(clock=clock)
    short = chain(1, 2, 3)
    await state.begin(A, short, DEMAND, clock.t)
    await state.begin(B, FP, DEMAND, clock.t)
    longer = chain(1, 2, 3, 4, 5, 6, 7, 8, 9, 10)
    assert matched(state, longer) == {"a": 3 * BLOCK, "b": 8 * BLOCK}
    # accounts sharing a cache domain share the match
    assert matched(state, longer, A, SHARED) == {"a": 3 * BLOCK, "a2": 3 * BLOCK}
    # below the minimum nothing is pinned
    assert matched(state, chain(1)) == {}
    assert matched(state, chain(1, 2, 7)) == {"a": 2 * BLOCK, "b": 2 * BLOCK}


async def test_lru_bound_evicts_oldest_pins() -> None:
    clock = Clock()
    state = MemoryState(max_pins=22, clock=clock)
    fps = [chain(100 + n, 1, 2, 3, 4) for n in range(10)]  # 4 pinnable blocks each
    for fp in fps:
        await state.begin(A, fp, DEMAND, clock.t)
        clock.t += 1
    assert state.pin_count() == 22
    assert [matched(state, fp).get("a", 0) for fp in fps] == [0] * 4 + [3 * BLOCK] + [5 * BLOCK] * 5
    # a partly evicted chain keeps its shallow part, never a hole: still a usable match


async def test_window_counts_estimate_then_real_usage() -> None:
    clock = Clock()
    state = MemoryState(window_seconds=60, clock=clock)
    await state.begin(A, FP, DEMAND, clock.t)
    load = state.snapshot_now([A], FP, clock.t).load["a"]
    assert (load.requests, load.input_tokens, load.output_tokens, load.in_flight) == (
        1,
        4096,
        300,
        1,
    )
    clock.t += 5
    await state.end(
        A, FP, ok(FP, input_tokens=4000, cached_tokens=3000, output_tokens=120), clock.t
    )
    load = state.snapshot_now([A], FP, clock.t).load["a"]
    assert (load.requests, load.input_tokens, load.output_tokens, load.in_flight) == (
        1,
        4000,
        120,
        0,
    )
    clock.t += 62
    load = state.snapshot_now([A], FP, clock.t).load["a"]
    assert (load.requests, load.input_tokens, load.output_tokens) == (0, 0, 0)


async def test_uncached_input_counts_where_cache_reads_are_free() -> None:
    clock = Clock()
    state = MemoryState(clock=clock)
    await state.begin(ANTHROPIC, FP, DEMAND, clock.t)  # nothing cached yet: all counted
    assert state.snapshot_now([ANTHROPIC], FP, clock.t).load["c"].input_tokens == 4096
    await state.end(ANTHROPIC, FP, ok(FP, input_tokens=4096), clock.t)
    await state.begin(ANTHROPIC, FP, DEMAND, clock.t)  # 8 blocks live: 4096 expected read
    assert state.snapshot_now([ANTHROPIC], FP, clock.t).load["c"].input_tokens == 4096
    await state.end(ANTHROPIC, FP, ok(FP, input_tokens=4096, cached_tokens=3596), clock.t)
    assert state.snapshot_now([ANTHROPIC], FP, clock.t).load["c"].input_tokens == 4096 + 500


async def test_snapshot_reads_each_account_on_demand_and_agrees_with_a_full_read() -> None:
    clock = Clock()
    state = MemoryState(clock=clock)
    pool = [AccountSpec(f"acct-{i}", limits=Limits(itpm=100_000)) for i in range(40)]
    for i, account in enumerate(pool[:30]):
        await state.begin(account, chain(i, i, i), Demand(1000 + i, 10), clock.t)
    state.observe_headers(pool[3], 0, 50, 10.0, clock.t)
    snap = state.snapshot_now(pool, FP, clock.t)
    loads = snap.load
    assert list(loads) == [a.name for a in pool] and len(loads) == 40
    assert loads["acct-3"].remaining_requests == 0 and loads["acct-3"].reset_in == 10.0
    assert loads["acct-7"] == state.load_now("acct-7", clock.t)
    assert loads["acct-7"].input_tokens == 1007
    assert loads["acct-35"] == IDLE
    assert loads.get("never-configured", None) == IDLE  # an unseen account is idle
    full = {name: loads[name] for name in loads}
    total = sum(1000 + i for i in range(30))
    assert input_total(loads, pool) == sum(load.input_tokens for load in full.values()) == total
    # the decision over the lazy view is the decision over the whole pool read up front
    selector = Selector(balance=1.0)
    for fp in (FP, chain(3, 3, 3), chain(77, 1)):
        lazy = selector.choose(pool, fp, DEMAND, snap, mode="prefix")
        eager = selector.choose(pool, fp, DEMAND, replace(snap, load=full), mode="prefix")
        assert lazy == eager
    clock.t += 63  # the windows roll: a later snapshot reads them empty
    later = state.snapshot_now(pool, FP, clock.t).load
    assert (
        isinstance(later, Loads) and input_total(later, pool) == 0 and later["acct-7"].requests == 0
    )


async def test_end_without_begin_leaves_windows_alone() -> None:
    clock = Clock()
    state = MemoryState(clock=clock)
    await state.end(A, FP, ok(FP), clock.t)
    load = state.snapshot_now([A], FP, clock.t).load["a"]
    assert (load.requests, load.in_flight) == (0, 0)


async def test_correction_drops_pins_of_a_missed_hit() -> None:
    clock = Clock()
    state = MemoryState(clock=clock)
    await state.begin(A, FP, DEMAND, clock.t)
    await state.begin(SHARED, FP, DEMAND, clock.t)
    await state.begin(B, FP, DEMAND, clock.t)
    await state.end(A, FP, ok(FP, expected_cached_tokens=4096, cache_write_tokens=4096), clock.t)
    assert matched(state, FP) == {"a": 4096, "b": 4096}  # rewritten: still cached
    await state.end(SHARED, FP, ok(FP, expected_cached_tokens=4096), clock.t)
    assert matched(state, FP) == {"b": 4096}  # the whole domain lost it
    await state.end(B, FP, ok(FP, expected_cached_tokens=0), clock.t)
    assert matched(state, FP) == {"b": 4096}  # no expectation, nothing to correct


async def test_root_rate_and_shared_prefix() -> None:
    clock = Clock()
    state = MemoryState(window_seconds=60, clock=clock)
    for own in range(30):  # 30 conversations over one 4-block system prompt
        await state.begin(A, chain(1, 2, 3, 4, own + 100, own + 200), DEMAND, clock.t)
        clock.t += 1
    snapshot = state.snapshot_now([A], chain(1, 2, 3, 4, 999), clock.t)
    assert 20 < snapshot.root_rate < 30  # decayed over a 60 s time constant, per minute
    assert snapshot.shared_index == 4


async def test_headers_block_until_reset() -> None:
    clock = Clock()
    state = MemoryState(clock=clock)
    state.observe_headers(A, 0, 5000, 10.0, clock.t)
    load = state.snapshot_now([A], FP, clock.t + 4).load["a"]
    assert (load.remaining_requests, load.remaining_tokens) == (0, 5000)
    assert load.reset_in == pytest.approx(6.0)
    assert state.snapshot_now([A], FP, clock.t + 10.5).load["a"].remaining_requests is None


def test_sliding_window_buckets() -> None:
    window = SlidingWindow(60.0, 30)
    window.add(0.5, 1, 100, 10)
    window.add(30.0, 1, 100, 10)
    assert window.totals(59.0) == (2, 200, 20)
    assert window.totals(62.5) == (1, 100, 10)  # the first bucket aged out
    window.adjust(30.0, 63.0, -50, 5)
    assert window.totals(63.0) == (1, 50, 15)
    window.adjust(0.5, 63.0, 1000, 0)  # aged out: ignored
    assert window.totals(63.0) == (1, 50, 15)
    assert window.totals(200.0) == (0, 0, 0)


async def test_router_brackets_requests_and_counts_decisions() -> None:
    clock = Clock()
    accounts = [AccountSpec(f"acct-{i}", limits=Limits(rpm=100)) for i in range(4)]
    router = AffinityRouter(MemoryState(clock=clock), Selector())
    first = await router.choose(accounts, FP, DEMAND, mode="prefix")
    assert first.reason == "rendezvous"
    await router.begin(first.candidates[0], FP, DEMAND)
    assert router.pin_count() == len(FP.hashes) - FP.pin_from
    await router.end(first.candidates[0], FP, ok(FP))
    longer = chain(1, 2, 3, 4, 5, 6, 7, 8, 9)
    second = await router.choose(accounts, longer, DEMAND, mode="prefix")
    assert (second.candidates[0], second.reason, second.matched_tokens) == (
        first.candidates[0],
        "longest_match",
        8 * BLOCK,
    )
    assert router.decisions == {"rendezvous": 1, "longest_match": 1}
    # the window use per account, for utilisation gauges
    readings = {a.name: router.last_load(a.name) for a in accounts}
    assert {name for name, load in readings.items() if load and load.requests == 1} == {
        first.candidates[0].name
    }
    assert {name for name, load in readings.items() if load == IDLE} == {
        a.name for a in accounts if a is not first.candidates[0]
    }
    await router.aclose()


async def test_expired_pins_are_purged_as_traffic_goes_on() -> None:
    clock = Clock()
    state = MemoryState(ttl_seconds=300, clock=clock)
    for n in range(20):
        await state.begin(A, chain(100 + n, 1, 2, 3, 4), DEMAND, clock.t)
    assert state.pin_count() == 80
    clock.t += 301
    for n in range(20):
        await state.begin(A, chain(500 + n, 1), DEMAND, clock.t)
    # every request's purge dropped expired pins; the live ones all stayed
    assert state.pin_count() == 20
    assert all(matched(state, chain(500 + n, 1)) for n in range(20))


async def test_one_block_cached_in_several_domains() -> None:
    clock = Clock()
    state = MemoryState(clock=clock)
    await state.begin(A, FP, DEMAND, clock.t)
    await state.begin(B, FP, DEMAND, clock.t + 100)
    clock.t += 350  # A's copy has expired, B's has not
    assert matched(state, FP) == {"b": 8 * BLOCK}
    await state.end(B, FP, ok(FP, expected_cached_tokens=4096), clock.t)
    assert matched(state, FP) == {}


async def test_the_pin_index_is_nothing_the_garbage_collector_walks() -> None:
    # A full collection costs per tracked object; a million pins must not be a million
    # objects to walk (latency spikes at every full collection).
    clock = Clock()
    state = MemoryState(clock=clock)
    B2 = AccountSpec("b2", cache_domain="b")
    for i in range(50):
        await state.begin(A, chain(i, 2, 3, 4, 5, 6), DEMAND, clock.t)
    await state.begin(B2, chain(7, 2, 3, 4, 5, 6), DEMAND, clock.t)  # a second domain too
    gc.collect()
    pins = state._pins
    assert state.pin_count() >= 50
    assert not any(gc.is_tracked(d) for d in (pins.domain, pins.rate, pins.rate_at))
    assert all(not gc.is_tracked(v) for v in pins.expires.values())
    assert matched(state, chain(7, 2, 3, 4, 5, 6), A, B2) == {"a": 6 * BLOCK, "b2": 6 * BLOCK}
