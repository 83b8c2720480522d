"""AES-256-GCM for values at rest, with key rotation.

A sealed value is ``0x01 | len(key id) | key id | 96-bit nonce | ciphertext + tag``. The
nonce is random per value (safe for well over 2**32 values per key). The associated
data binds a value to where it is stored, e.g. tenant and key (`bind`): a ciphertext
copied under another key or tenant fails authentication exactly like a tampered one.

Rotation: the first key of the ring encrypts, every key decrypts (the key id travels
with the ciphertext). Put a new key first and keep the old ones until what they sealed
has expired or been rewritten. Key bytes never appear in a repr, a log or an error.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_VERSION = 1
_NONCE_BYTES = 12
_KEY_BYTES = 32
_KEY_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class DecryptError(Exception):
    """A value that does not decrypt: tampered, moved, truncated or sealed by an unknown key."""


def bind(*parts: str | bytes) -> bytes:
    """Associated data from parts, length-prefixed so that no two part lists collide."""
    out = bytearray()
    for part in parts:
        raw = part.encode() if isinstance(part, str) else part
        out += len(raw).to_bytes(4, "big")
        out += raw
    return bytes(out)


class KeyRing:
    """Named AES-256 keys; the first one seals."""

    __slots__ = ("_aead", "_header", "primary")

    def __init__(self, keys: Sequence[tuple[str, bytes]]) -> None:
        if not keys:
            raise ValueError("a key ring needs at least one key")
        self._aead: dict[bytes, AESGCM] = {}
        for key_id, key in keys:
            if not _KEY_ID.fullmatch(key_id):
                raise ValueError(f"key id {key_id!r}: 1-64 of A-Z a-z 0-9 _ . -")
            if len(key) != _KEY_BYTES:
                raise ValueError(f"key {key_id!r}: must be {_KEY_BYTES} bytes, not {len(key)}")
            if key_id.encode() in self._aead:
                raise ValueError(f"key id {key_id!r} is listed twice")
            self._aead[key_id.encode()] = AESGCM(key)
        self.primary = keys[0][0]
        kid = self.primary.encode()
        self._header = bytes((_VERSION, len(kid))) + kid

    @classmethod
    def from_base64(cls, keys: Sequence[tuple[str, str]]) -> KeyRing:
        """Keys as configured: (id, base64 of 32 bytes). Errors name the id, never the key."""
        decoded = []
        for key_id, text in keys:
            try:
                raw = base64.b64decode(text.strip(), validate=True)
            except (binascii.Error, ValueError):
                raise ValueError(f"key {key_id!r}: not valid base64") from None
            decoded.append((key_id, raw))
        return cls(decoded)

    @classmethod
    def ephemeral(cls) -> KeyRing:
        """A random key that lives as long as the process (for embedded storage only)."""
        return cls([("ephemeral", os.urandom(_KEY_BYTES))])

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(k.decode() for k in self._aead)

    def __repr__(self) -> str:
        return f"KeyRing(ids={self.ids!r})"

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        header = self._header
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._aead[header[2:]].encrypt(nonce, plaintext, header + aad)
        return header + nonce + sealed

    def open(self, blob: bytes, aad: bytes) -> bytes:
        if len(blob) < 2 or blob[0] != _VERSION:
            raise DecryptError("unknown format")
        end = 2 + blob[1]
        aead = self._aead.get(blob[2:end])
        if aead is None:
            raise DecryptError("sealed by a key that is not in the ring")
        nonce = blob[end : end + _NONCE_BYTES]
        if len(nonce) != _NONCE_BYTES:
            raise DecryptError("truncated")
        try:
            return aead.decrypt(nonce, blob[end + _NONCE_BYTES :], blob[:end] + aad)
        except InvalidTag:
            raise DecryptError("authentication failed") from None
