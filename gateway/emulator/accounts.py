"""Runtime state of one emulated account: its cache, stored responses, rate window, faults
and counters."""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

from gateway.emulator.cache import PrefixCache
from gateway.emulator.config import AccountSpec, EmulatorConfig, FaultSpec, LimitSpec
from gateway.emulator.limits import RateWindow
from gateway.emulator.stored import ResponseStore


@dataclass(slots=True)
class Stats:
    """Counters served by ``GET /stats``.

    requests: authenticated API requests, whatever their outcome.
    prompt_tokens / cached_tokens / cache_write_tokens: input of admitted requests, the
        part read from the cache, and the part newly written to it.
    completion_tokens: output tokens actually delivered.
    rate_limited: 429s from the account's limits; faults_injected: requests hit by an
        injected error, stall or cut; errors: other error responses (400, 413).
    disconnects: requests whose client went away before the response was complete.
    response_not_found: Responses requests refused because their previous_response_id
        is not stored on this account (also counted in errors).
    """

    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    completion_tokens: int = 0
    rate_limited: int = 0
    faults_injected: int = 0
    errors: int = 0
    disconnects: int = 0
    response_not_found: int = 0
    last_disconnect_at: float | None = None  # wall-clock (unix) time


COUNTERS = tuple(f.name for f in fields(Stats) if f.name != "last_disconnect_at")


class Account:
    __slots__ = (
        "active",
        "cache",
        "faults",
        "limits",
        "name",
        "responses",
        "rng",
        "stats",
        "window",
    )

    def __init__(self, spec: AccountSpec, config: EmulatorConfig) -> None:
        self.name = spec.name
        self.limits: LimitSpec = spec.limits()
        self.faults: FaultSpec = spec.faults
        self.cache = PrefixCache(config.max_cache_entries_per_account)
        self.responses = ResponseStore(
            ttl=config.scaled(config.response_ttl_seconds),
            max_entries=config.max_stored_responses_per_account,
        )
        self.window = RateWindow(config.scaled(config.window_seconds))
        self.stats = Stats()
        self.active = 0
        # String seeds hash deterministically, so each account has its own fault sequence.
        self.rng = random.Random(f"{config.seed}:{spec.name}")

    def roll_error(self) -> bool:
        rate = self.faults.error_rate
        return rate > 0.0 and self.rng.random() < rate

    def disconnected(self) -> None:
        self.stats.disconnects += 1
        self.stats.last_disconnect_at = time.time()

    def snapshot(self) -> dict[str, Any]:
        data = asdict(self.stats)
        data["active"] = self.active
        data["cache_entries"] = len(self.cache)
        data["stored_responses"] = len(self.responses)
        return data
