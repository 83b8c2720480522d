"""Helpers shared by the affinity tests: trace-style fingerprints, a fake clock, and a
real redis-server per test session."""

from __future__ import annotations

import xxhash

from affinity.fingerprint import Fingerprint
from affinity.rendezvous import key_of

BLOCK = 512


def chain(*ids: int, session: str | None = None, min_tokens: int = 1024) -> Fingerprint:
    """A fingerprint whose block i + 1 stands for the prefix ids[:i + 1], like trace blocks."""
    hashes = [0]
    for block in ids:
        hashes.append(xxhash.xxh3_64_intdigest(block.to_bytes(8, "little"), hashes[-1]))
    tokens = tuple(i * BLOCK for i in range(len(hashes)))
    pin_from = next((i for i, t in enumerate(tokens) if i and t >= min_tokens), len(tokens))
    root = hashes[min(max(pin_from, 1), len(hashes) - 1)]
    if session is not None:
        root = xxhash.xxh3_64_intdigest(session.encode(), root)
    return Fingerprint(tuple(hashes), tokens, root, tokens[-1], session, hashes[-1], pin_from)


class Clock:
    def __init__(self, start: float = 1000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t


__all__ = ["BLOCK", "Clock", "chain", "key_of"]
