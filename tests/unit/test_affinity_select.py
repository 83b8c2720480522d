from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from itertools import pairwise

import pytest

from affinity.fingerprint import Fingerprint
from affinity.rendezvous import key_of, rank
from affinity.select import Selector
from affinity.types import AccountLoad, AccountSpec, Demand, Limits, PoolMemo, Snapshot
from tests.unit.conftest_affinity import BLOCK, chain


def snap(
    matched: Mapping[str, int] | None = None,
    load: Mapping[str, AccountLoad] | None = None,
    root_rate: float = 0.0,
    shared_index: int = -1,
) -> Snapshot:
    return Snapshot(matched or {}, load or {}, root_rate, shared_index, 60.0)


def pool(n: int, limits: Limits | None = None) -> list[AccountSpec]:
    return [AccountSpec(f"acct-{i}", limits=limits or Limits()) for i in range(n)]


DEMAND = Demand(input_tokens=4000, output_tokens=200)
FP = chain(1, 2, 3, 4, 5, 6, 7, 8)


def names(accounts: tuple[AccountSpec, ...] | list[AccountSpec]) -> list[str]:
    return [a.name for a in accounts]


def test_no_match_goes_to_top_of_root_rendezvous_order() -> None:
    accounts = pool(6)
    choice = Selector().choose(accounts, FP, DEMAND, snap(), mode="prefix")
    assert choice.reason == "rendezvous"
    assert names(choice.candidates) == names(rank(FP.root, accounts))
    assert choice.matched_tokens == 0
    assert choice.retry_after is None


def test_longest_match_wins_with_headroom_only() -> None:
    accounts = pool(4, Limits(rpm=100))
    matched = {"acct-1": 3072, "acct-2": 2048, "acct-3": 512}
    choice = Selector().choose(accounts, FP, DEMAND, snap(matched), mode="prefix")
    assert (choice.candidates[0].name, choice.reason, choice.matched_tokens) == (
        "acct-1",
        "longest_match",
        3072,
    )
    busy = {"acct-1": AccountLoad(requests=80)}
    choice = Selector().choose(accounts, FP, DEMAND, snap(matched, busy), mode="prefix")
    assert (choice.candidates[0].name, choice.reason, choice.matched_tokens) == (
        "acct-2",
        "longest_match",
        2048,
    )
    assert "acct-1" not in names(choice.candidates)


def test_match_below_min_tokens_does_not_count() -> None:
    accounts = pool(4)
    top = rank(FP.root, accounts)[0].name
    other = next(a.name for a in accounts if a.name != top)
    choice = Selector(min_tokens=1024).choose(
        accounts, FP, DEMAND, snap({other: 1000}), mode="prefix"
    )
    assert choice.candidates[0].name == top
    assert choice.reason == "rendezvous"


def test_match_ties_follow_rendezvous_order() -> None:
    accounts = pool(5)
    order = names(rank(FP.root, accounts))
    tied = {order[3]: 2048, order[1]: 2048}
    choice = Selector().choose(accounts, FP, DEMAND, snap(tied), mode="prefix")
    assert choice.candidates[0].name == order[1]


@pytest.mark.parametrize(
    ("limits", "fits", "full"),
    [
        (Limits(rpm=100), AccountLoad(requests=79), AccountLoad(requests=80)),
        (
            Limits(itpm=100_000),
            AccountLoad(requests=1, input_tokens=76_000),
            AccountLoad(requests=1, input_tokens=76_001),
        ),
        (
            Limits(otpm=10_000),
            AccountLoad(requests=1, output_tokens=7_800),
            AccountLoad(requests=1, output_tokens=7_801),
        ),
        (Limits(concurrency=10), AccountLoad(in_flight=7), AccountLoad(in_flight=8)),
    ],
)
def test_alpha_is_respected_for_every_limit(
    limits: Limits, fits: AccountLoad, full: AccountLoad
) -> None:
    account = AccountSpec("a", limits=limits)
    selector = Selector(alpha=0.8)
    assert selector.fits(account, DEMAND, snap(load={"a": fits}))
    assert not selector.fits(account, DEMAND, snap(load={"a": full}))


def test_idle_account_takes_one_request_up_to_its_full_limit() -> None:
    account = AccountSpec("a", limits=Limits(itpm=5000))
    selector = Selector(alpha=0.8)
    assert selector.fits(account, Demand(4500, 10), snap())
    assert not selector.fits(account, Demand(5001, 10), snap())
    assert not selector.fits(account, Demand(4500, 10), snap(load={"a": AccountLoad(1, 100)}))


def test_cache_reads_do_not_count_where_the_provider_does_not_count_them() -> None:
    demand = Demand(input_tokens=50_000, output_tokens=100)
    load = {"a": AccountLoad(requests=3, input_tokens=10_000)}
    limits = Limits(itpm=60_000)
    counts = AccountSpec("a", limits=limits, itpm_counts_cached=True)
    free = AccountSpec("a", limits=limits, itpm_counts_cached=False)
    selector = Selector(alpha=0.8)
    assert not selector.fits(counts, demand, snap({"a": 45_000}, load))
    assert selector.fits(free, demand, snap({"a": 45_000}, load))
    assert not selector.fits(free, demand, snap({"a": 5_000}, load))


def test_spill_follows_rendezvous_order_and_drops_accounts_without_headroom() -> None:
    accounts = pool(5, Limits(rpm=10))
    order = names(rank(FP.root, accounts))
    full = {order[0]: AccountLoad(requests=8), order[2]: AccountLoad(requests=9)}
    choice = Selector().choose(accounts, FP, DEMAND, snap(load=full), mode="prefix")
    assert choice.reason == "spill_headroom"
    assert names(choice.candidates) == [order[1], order[3], order[4]]


def test_balance_skips_an_account_far_over_its_share() -> None:
    accounts = pool(4)
    order = names(rank(FP.root, accounts))
    heavy = {order[0]: AccountLoad(requests=10, input_tokens=100_000)}
    heavy |= {name: AccountLoad(requests=1, input_tokens=10_000) for name in order[1:]}
    choice = Selector(balance=1.25).choose(accounts, FP, DEMAND, snap(load=heavy), mode="prefix")
    assert (choice.candidates[0].name, choice.reason) == (order[1], "spill_headroom")
    # a live match is worth more than balance: it still wins there
    matched = {order[0]: 3072}
    choice = Selector(balance=1.25).choose(
        accounts, FP, DEMAND, snap(matched, heavy), mode="prefix"
    )
    assert choice.candidates[0].name == order[0]
    unbalanced = Selector(balance=None).choose(
        accounts, FP, DEMAND, snap(load=heavy), mode="prefix"
    )
    assert unbalanced.candidates[0].name == order[0]


def test_saturated_reports_retry_after_from_the_windows() -> None:
    accounts = pool(2, Limits(rpm=10))
    load = {"acct-0": AccountLoad(requests=10), "acct-1": AccountLoad(requests=9)}
    choice = Selector(alpha=0.8).choose(accounts, FP, DEMAND, snap(load=load), mode="prefix")
    assert choice.candidates == ()
    assert choice.reason == "saturated"
    # acct-1 needs 9 + 1 - 8 = 2 of its 9 requests to age out of a 60 s window
    assert choice.retry_after == pytest.approx(60 * 2 / 9)


def test_saturated_by_concurrency_or_headers() -> None:
    accounts = [AccountSpec("a", limits=Limits(concurrency=2))]
    choice = Selector().choose(
        accounts, FP, DEMAND, snap(load={"a": AccountLoad(in_flight=2)}), mode="prefix"
    )
    assert (choice.reason, choice.retry_after) == ("saturated", 1.0)
    told = {"a": AccountLoad(remaining_requests=0, reset_in=7.5)}
    choice = Selector().choose([AccountSpec("a")], FP, DEMAND, snap(load=told), mode="prefix")
    assert (choice.reason, choice.retry_after) == ("saturated", 7.5)


def test_saturated_without_hope_has_no_retry_after() -> None:
    accounts = [AccountSpec("a", limits=Limits(itpm=1000))]
    choice = Selector().choose(accounts, FP, DEMAND, snap(), mode="prefix")
    assert (choice.reason, choice.retry_after) == ("saturated", None)


def test_unhealthy_accounts_are_left_out() -> None:
    accounts = pool(3)
    top = rank(FP.root, accounts)[0].name
    choice = Selector().choose(
        accounts,
        FP,
        DEMAND,
        snap({top: 4096}),
        mode="prefix",
        healthy=lambda a: a.name != top,
    )
    assert top not in names(choice.candidates)
    assert len(choice.candidates) == 2
    assert choice.reason == "rendezvous"  # top among the healthy: not a spill


def hot_selector() -> Selector:
    return Selector(alpha=0.8, hot_share=0.5)


def conversation(own: int, turns: int) -> Fingerprint:
    """A shared 4-block system prompt (ids 1-4), then the conversation's own blocks."""
    return chain(1, 2, 3, 4, *(own * 1000 + t for t in range(turns)))


def test_hot_root_spreads_conversations_and_keeps_each_on_one_account() -> None:
    accounts = pool(8, Limits(rpm=100))
    # 200 requests a minute through the root: 200 / (0.5 * 0.8 * 100) -> 5 accounts
    hot = snap(root_rate=200.0, shared_index=4)
    first = conversation(1, 1)
    top5 = names(rank(first.root, accounts)[:5])
    picks: dict[int, str] = {}
    for own in range(200):
        fp = conversation(own, 2)
        assert fp.root == first.root
        choice = hot_selector().choose(accounts, fp, DEMAND, hot, mode="prefix")
        assert choice.reason == "hot_spread"
        picks[own] = choice.candidates[0].name
        for turns in (3, 6):  # later turns of the same conversation
            later = hot_selector().choose(
                accounts, conversation(own, turns), DEMAND, hot, mode="prefix"
            )
            assert later.candidates[0].name == picks[own]
    spread = Counter(picks.values())
    assert set(spread) == set(top5)
    assert min(spread.values()) > 20
    cold = hot_selector().choose(accounts, conversation(7, 2), DEMAND, snap(), mode="prefix")
    assert (cold.candidates[0].name, cold.reason) == (top5[0], "rendezvous")


def test_hot_conversation_with_its_own_history_elsewhere_stays_there() -> None:
    accounts = pool(8, Limits(rpm=100))
    fp = conversation(3, 6)
    top5 = names(rank(fp.root, accounts)[:5])
    own = hot_selector().choose(
        accounts, fp, DEMAND, snap(root_rate=200.0, shared_index=4), mode="prefix"
    )
    elsewhere = next(n for n in top5 if n != own.candidates[0].name)
    # cached there: the shared 4 blocks plus 4 of its own (2048 tokens beyond the shared part)
    matched = {elsewhere: 8 * BLOCK, own.candidates[0].name: 4 * BLOCK}
    choice = hot_selector().choose(
        accounts, fp, DEMAND, snap(matched, root_rate=200.0, shared_index=4), mode="prefix"
    )
    assert (choice.candidates[0].name, choice.reason) == (elsewhere, "longest_match")


def test_hot_spread_grows_with_rate() -> None:
    accounts = pool(8, Limits(rpm=100))
    spreads = []
    for rate in (30.0, 100.0, 300.0):
        picks = {
            hot_selector()
            .choose(
                accounts,
                conversation(own, 2),
                DEMAND,
                snap(root_rate=rate, shared_index=4),
                mode="prefix",
            )
            .candidates[0]
            .name
            for own in range(300)
        }
        spreads.append(len(picks))
    assert spreads == [1, 3, 8]


def test_session_mode_keys_on_the_session() -> None:
    accounts = pool(8)
    owner = rank(key_of("conv-9"), accounts)[0].name
    for ids in ((1, 2, 3), (7, 8, 9, 10), (5,)):
        fp = chain(*ids, session="conv-9")
        choice = Selector().choose(accounts, fp, DEMAND, snap(), mode="session")
        assert (choice.candidates[0].name, choice.reason) == (owner, "session")
    # no session key: plain rendezvous on the root
    choice = Selector().choose(accounts, FP, DEMAND, snap(), mode="session")
    assert choice.reason == "rendezvous"


def test_fixed_mode_gives_a_token_one_account_while_it_has_headroom() -> None:
    accounts = pool(8, Limits(rpm=10))
    order = names(rank(key_of("tok-1"), accounts))
    for fp in (FP, chain(9, 9, 9), chain(4)):
        choice = Selector().choose(accounts, fp, DEMAND, snap(), mode="fixed", token="tok-1")
        assert (choice.candidates[0].name, choice.reason) == (order[0], "fixed")
    full = {order[0]: AccountLoad(requests=8)}
    choice = Selector().choose(accounts, FP, DEMAND, snap(load=full), mode="fixed", token="tok-1")
    assert (choice.candidates[0].name, choice.reason) == (order[1], "spill_headroom")


def test_off_mode_is_weighted_round_robin() -> None:
    accounts = [AccountSpec("a", weight=2.0), AccountSpec("b"), AccountSpec("c")]
    selector = Selector()
    picks = [
        selector.choose(accounts, FP, DEMAND, snap(), mode="off").candidates[0].name
        for _ in range(40)
    ]
    assert Counter(picks) == {"a": 20, "b": 10, "c": 10}
    assert all(x != y or x == "a" for x, y in pairwise(picks))
    choice = selector.choose(accounts, FP, DEMAND, snap(), mode="off")
    assert choice.reason == "round_robin"
    assert len(choice.candidates) == 3


def test_new_prefixes_leave_a_reserve_for_cached_ones() -> None:
    accounts = pool(4, Limits(rpm=100))
    order = names(rank(FP.root, accounts))
    # 72 + 1 fits alpha (80) but not the new-prefix ceiling (0.8 * 0.85 * 100 = 68)
    busy = {order[0]: AccountLoad(requests=72)}
    selector = Selector(alpha=0.8, reserve=0.15, balance=None)
    choice = selector.choose(accounts, FP, DEMAND, snap(load=busy), mode="prefix")
    assert (choice.candidates[0].name, choice.reason) == (order[1], "spill_headroom")
    assert order[0] in names(choice.candidates)  # still a failover candidate
    cached = selector.choose(accounts, FP, DEMAND, snap({order[0]: 2048}, busy), mode="prefix")
    assert (cached.candidates[0].name, cached.reason) == (order[0], "longest_match")
    # when every account is past the ceiling, the HRW order still decides
    everyone = {name: AccountLoad(requests=72) for name in order}
    choice = selector.choose(accounts, FP, DEMAND, snap(load=everyone), mode="prefix")
    assert (choice.candidates[0].name, choice.reason) == (order[0], "rendezvous")


def test_cache_key_follows_the_root_and_shards_hot_roots_by_conversation() -> None:
    accounts = pool(8, Limits(rpm=100))
    cold = Selector().choose(accounts, FP, DEMAND, snap(), mode="prefix")
    assert cold.cache_key == FP.root
    hot = snap(root_rate=200.0, shared_index=4)
    keys = {}
    for own in range(20):
        first = hot_selector().choose(accounts, conversation(own, 2), DEMAND, hot, mode="prefix")
        later = hot_selector().choose(accounts, conversation(own, 5), DEMAND, hot, mode="prefix")
        assert first.cache_key == later.cache_key
        keys[own] = first.cache_key
    assert len(set(keys.values())) == 20
    assert Selector().choose(accounts, FP, DEMAND, snap(), mode="off").cache_key is None


def test_a_partial_snapshot_decides_among_the_accounts_read_only() -> None:
    limits = Limits(itpm=100_000)
    accounts = pool(20, limits)
    selector = Selector(max_candidates=4)
    order = selector.order(accounts, FP, mode="prefix")
    assert order is not None and order == rank(FP.root, accounts)
    assert selector.order(accounts, FP, mode="off") is None  # round-robin reads them all
    full = AccountLoad(0, 99_000, 0, 0)
    # The head of the order read, its first three without headroom: an unread account is
    # unknown, not idle, so the decision stays within what was read.
    read = {a.name: (full if i < 3 else AccountLoad()) for i, a in enumerate(order[:5])}
    partial = Snapshot({}, read, 0.0, -1, 60.0, partial=True)
    choice = selector.choose(accounts, FP, DEMAND, partial, mode="prefix", order=order)
    assert names(choice.candidates) == names(order[3:5])
    assert choice.reason == "spill_headroom"
    # The same loads as a whole snapshot treat the rest of the pool as idle.
    whole = selector.choose(accounts, FP, DEMAND, snap(load=read), mode="prefix", order=order)
    assert names(whole.candidates) == names(order[3:7])
    # Nothing read has headroom: saturated, with a wait from the accounts read.
    jammed = {a.name: full for a in order[:5]}
    choice = selector.choose(
        accounts, FP, DEMAND, Snapshot({}, jammed, 0.0, -1, 60.0, partial=True), mode="prefix"
    )
    assert choice.reason == "saturated" and choice.retry_after is not None
    # The order given is the available pool: an account left out of it is not considered.
    sick = order[3]
    available = [a for a in order if a is not sick]
    assert selector.order(accounts, FP, mode="prefix", healthy=lambda a: a is not sick) == (
        available
    )
    choice = selector.choose(accounts, FP, DEMAND, partial, mode="prefix", order=available)
    assert names(choice.candidates) == [order[4].name]


def test_pool_memo_keys_by_the_pool_object_and_stays_bounded() -> None:
    memo: PoolMemo[str] = PoolMemo(size=2)
    pool = (AccountSpec("a"), AccountSpec("b"))
    memo.put(pool, "index")
    assert memo.get(pool) == "index"
    assert memo.get(tuple(pool)) == "index"  # tuple() of a tuple is the same object
    assert memo.get(list(pool)) is None  # an equal pool, another object: not known
    memo.put((AccountSpec("c"),), "c")
    memo.put((AccountSpec("d"),), "d")  # over the bound: starts again
    assert memo.get(pool) is None
