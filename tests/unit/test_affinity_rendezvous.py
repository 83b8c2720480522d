from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from affinity.rendezvous import rank, score
from affinity.types import AccountSpec

KEYS = st.integers(min_value=0, max_value=2**64 - 1)


def pool(n: int) -> list[AccountSpec]:
    return [AccountSpec(f"acct-{i}") for i in range(n)]


def owner(key: int, accounts: list[AccountSpec]) -> str:
    return rank(key, accounts)[0].name


@settings(max_examples=300)
@given(
    key=KEYS,
    weights=st.lists(st.sampled_from([1.0, 0.5, 2.0, 3.0]), min_size=2, max_size=12),
    data=st.data(),
)
def test_removing_an_account_moves_only_its_keys(
    key: int, weights: list[float], data: st.DataObject
) -> None:
    n = len(weights)
    accounts = [AccountSpec(f"acct-{i}", weight=w) for i, w in enumerate(weights)]
    gone = data.draw(st.integers(min_value=0, max_value=n - 1))
    rest = accounts[:gone] + accounts[gone + 1 :]
    before = rank(key, accounts)
    after = rank(key, rest)
    # the whole order is kept, minus the removed account: failover warms one backup
    assert after == [a for a in before if a.name != accounts[gone].name]


@settings(max_examples=200)
@given(key=KEYS, n=st.integers(min_value=1, max_value=12))
def test_rank_is_a_permutation_and_order_independent(key: int, n: int) -> None:
    accounts = pool(n)
    ranked = rank(key, accounts)
    assert sorted(a.name for a in ranked) == sorted(a.name for a in accounts)
    assert rank(key, list(reversed(accounts))) == ranked


def test_adding_an_account_moves_about_one_in_n_plus_one() -> None:
    accounts = pool(9)
    grown = [*accounts, AccountSpec("acct-new")]
    keys = range(0, 40_000 * 7919, 7919)
    moved = 0
    for key in keys:
        before, after = owner(key, accounts), owner(key, grown)
        if before != after:
            assert after == "acct-new"  # keys only ever move to the newcomer
            moved += 1
    assert abs(moved / len(keys) - 1 / 10) < 0.01


def test_equal_weights_rank_as_weighted_scores_do() -> None:
    """The equal-weight shortcut orders exactly as the weighted formula would."""
    accounts = pool(50)
    for key in range(0, 10_000, 37):
        expected = sorted(accounts, key=lambda a: score(key, a), reverse=True)
        assert rank(key, accounts) == expected


def test_weights_are_honoured() -> None:
    accounts = [AccountSpec("light"), AccountSpec("heavy", weight=2.0), AccountSpec("mid")]
    counts = Counter(owner(key * 104729 + 3, accounts) for key in range(40_000))
    assert abs(counts["heavy"] / counts["light"] - 2.0) < 0.1
    assert abs(counts["mid"] / counts["light"] - 1.0) < 0.06


def test_zero_weight_ranks_last() -> None:
    accounts = [AccountSpec("off", weight=0.0), *pool(3)]
    assert all(rank(key, accounts)[-1].name == "off" for key in range(200))


def test_same_order_in_another_process() -> None:
    """No per-process hash(): a replica with another hash seed agrees."""
    code = (
        "from affinity.rendezvous import rank\n"
        "from affinity.types import AccountSpec\n"
        "accounts = [AccountSpec(f'acct-{i}') for i in range(16)]\n"
        "print(','.join(rank(k, accounts)[0].name for k in range(50)))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    here = ",".join(owner(k, pool(16)) for k in range(50))
    assert out.stdout.strip() == here
