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
_TINY = 1e-300


def key_of(text: str) -> int:
    """A 64-bit routing key for a name such as a session or a token."""
    return _hash(text.encode())


def score(key: int, account: AccountSpec) -> float:
    # u in (0, 1) from the top 52 bits: the +0.5 keeps both ends out exactly in a double,
    # so ln(u) is finite and negative. A weight of zero (or less) ranks last, yet still in
    # a deterministic order.
    u = ((_hash(account.name_bytes, key & _MASK) >> 12) + 0.5) * _SCALE
    return -max(account.weight, _TINY) / _log(u)


def rank(key: int, accounts: Sequence[AccountSpec]) -> list[AccountSpec]:
    """Accounts in the key's preference order, best first."""
    seed = key & _MASK
    if not accounts:
        return []
    weight = accounts[0].weight
    if weight > 0 and len({a.weight for a in accounts}) == 1:
        # Equal weights: the score grows with the hash, so the hash alone orders them
        # (and the logarithm, a third of the cost, is skipped).
        scores: list[float] | list[int] = [_hash(a.name_bytes, seed) for a in accounts]
    else:
        scores = [score(seed, a) for a in accounts]
    # Sorting indices by a float key is several times cheaper than sorting tuples.
    order = sorted(range(len(accounts)), key=scores.__getitem__, reverse=True)
    return [accounts[i] for i in order]
