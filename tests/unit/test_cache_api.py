"""The Cache API handlers, its stores (memory and Redis) and the value encryption."""

from __future__ import annotations

import asyncio
import base64
import copy
import os
import uuid
from collections.abc import AsyncIterator, Iterable
from typing import Any

import orjson
import pytest
import redis.asyncio as redis

from gateway.cache_api import CacheAPI
from gateway.cachestore import CacheCounters, KVStore, MemoryKV, QuotaExceeded, RedisKV
from gateway.config import ConfigError, parse_config
from gateway.crypto import DecryptError, KeyRing, bind
from gateway.errors import BadRequest, MethodNotAllowed, NotFound, PayloadTooLarge
from gateway.presets import emulated_config
from tests.asgi import Recorder, body_receive, make_scope
from tests.conftest import RedisServer

KEY_A = os.urandom(32)
KEY_B = os.urandom(32)

# ---------------------------------------------------------------------------- crypto


def test_seal_and_open() -> None:
    ring = KeyRing([("k1", KEY_A)])
    blob = ring.seal(b"secret value", bind("tenant", "key"))
    assert b"secret value" not in blob
    assert ring.open(blob, bind("tenant", "key")) == b"secret value"
    assert ring.seal(b"x", b"") != ring.seal(b"x", b"")  # a fresh nonce every time


@pytest.mark.parametrize(
    "aad",
    [bind("tenant", "other-key"), bind("other-tenant", "key"), bind("tenantkey")],
    ids=["other-key", "other-tenant", "parts-joined"],
)
def test_a_moved_ciphertext_does_not_decrypt(aad: bytes) -> None:
    ring = KeyRing([("k1", KEY_A)])
    blob = ring.seal(b"v", bind("tenant", "key"))
    with pytest.raises(DecryptError):
        ring.open(blob, aad)


def test_any_flipped_bit_fails() -> None:
    ring = KeyRing([("k1", KEY_A)])
    blob = ring.seal(b"value", b"aad")
    for i in range(len(blob)):
        tampered = bytearray(blob)
        tampered[i] ^= 0x10
        with pytest.raises(DecryptError):
            ring.open(bytes(tampered), b"aad")
    with pytest.raises(DecryptError):
        ring.open(blob[:20], b"aad")


def test_rotation_newest_seals_all_open() -> None:
    old = KeyRing([("2024", KEY_A)])
    sealed_old = old.seal(b"old", b"")
    rotated = KeyRing([("2025", KEY_B), ("2024", KEY_A)])
    assert rotated.primary == "2025"
    assert rotated.open(sealed_old, b"") == b"old"
    sealed_new = rotated.seal(b"new", b"")
    with pytest.raises(DecryptError):
        old.open(sealed_new, b"")  # the old ring does not know the new key
    retired = KeyRing([("2025", KEY_B)])
    with pytest.raises(DecryptError):
        retired.open(sealed_old, b"")


def test_key_errors_never_show_the_key() -> None:
    text = base64.b64encode(os.urandom(16)).decode()
    with pytest.raises(ValueError, match="'short'") as info:
        KeyRing.from_base64([("short", text)])
    assert text not in str(info.value)
    with pytest.raises(ValueError, match="not valid base64"):
        KeyRing.from_base64([("bad", "not base64 at all!")])
    ring = KeyRing.from_base64([("ok", base64.b64encode(KEY_A).decode())])
    assert KEY_A.hex() not in repr(ring) and "ok" in repr(ring)
    with pytest.raises(ValueError, match="twice"):
        KeyRing([("a", KEY_A), ("a", KEY_B)])


# ---------------------------------------------------------------------------- stores


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[KVStore]:
    if request.param == "memory":
        yield MemoryKV()
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    kv = RedisKV(server.url, prefix=f"t{uuid.uuid4().hex[:8]}")
    yield kv
    await kv.aclose()


async def test_store_put_get_delete(store: KVStore) -> None:
    used = await store.put("ns", "k", b"abc", ttl=60, tags=["x", "y"])
    assert used == 3
    entry = await store.get("ns", "k")
    assert entry is not None and entry.blob == b"abc" and entry.tags == ("x", "y")
    assert entry.expires_at - entry.created_at == pytest.approx(60, abs=0.01)
    assert await store.get("other", "k") is None
    assert await store.put("ns", "k", b"abcdef", ttl=60, tags=["y"]) == 6  # replaced
    assert (await store.page("ns", tag="x")).total == 0
    assert await store.delete("ns", "k")
    assert not await store.delete("ns", "k")
    assert await store.get("ns", "k") is None
    assert (await store.page("ns")).used_bytes == 0


async def test_store_quota(store: KVStore) -> None:
    await store.put("ns", "a", b"x" * 60, ttl=60, quota=100)
    with pytest.raises(QuotaExceeded) as info:
        await store.put("ns", "b", b"x" * 50, ttl=60, quota=100)
    assert (info.value.used, info.value.quota, info.value.size) == (60, 100, 50)
    await store.put("ns", "a", b"x" * 90, ttl=60, quota=100)  # replacing frees the old size
    await store.put("other", "b", b"x" * 90, ttl=60, quota=100)  # quotas are per namespace
    await store.delete("ns", "a")
    await store.put("ns", "b", b"x" * 100, ttl=60, quota=100)


async def test_store_expiry_frees_quota_and_listing(store: KVStore) -> None:
    await store.put("ns", "short", b"x" * 80, ttl=0.2, tags=["t"], quota=100)
    await store.put("ns", "long", b"y" * 10, ttl=60, tags=["t"], quota=100)
    await asyncio.sleep(0.3)
    assert await store.get("ns", "short") is None
    page = await store.page("ns", tag="t")
    assert [i.key for i in page.items] == ["long"] and page.total == 1
    assert page.used_bytes == 10
    await store.put("ns", "again", b"z" * 90, ttl=60, quota=100)


async def test_store_listing_pages_by_key_and_tag(store: KVStore) -> None:
    for i in range(7):
        await store.put("ns", f"k{i}", b"v" * (i + 1), ttl=60, tags=["odd" if i % 2 else "even"])
    seen: list[str] = []
    cursor = None
    while True:
        page = await store.page("ns", limit=3, cursor=cursor)
        assert page.total == 7 and page.used_bytes == sum(range(1, 8))
        seen += [i.key for i in page.items]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == [f"k{i}" for i in range(7)]
    odd = await store.page("ns", tag="odd", limit=10)
    assert [(i.key, i.size) for i in odd.items] == [("k1", 2), ("k3", 4), ("k5", 6)]
    assert odd.total == 3 and odd.next_cursor is None
    assert (await store.page("nobody")).total == 0


async def test_memory_store_evicts_the_least_recently_used_beyond_its_bound() -> None:
    kv = MemoryKV(max_bytes=100)
    await kv.put("a", "old", b"x" * 60, ttl=60)
    await kv.put("b", "new", b"y" * 60, ttl=60)
    assert await kv.get("a", "old") is None
    assert await kv.get("b", "new") is not None


# ------------------------------------------------------------------------- the API


def api(store: KVStore | None = None, **kw: Any) -> CacheAPI:
    return CacheAPI(
        store=store or MemoryKV(),
        keys=KeyRing([("k1", KEY_A)]),
        counters=CacheCounters(),
        **kw,
    )


async def call(
    app: CacheAPI,
    method: str,
    path: str,
    body: Any = None,
    *,
    tenant: str = "alice",
    query: str = "",
    headers: Iterable[tuple[str, str]] = (),
) -> Any:
    scope = make_scope(path, method=method, headers=headers)
    scope["query_string"] = query.encode()
    raw = b"" if body is None else orjson.dumps(body)
    rec = Recorder()
    await app.handle(scope, body_receive(raw), rec, tenant)
    assert rec.status == 200
    return rec.json()


async def test_put_get_delete_flow() -> None:
    app = api()
    put = await call(app, "PUT", "/api/v1/cache/user:1", {"value": {"a": [1, 2]}, "tags": ["u"]})
    assert put["stored"] and put["ttl"] == 7 * 86400 and put["tags"] == ["u"]
    got = await call(app, "GET", "/api/v1/cache/user:1")
    assert got["hit"] is True and got["value"] == {"a": [1, 2]} and got["tags"] == ["u"]
    assert got["expires_at"] - got["created_at"] == pytest.approx(7 * 86400)
    assert await call(app, "DELETE", "/api/v1/cache/user:1") == {"key": "user:1", "deleted": True}
    assert await call(app, "GET", "/api/v1/cache/user:1") == {"hit": False, "key": "user:1"}
    assert (await call(app, "DELETE", "/api/v1/cache/user:1"))["deleted"] is False


async def test_values_of_any_json_type() -> None:
    app = api()
    for i, value in enumerate([None, 0, "text", [1, "a"], {"nested": {"x": True}}, 1.5]):
        await call(app, "PUT", f"/api/v1/cache/v{i}", {"value": value, "ttl": 60})
        assert (await call(app, "GET", f"/api/v1/cache/v{i}"))["value"] == value


async def test_tenants_are_isolated() -> None:
    app = api()
    await call(app, "PUT", "/api/v1/cache/shared-name", {"value": "alice's"}, tenant="alice")
    assert (await call(app, "GET", "/api/v1/cache/shared-name", tenant="bob"))["hit"] is False
    listed = await call(app, "GET", "/api/v1/cache", tenant="bob")
    assert listed["data"] == [] and listed["total"] == 0 and listed["storage_used_bytes"] == 0
    deleted = await call(app, "DELETE", "/api/v1/cache/shared-name", tenant="bob")
    assert deleted["deleted"] is False
    assert (await call(app, "GET", "/api/v1/cache/shared-name", tenant="alice"))["value"] == (
        "alice's"
    )


async def test_quota_is_a_clear_413() -> None:
    app = api(quota_bytes=1000)
    await call(app, "PUT", "/api/v1/cache/a", {"value": "x" * 500})
    with pytest.raises(PayloadTooLarge, match="storage quota exceeded") as info:
        await call(app, "PUT", "/api/v1/cache/b", {"value": "y" * 500})
    assert info.value.status == 413 and info.value.code == "cache_quota_exceeded"
    await call(app, "PUT", "/api/v1/cache/b", {"value": "y" * 500}, tenant="bob")
    await call(app, "DELETE", "/api/v1/cache/a")
    await call(app, "PUT", "/api/v1/cache/b", {"value": "y" * 500})
    too_big = api(max_value_bytes=100)
    with pytest.raises(PayloadTooLarge, match="the limit is 100"):
        await call(too_big, "PUT", "/api/v1/cache/big", {"value": "z" * 200})


async def test_ttl_expiry() -> None:
    app = api()
    await call(app, "PUT", "/api/v1/cache/brief", {"value": 1, "ttl": 0.2})
    assert (await call(app, "GET", "/api/v1/cache/brief"))["hit"] is True
    await asyncio.sleep(0.3)
    assert (await call(app, "GET", "/api/v1/cache/brief"))["hit"] is False
    assert (await call(app, "GET", "/api/v1/cache"))["total"] == 0


async def test_listing_by_tag_with_paging() -> None:
    app = api()
    for i in range(5):
        tags = ["all", "even"] if i % 2 == 0 else ["all"]
        await call(app, "PUT", f"/api/v1/cache/item-{i}", {"value": i, "tags": tags})
    even = await call(app, "GET", "/api/v1/cache", query="tag=even")
    assert [d["key"] for d in even["data"]] == ["item-0", "item-2", "item-4"]
    assert even["total"] == 3 and even["next_cursor"] is None
    first = await call(app, "GET", "/api/v1/cache", query="tag=all&limit=2")
    assert first["total"] == 5 and first["next_cursor"] == "item-1"
    everything = await call(app, "GET", "/api/v1/cache", query="limit=5")
    assert first["storage_used_bytes"] == sum(d["size"] for d in everything["data"])
    nxt = await call(app, "GET", "/api/v1/cache", query="tag=all&limit=2&cursor=item-1")
    assert [d["key"] for d in nxt["data"]] == ["item-2", "item-3"]
    assert set(first["data"][0]) == {"key", "size", "tags", "created_at", "expires_at"}


@pytest.mark.parametrize(
    ("method", "path", "body", "error"),
    [
        ("PUT", "/api/v1/cache/k", {"ttl": 5}, BadRequest),
        ("PUT", "/api/v1/cache/k", {"value": 1, "ttl": -1}, BadRequest),
        ("PUT", "/api/v1/cache/k", {"value": 1, "ttl": True}, BadRequest),
        ("PUT", "/api/v1/cache/k", {"value": 1, "tags": "x"}, BadRequest),
        ("PUT", "/api/v1/cache/k", {"value": 1, "tags": ["has space"]}, BadRequest),
        ("PUT", "/api/v1/cache/k", {"value": 1, "extra": 1}, BadRequest),
        ("PUT", "/api/v1/cache/a/b", {"value": 1}, BadRequest),
        ("PUT", "/api/v1/cache/" + "k" * 513, {"value": 1}, BadRequest),
        ("POST", "/api/v1/cache/k", {"value": 1}, MethodNotAllowed),
        ("POST", "/api/v1/cache", None, MethodNotAllowed),
    ],
)
async def test_bad_requests(method: str, path: str, body: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        await call(api(), method, path, body)


async def test_bad_listing_limit() -> None:
    with pytest.raises(BadRequest, match="limit"):
        await call(api(), "GET", "/api/v1/cache", query="limit=0")


async def test_no_keys_means_off() -> None:
    app = CacheAPI(store=MemoryKV(), keys=None, disabled_reason="needs keys")
    with pytest.raises(NotFound, match="needs keys"):
        await call(app, "GET", "/api/v1/cache/k")


async def test_tampered_or_moved_values_are_counted_misses() -> None:
    kv = MemoryKV()
    app = api(kv)
    await call(app, "PUT", "/api/v1/cache/a", {"value": "A"})
    await call(app, "PUT", "/api/v1/cache/b", {"value": "B"})
    items = kv._items
    # Moved to another key of the same tenant.
    items[("alice", "b")] = items[("alice", "a")]
    assert (await call(app, "GET", "/api/v1/cache/b"))["hit"] is False
    # Moved to another tenant under the same key.
    items[("bob", "a")] = items[("alice", "a")]
    kv._keys.setdefault("bob", set()).add("a")
    kv._used["bob"] = items[("bob", "a")].size
    assert (await call(app, "GET", "/api/v1/cache/a", tenant="bob"))["hit"] is False
    # A flipped bit.
    entry = items[("alice", "a")]
    flipped = bytes([entry.blob[0]]) + entry.blob[1:-1] + bytes([entry.blob[-1] ^ 1])
    items[("alice", "a")] = type(entry)(flipped, entry.created_at, entry.expires_at, entry.tags)
    assert (await call(app, "GET", "/api/v1/cache/a"))["hit"] is False
    assert app.counters.api_decrypt_failures == 3


async def test_values_rest_encrypted_in_redis(redis_server: RedisServer) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    kv = RedisKV(redis_server.url, prefix=prefix)
    app = api(kv)
    canary = "canary-" + uuid.uuid4().hex
    await call(app, "PUT", "/api/v1/cache/doc", {"value": {"secret": canary}, "tags": ["t"]})
    raw = redis.Redis.from_url(redis_server.url)
    try:
        keys = [k async for k in raw.scan_iter(match=f"{prefix}:*")]
        assert keys
        for k in keys:
            kind = (await raw.type(k)).decode()
            dump = {
                "string": raw.get,
                "hash": raw.hgetall,
                "zset": lambda k: raw.zrange(k, 0, -1),
            }[kind]
            assert canary.encode() not in orjson.dumps(str(await dump(k)))
        assert (await call(app, "GET", "/api/v1/cache/doc"))["value"] == {"secret": canary}
    finally:
        await raw.aclose()
        await kv.aclose()


# ---------------------------------------------------------------------- configuration


def test_configured_keys_are_checked_and_never_shown() -> None:
    base = emulated_config("http://127.0.0.1:1").model_dump(mode="json")
    short = base64.b64encode(os.urandom(16)).decode()
    with pytest.raises(ConfigError, match=r"platform_cache\.encryption_keys.*'k1'") as info:
        parse_config({**base, "platform_cache": {"encryption_keys": [{"id": "k1", "key": short}]}})
    assert short not in str(info.value)
    new, old = (base64.b64encode(os.urandom(32)).decode() for _ in range(2))
    keys = [{"id": "2025", "key": new}, {"id": "2024", "key": old}]
    config = parse_config({**base, "platform_cache": {"encryption_keys": keys}})
    ring = config.key_ring()
    assert ring is not None and ring.primary == "2025" and ring.ids == ("2025", "2024")
    assert new not in repr(config) and old not in repr(config)


def test_a_shared_response_cache_needs_configured_keys() -> None:
    data = copy.deepcopy(emulated_config("http://127.0.0.1:1").model_dump(mode="json"))
    data["state"] = {"redis_url": "redis://127.0.0.1:1/0"}
    data["groups"]["default"]["response_cache"] = {"enabled": True}
    with pytest.raises(ConfigError, match="encryption_keys are required"):
        parse_config(data)
    data["groups"]["default"]["response_cache"] = {"enabled": False}
    assert parse_config(data).key_ring() is None
