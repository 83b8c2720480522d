"""The Cache API: a small key-value store for apps, behind the gateway's keys.

    PUT    /api/v1/cache/{key}   {"value": <any JSON>, "ttl": seconds, "tags": [..]}
    GET    /api/v1/cache/{key}   200 {"hit": true, "value", "created_at", "expires_at", "tags"}
                                 200 {"hit": false} for a missing, expired or undecryptable key
    DELETE /api/v1/cache/{key}   200 {"deleted": true|false}
    GET    /api/v1/cache?tag=&limit=&cursor=
                                 keys with sizes and tags, `total`, `storage_used_bytes`

A miss is an ordinary answer of a cache, so it is a 200, never an error a client has to
catch. Keys live in the caller's namespace (its token name): no token can read, list or
delete another's. Each namespace has a storage quota (413 when a write would pass it).

Values are sealed with AES-256-GCM before they reach the store, bound to namespace and
key as associated data: a ciphertext moved to another key or tenant, or altered, does
not decrypt and is answered as a miss (and counted). Keys and tags are stored in clear
(they are needed to list), so they must not carry secrets. Time values are unix seconds.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qs

import orjson
from starlette.types import Receive, Scope, Send

from gateway.body import parse_json_object, read_body
from gateway.cachestore import CacheCounters, KVStore, QuotaExceeded, StoreUnavailable
from gateway.crypto import DecryptError, KeyRing, bind
from gateway.errors import BadRequest, MethodNotAllowed, NotFound, PayloadTooLarge, UpstreamError

PREFIX = "/api/v1/cache"
MAX_KEY_BYTES = 512
MAX_TAGS = 32
# Printable, no spaces and no '/': keys are path segments; tags are listing filters.
_NAME = re.compile(r"[^\x00-\x20\x7f/]+")
_PUT_FIELDS = frozenset({"value", "ttl", "tags"})
_AAD = b"cache-api"
_JSON = (b"content-type", b"application/json")


async def _respond(send: Send, status: int, doc: Any) -> None:
    body = orjson.dumps(doc)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [_JSON, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _valid_name(what: str, name: str, max_bytes: int) -> str:
    if not _NAME.fullmatch(name) or len(name.encode()) > max_bytes:
        raise BadRequest(
            f"invalid {what}: 1-{max_bytes} bytes of printable characters, without spaces or '/'",
            param=what,
        )
    return name


def _seconds(value: float) -> float:
    return round(value, 3)


class CacheAPI:
    """Mounted behind auth; `handle` takes the caller's token name as its namespace."""

    def __init__(
        self,
        *,
        store: KVStore,
        keys: KeyRing | None,
        quota_bytes: int = 100 << 20,
        default_ttl: float = 7 * 86400.0,
        max_ttl: float = 365 * 86400.0,
        max_value_bytes: int = 1 << 20,
        counters: CacheCounters | None = None,
        disabled_reason: str = "the cache API is not configured",
    ) -> None:
        self.store = store
        self.keys = keys  # None: switched off (e.g. shared storage without configured keys)
        self.quota_bytes = quota_bytes
        self.default_ttl = default_ttl
        self.max_ttl = max_ttl
        self.max_value_bytes = max_value_bytes
        self.max_body_bytes = max_value_bytes + 64 * 1024  # the envelope around the value
        self.counters = counters or CacheCounters()
        self.disabled_reason = disabled_reason

    async def handle(
        self, scope: Scope, receive: Receive, send: Send, principal_token: str
    ) -> None:
        keys = self.keys
        if keys is None:
            raise NotFound(self.disabled_reason, code="cache_api_disabled")
        path: str = scope["path"]
        method: str = scope["method"]
        if path == PREFIX or path == PREFIX + "/":
            if method != "GET":
                raise MethodNotAllowed(f"{PREFIX} accepts GET only")
            await _respond(send, 200, await self._list(scope, principal_token))
            return
        if not path.startswith(PREFIX + "/"):
            raise NotFound(f"no route for {method} {path}")
        key = _valid_name("key", path[len(PREFIX) + 1 :], MAX_KEY_BYTES)
        try:
            if method == "GET":
                doc = await self._get(keys, principal_token, key)
            elif method == "PUT":
                doc = await self._put(keys, scope, receive, principal_token, key)
            elif method == "DELETE":
                doc = {"key": key, "deleted": await self.store.delete(principal_token, key)}
            else:
                raise MethodNotAllowed(f"{PREFIX}/{{key}} accepts GET, PUT and DELETE")
        except StoreUnavailable:
            self.counters.store_errors += 1
            raise UpstreamError("the cache store is unavailable; retry") from None
        await _respond(send, 200, doc)

    async def _get(self, keys: KeyRing, ns: str, key: str) -> dict[str, Any]:
        entry = await self.store.get(ns, key)
        if entry is None:
            return {"hit": False, "key": key}
        try:
            value = keys.open(entry.blob, bind(_AAD, ns, key))
        except DecryptError:
            # Tampered, moved from another key or tenant, or sealed by a retired key.
            self.counters.api_decrypt_failures += 1
            return {"hit": False, "key": key}
        return {
            "hit": True,
            "key": key,
            "value": orjson.Fragment(value),
            "created_at": _seconds(entry.created_at),
            "expires_at": _seconds(entry.expires_at),
            "tags": list(entry.tags),
        }

    async def _put(
        self, keys: KeyRing, scope: Scope, receive: Receive, ns: str, key: str
    ) -> dict[str, Any]:
        doc = parse_json_object(scope, await read_body(scope, receive, self.max_body_bytes))
        unknown = set(doc) - _PUT_FIELDS
        if unknown:
            raise BadRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
        if "value" not in doc:
            raise BadRequest("'value' is required (any JSON)", param="value")
        ttl = doc.get("ttl", self.default_ttl)
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl <= self.max_ttl:
            raise BadRequest(
                f"'ttl' must be a number of seconds in (0, {self.max_ttl:g}]", param="ttl"
            )
        tags = doc.get("tags", [])
        if not isinstance(tags, list) or len(tags) > MAX_TAGS:
            raise BadRequest(f"'tags' must be a list of at most {MAX_TAGS} strings", param="tags")
        for tag in tags:
            if not isinstance(tag, str):
                raise BadRequest("'tags' must be a list of strings", param="tags")
            _valid_name("tag", tag, 128)
        unique = tuple(dict.fromkeys(tags))
        value = orjson.dumps(doc["value"])
        if len(value) > self.max_value_bytes:
            raise PayloadTooLarge(
                f"the value is {len(value)} bytes; the limit is {self.max_value_bytes}",
                code="cache_value_too_large",
            )
        sealed = keys.seal(value, bind(_AAD, ns, key))
        try:
            used = await self.store.put(
                ns, key, sealed, ttl=float(ttl), tags=unique, quota=self.quota_bytes
            )
        except QuotaExceeded as exc:
            raise PayloadTooLarge(
                f"storage quota exceeded: this key's cache holds {exc.used} of its "
                f"{exc.quota} bytes and the value needs {exc.size}; delete keys or let "
                "them expire",
                code="cache_quota_exceeded",
            ) from None
        return {
            "key": key,
            "stored": True,
            "size": len(sealed),
            "ttl": ttl,
            "tags": list(unique),
            "storage_used_bytes": used,
        }

    async def _list(self, scope: Scope, ns: str) -> dict[str, Any]:
        params = parse_qs(scope.get("query_string", b"").decode("latin-1"))

        def one(name: str) -> str | None:
            values = params.get(name)
            return values[-1] if values else None

        raw_limit = one("limit") or "100"
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 1000:
            raise BadRequest("'limit' must be an integer between 1 and 1000", param="limit")
        tag = one("tag")
        if tag is not None:
            _valid_name("tag", tag, 128)
        cursor = one("cursor")
        try:
            page = await self.store.page(ns, tag=tag, limit=int(raw_limit), cursor=cursor or None)
        except StoreUnavailable:
            self.counters.store_errors += 1
            raise UpstreamError("the cache store is unavailable; retry") from None
        return {
            "object": "list",
            "data": [
                {
                    "key": item.key,
                    "size": item.size,
                    "tags": list(item.tags),
                    "created_at": _seconds(item.created_at),
                    "expires_at": _seconds(item.expires_at),
                }
                for item in page.items
            ],
            "total": page.total,
            "storage_used_bytes": page.used_bytes,
            "quota_bytes": self.quota_bytes,
            "next_cursor": page.next_cursor,
        }
