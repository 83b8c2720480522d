"""Weighted rendezvous (highest random weight) hashing.

Every process ranks the accounts for a key the same way without talking to the others:
the score comes from xxh3 of the account name seeded with the key, never from Python's
per-process ``hash()``. Weighted scores follow Schindelhauer and Schomaker's logarithmic
method, ``-w / ln(u)``, so an account of weight 2 owns twice the keys of weight 1 and
removing an account only moves the keys it owned.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import log as _log

import xxhash

from affinity.types import AccountSpec

_hash = xxhash.xxh3_64_intdigest
_MASK = (1 << 64) - 1
_SCALE = 2.0**-52


def key_of(text: str) -> int:
    """A 64-bit routing key for a name such as a session or a token."""
    return _hash(text.encode())


def score(key: int, account: AccountSpec) -> float:
    # u in (0, 1) from the top 52 bits: the +0.5 keeps both ends out exactly in a double,
    # so ln(u) is finite and negative.
    u = ((_hash(account.name.encode(), key & _MASK) >> 12) + 0.5) * _SCALE
    return -account.weight / _log(u)


def rank(key: int, accounts: Sequence[AccountSpec]) -> list[AccountSpec]:
    """Accounts in the key's preference order, best first; ties broken by name."""
    seed = key & _MASK
    # score() inlined: this runs once per request over the whole pool.
    scored = [
        (
            -account.weight / _log(((_hash(account.name.encode(), seed) >> 12) + 0.5) * _SCALE),
            account.name,
            index,
        )
        for index, account in enumerate(accounts)
    ]
    scored.sort(reverse=True)
    return [accounts[index] for _, _, index in scored]
