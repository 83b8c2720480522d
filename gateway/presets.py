"""Ready-made configurations over the provider emulator: for the demo, tests and benchmarks."""

from __future__ import annotations

from typing import Any

from gateway.config import Config, parse_config
from gateway.keys import hash_key

DEMO_SECRET = "demo-secret-change-me-0123"
DEMO_KEY = "sk-demo"


def emulated_config(
    emulator_url: str,
    *,
    accounts: int = 4,
    affinity: str = "prefix",
    limits: dict[str, int] | None = None,
    tokens: dict[str, str] | None = None,
    state: dict[str, Any] | None = None,
    tuning: dict[str, Any] | None = None,
    server: dict[str, Any] | None = None,
) -> Config:
    """N emulator accounts as an OpenAI pool and an Anthropic pool, one group.

    Emulator account i has key ``sk-emu-i``; both pools reach the same emulator
    accounts, so they share a cache domain per account. ``tokens`` maps token names
    to their keys (default: the demo key).
    """
    base = emulator_url.rstrip("/") + "/v1"
    lim = limits or {}
    accts = [
        {
            "name": f"{provider}-{i}",
            "provider": provider,
            "base_url": base,
            "api_key": f"sk-emu-{i}",
            "cache_domain": f"emu-{i}",
            "limits": lim,
        }
        for provider in ("openai", "anthropic")
        for i in range(accounts)
    ]
    keys = tokens or {"demo": DEMO_KEY}
    data: dict[str, Any] = {
        "server": {"secret": DEMO_SECRET, **(server or {})},
        "state": state or {},
        "accounts": accts,
        "pools": {
            "openai": [f"openai-{i}" for i in range(accounts)],
            "anthropic": [f"anthropic-{i}" for i in range(accounts)],
        },
        "groups": {
            "default": {
                "affinity": affinity,
                "models": {
                    "gpt-4o-mini": "openai",
                    "text-embedding-3-small": "openai",
                    "claude-sonnet-4-6": "anthropic",
                },
            }
        },
        "user_groups": {"default": {"groups": ["default"]}},
        "tokens": [
            {"name": name, "key_hash": hash_key(DEMO_SECRET, key), "group": "default"}
            for name, key in keys.items()
        ],
        "pricing": {
            "gpt-4o-mini": {"input": 0.15, "cached_input": 0.075, "output": 0.60},
            "text-embedding-3-small": {"input": 0.02},
            "claude-sonnet-4-6": {
                "input": 3.0,
                "cached_input": 0.30,
                "cache_write_5m": 3.75,
                "cache_write_1h": 6.0,
                "output": 15.0,
            },
        },
        "affinity": tuning or {},
    }
    return parse_config(data)
