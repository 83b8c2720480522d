"""API keys: generated once, stored only as keyed hashes (HMAC-SHA256 with the server secret)."""

from __future__ import annotations

import hashlib
import hmac
import secrets

KEY_PREFIX = "sk-ag-"


def hash_key(secret: str, key: str) -> str:
    return hmac.new(secret.encode(), key.encode(), hashlib.sha256).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)
