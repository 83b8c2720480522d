"""Deterministic model output: generated words and embedding vectors.

Output depends only on (seed, prompt hash), so a benchmark or a test that replays the
same requests against the same seed sees byte-identical responses.
"""

from __future__ import annotations

import math
import random

import xxhash

_hash = xxhash.xxh3_64_intdigest

_WORDS = (
    "the of and to in is that for it as with was on be by at this are from or an "
    "which cache prefix token account stream model prompt request answer window "
    "block route upstream latency quiet river stone light north paper signal garden "
    "number simple bright measure carry follow gather listen wonder settle travel "
    "balance careful steady golden hollow narrow silver distant gentle rapid honest "
    "early"
)
_VOCABULARY = _WORDS.split()

# Long enough that different prompts rarely start at the same place.
_STREAM_WORDS = 1 << 16


class TextSource:
    """A seeded stream of word tokens; a response is a window of it picked by the prompt."""

    __slots__ = ("_words",)

    def __init__(self, seed: int, max_tokens: int) -> None:
        rng = random.Random(seed)
        words = [" " + rng.choice(_VOCABULARY) for _ in range(_STREAM_WORDS)]
        # The tail repeats the head so that any window is one slice, never a wrap-around.
        self._words = words + words[:max_tokens]

    def tokens(self, digest: int, count: int) -> list[str]:
        """``count`` output tokens for the prompt whose hash is ``digest``."""
        start = digest % _STREAM_WORDS
        tokens = self._words[start : start + count]
        if tokens:
            tokens[0] = tokens[0][1:]  # no leading space on the first word
        return tokens


def embedding(text: bytes, dimensions: int, seed: int) -> list[float]:
    """A unit vector determined by (seed, text)."""
    base = _hash(text, seed)
    values = [
        (_hash(i.to_bytes(4, "little"), base) >> 11) * 2.0**-52 - 1.0 for i in range(dimensions)
    ]
    norm = math.sqrt(math.fsum(v * v for v in values)) or 1.0
    return [v / norm for v in values]
