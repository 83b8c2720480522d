"""The composition root: builds the middleware chain once and dispatches by path.

    client ─► errors ─► metering ─► auth ─► groups ─► response_cache ─► prefix ─► pinning
           ─► failover ─► upstream

The order is written once, below, as a list folded in reverse. Configuration tunes the
layers; it never reorders them. Shared resources (the aiohttp session, the affinity
state) are opened and closed by the ASGI lifespan.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from importlib import resources
from urllib.parse import parse_qs

import aiohttp
import orjson
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.types import ASGIApp, Receive, Scope, Send

from affinity.memory import MemoryState
from affinity.router import AffinityRouter
from affinity.select import Selector
from affinity.state import AffinityState
from gateway.body import parse_json_object, read_body
from gateway.cache_api import PREFIX as CACHE_API_PREFIX
from gateway.cache_api import CacheAPI
from gateway.cachestore import (
    BlobStore,
    CacheCounters,
    KVStore,
    MemoryBlobs,
    MemoryKV,
    RedisBlobs,
    RedisKV,
)
from gateway.config import PROVIDER_ENDPOINTS, Config, ConfigError, load_config
from gateway.context import Endpoint, Principal, RequestContext
from gateway.crypto import KeyRing
from gateway.drain import Drain
from gateway.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    MethodNotAllowed,
    NotFound,
    UpstreamError,
    UpstreamStatus,
    UpstreamTimeout,
)
from gateway.health import Health
from gateway.metrics import Metrics
from gateway.owners import MemoryOwners, RedisOwners, ResponseOwners
from gateway.pricing import Price
from gateway.ratelimit import TokenLimiter
from gateway.stats import cache_stats
from gateway.tokens import MemoryTokenStore, RedisTokenStore, Tokens, TokenSpec, TokenStore
from gateway.upstream import Account, UpstreamApp, UpstreamClient
from gateway.usagelog import MemoryUsageLog, Query, RedisUsageLog, UsageLog
from middleware.auth import AuthMiddleware
from middleware.errors import ErrorsMiddleware
from middleware.failover import FailoverMiddleware, RetryBudget
from middleware.groups import GroupsMiddleware
from middleware.metering import MeteringMiddleware
from middleware.pinning import PinningMiddleware
from middleware.prefix import PrefixMiddleware
from middleware.response_cache import CachePolicy, ResponseCacheMiddleware

log = logging.getLogger(__name__)

_PROXIED = {f"/v1/{e.value}" for e in Endpoint}
_RESPONSE_PREFIX = "/v1/responses/"
_DASHBOARD = (resources.files("gateway") / "static" / "dashboard.html").read_bytes()


async def _respond(
    send: Send, status: int, body: bytes, ctype: bytes = b"application/json"
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", ctype), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


def principal_is_admin(principal: Principal | None) -> bool:
    return principal is not None and principal.admin


def _principals(config: Config) -> dict[str, Principal]:
    """Configured tokens by key hash."""
    return {t.key_hash: TokenSpec(**t.model_dump()).principal() for t in config.tokens}


class Gateway:
    """The ASGI application. Everything per-request lives in the chain's context."""

    def __init__(
        self,
        config: Config,
        *,
        metrics: Metrics | None = None,
        config_path: str | None = None,
    ) -> None:
        # Process-lifetime resources: a reload keeps them (and the pins in the state).
        self.config = config
        self.config_path = config_path
        self.metrics = metrics or Metrics()
        self.upstream = UpstreamClient(config.server.timeouts)
        self.state = self._state(config)
        self.router = AffinityRouter(
            self.state,
            Selector(alpha=config.affinity.alpha, min_tokens=config.affinity.min_tokens),
        )
        self.ready = False
        self.drain = Drain()
        self.usage_log = self._usage_log(config)
        self.limiter = TokenLimiter()
        self.owners = self._owners(config)
        self.tokens = Tokens(config.server.secret, _principals(config), self._token_store(config))
        self.health = Health(config.pools)  # replaced by _apply; keeps states across reloads
        # Platform cache: stores and counters live as long as the process; an embedded
        # store without configured keys seals with a key that dies with it.
        self.cache_counters = CacheCounters()
        self.response_store, self.kv_store = self._cache_stores(config)
        self._ephemeral_keys = KeyRing.ephemeral()
        self._apply(config)
        self.metrics.add_collector(self._collect)

    def _apply(self, config: Config) -> None:
        """Build everything that follows from the configuration, then switch to it in one
        step: requests in flight keep the chain they started with."""
        accounts = {a.name: Account.from_config(a) for a in config.accounts}
        pools = {p: tuple(accounts[n] for n in members) for p, members in config.pools.items()}
        fo = config.failover
        health = Health(
            config.pools,
            eject_after=fo.eject_after,
            base_ejection=fo.base_ejection,
            max_ejection=fo.max_ejection,
            max_ejected_share=fo.max_ejected_share,
        )
        health.adopt(self.health)
        pool_endpoints = {
            p: frozenset().union(*(PROVIDER_ENDPOINTS[a.provider] for a in members))
            for p, members in pools.items()
        }
        prices = {model: Price(**p.model_dump()) for model, p in config.pricing.items()}
        self.tokens.reconfigure(config.server.secret, _principals(config))
        self.router.selector = Selector(
            alpha=config.affinity.alpha, min_tokens=config.affinity.min_tokens
        )
        keys = config.key_ring()
        if keys is None and not config.state.redis_url:
            keys = self._ephemeral_keys
        pc = config.platform_cache
        cache_policies = {
            name: CachePolicy(
                ttl_seconds=rc.ttl_seconds,
                shared=rc.shared,
                price_share=rc.price_share,
                cache_nondeterministic=rc.cache_nondeterministic,
                max_entry_bytes=rc.max_entry_bytes,
                max_ttl_seconds=rc.max_ttl_seconds,
            )
            for name, g in config.groups.items()
            if (rc := g.response_cache).enabled
        }
        cache_api = CacheAPI(
            store=self.kv_store,
            keys=keys if pc.api_enabled else None,
            quota_bytes=pc.quota_bytes,
            default_ttl=pc.default_ttl_seconds,
            max_ttl=pc.max_ttl_seconds,
            max_value_bytes=pc.max_value_bytes,
            counters=self.cache_counters,
            disabled_reason="the cache API is off"
            if not pc.api_enabled
            else "the cache API needs platform_cache.encryption_keys when state is in Redis",
        )

        chain: list[Callable[[ASGIApp], ASGIApp]] = [
            lambda app: ErrorsMiddleware(app, drain=self.drain),
            lambda app: MeteringMiddleware(
                app,
                metrics=self.metrics,
                prices=prices,
                usage_log=self.usage_log,
                limiter=self.limiter,
                owners=self.owners,
                tokens=self.tokens,
            ),
            lambda app: AuthMiddleware(app, tokens=self.tokens, limiter=self.limiter),
            lambda app: GroupsMiddleware(
                app,
                groups=config.groups,
                user_groups=config.user_groups,
                pool_endpoints=pool_endpoints,
                max_body_bytes=config.server.max_body_bytes,
            ),
            lambda app: ResponseCacheMiddleware(
                app,
                policies=cache_policies,
                store=self.response_store,
                keys=keys,
                secret=config.server.secret.encode(),
                counters=self.cache_counters,
            ),
            lambda app: PrefixMiddleware(
                app, min_tokens=config.min_tokens, max_messages=config.server.max_messages
            ),
            lambda app: PinningMiddleware(
                app,
                router=self.router,
                pools=pools,
                health=health,
                metrics=self.metrics,
                owners=self.owners,
            ),
            lambda app: FailoverMiddleware(
                app,
                router=self.router,
                health=health,
                metrics=self.metrics,
                deadline=fo.deadline,
                backoff_base=fo.backoff_base,
                backoff_max=fo.backoff_max,
                budget=RetryBudget(ratio=fo.retry_ratio, min_in_flight=fo.min_retries_in_flight),
            ),
        ]
        app: ASGIApp = UpstreamApp(self.upstream, on_limits=self.router.observe_headers)
        for layer in reversed(chain):
            app = layer(app)
        # Non-proxied API routes share the outer layers: the errors format and auth.
        api = ErrorsMiddleware(
            AuthMiddleware(self._api_routes, tokens=self.tokens), drain=self.drain
        )
        allowed_models = self._models_by_principal(config, accounts)
        # The switch: plain attribute stores, no await in between.
        self.config, self.accounts, self.health = config, accounts, health
        self.proxy, self.api, self._allowed_models = app, api, allowed_models
        self.cache_api = cache_api

    def reload(self, config: Config) -> None:
        """Switch to a new configuration; raises ConfigError (and keeps the old one) when
        it changes what only a restart can change."""
        for what, old, new in (
            ("state", self.config.state, config.state),
            ("server.host", self.config.server.host, config.server.host),
            ("server.port", self.config.server.port, config.server.port),
            ("server.timeouts", self.config.server.timeouts, config.server.timeouts),
        ):
            if old != new:
                raise ConfigError(f"{what}: changing it needs a restart")
        self._apply(config)
        log.info(
            "configuration reloaded: %d accounts in %d pools, %d tokens",
            len(config.accounts),
            len(config.pools),
            len(config.tokens),
        )

    def reload_from_file(self) -> str | None:
        """SIGHUP and POST /admin/reload: the error, or None when the new config is live."""
        if self.config_path is None:
            return "the gateway was not started from a configuration file"
        try:
            self.reload(load_config(self.config_path))
        except ConfigError as exc:
            log.error("configuration not reloaded, keeping the old one:\n%s", exc)
            return str(exc)
        return None

    @staticmethod
    def _state(config: Config) -> AffinityState:
        aff = config.affinity
        if config.state.redis_url:
            from affinity.redis_state import RedisState  # only replicated setups need redis

            return RedisState(
                config.state.redis_url,
                key_prefix=config.state.key_prefix,
                socket_timeout=config.state.redis_socket_timeout,
                ttl_seconds=aff.ttl_seconds,
                window_seconds=aff.window_seconds,
            )
        return MemoryState(ttl_seconds=aff.ttl_seconds, window_seconds=aff.window_seconds)

    @staticmethod
    def _owners(config: Config) -> ResponseOwners:
        st = config.state
        if st.redis_url:
            return RedisOwners(
                st.redis_url, prefix=st.key_prefix, socket_timeout=st.redis_socket_timeout
            )
        return MemoryOwners()

    @staticmethod
    def _token_store(config: Config) -> TokenStore:
        st = config.state
        if st.redis_url:
            return RedisTokenStore(st.redis_url, prefix=st.key_prefix)
        return MemoryTokenStore()

    @staticmethod
    def _cache_stores(config: Config) -> tuple[BlobStore, KVStore]:
        st, pc = config.state, config.platform_cache
        if st.redis_url:
            return (
                RedisBlobs(st.redis_url, prefix=st.key_prefix),
                RedisKV(st.redis_url, prefix=st.key_prefix),
            )
        return MemoryBlobs(max_bytes=pc.memory_max_bytes), MemoryKV(max_bytes=pc.memory_max_bytes)

    @staticmethod
    def _usage_log(config: Config) -> UsageLog:
        st = config.state
        if st.redis_url:
            return RedisUsageLog(
                st.redis_url, prefix=st.key_prefix, retention_seconds=st.usage_retention_seconds
            )
        return MemoryUsageLog(st.usage_max_records)

    def _collect(self) -> Iterable[Metric]:
        """Gauges read at scrape time: nothing is updated on the request path for them."""
        pins = GaugeMetricFamily(
            "gateway_pin_index_entries", "Live prefix pins in this process's view of the pin index."
        )
        pins.add_metric([], self.router.pin_count())
        yield pins
        state = GaugeMetricFamily(
            "gateway_account_state",
            "1 for the account's current health state.",
            labels=["account", "state"],
        )
        for name in self.accounts:
            current = self.health.state(name)
            for st in ("healthy", "cooldown", "ejected", "quarantined"):
                state.add_metric([name, st], 1.0 if current == st else 0.0)
        yield state
        alerts = CounterMetricFamily(
            "gateway_account_alerts",
            "Alerts per account: the provider rejected its credentials (401/403) and the"
            " account was quarantined.",
            labels=["account"],
        )
        for name in self.accounts:
            alerts.add_metric([name], float(self.health.alerts(name)))
        yield alerts
        fallbacks = getattr(self.state, "fallbacks_total", None)
        if fallbacks is not None:
            c = CounterMetricFamily(
                "gateway_redis_fallbacks",
                "Affinity state calls served from local state because Redis failed or was slow.",
            )
            c.add_metric([], float(fallbacks))
            yield c
            g = GaugeMetricFamily(
                "gateway_redis_circuit_open", "1 while the Redis circuit breaker is open."
            )
            g.add_metric([], 1.0 if getattr(self.state, "circuit_open", False) else 0.0)
            yield g
        util = GaugeMetricFamily(
            "gateway_account_window_utilization",
            "Share of each account limit used in the current window (1 = at the limit): at"
            " scrape time with embedded state; with Redis, as of the last routing decision"
            " that read the account.",
            labels=["account", "limit"],
        )
        for name, account in self.accounts.items():
            load = self.router.last_load(name)
            if load is None:
                continue
            lim = account.spec.limits
            for label, used, limit in (
                ("rpm", load.requests, lim.rpm),
                ("itpm", load.input_tokens, lim.itpm),
                ("otpm", load.output_tokens, lim.otpm),
                ("concurrency", load.in_flight, lim.concurrency),
            ):
                if limit:
                    util.add_metric([name, label], used / limit)
        yield util
        draining = GaugeMetricFamily("gateway_draining", "1 while the gateway drains for shutdown.")
        draining.add_metric([], 1.0 if self.drain.draining else 0.0)
        yield draining
        counters = self.cache_counters
        decrypt = CounterMetricFamily(
            "gateway_platform_cache_decrypt_failures",
            "Stored platform-cache values that did not decrypt (tampered, moved to another"
            " key or tenant, or sealed by a key no longer configured); served as misses.",
            labels=["cache"],
        )
        decrypt.add_metric(["api"], float(counters.api_decrypt_failures))
        decrypt.add_metric(["response"], float(counters.response_decrypt_failures))
        yield decrypt
        store_errors = CounterMetricFamily(
            "gateway_platform_cache_store_errors",
            "Platform-cache storage calls that failed (response cache: served as misses).",
        )
        store_errors.add_metric([], float(counters.store_errors))
        yield store_errors

    @staticmethod
    def _models_by_principal(
        config: Config, accounts: Mapping[str, Account]
    ) -> Callable[[Principal], list[dict[str, object]]]:
        def models(principal: Principal) -> list[dict[str, object]]:
            names = (
                principal.group,
                *(principal.fallback_groups or config.groups[principal.group].fallback_groups),
            )
            allowed = config.user_groups.get(principal.user_group)
            out: dict[str, dict[str, object]] = {}
            for name in dict.fromkeys(names):
                if allowed is not None and name not in allowed.groups:
                    continue
                for model, pool in config.groups[name].models.items():
                    if model in out:
                        continue
                    providers = {accounts[a].provider for a in config.pools[pool]}
                    caching = any(
                        ep in ("chat/completions", "messages")
                        for p in providers
                        for ep in PROVIDER_ENDPOINTS[p]
                    )
                    out[model] = {
                        "id": model,
                        "object": "model",
                        "created": 0,
                        "owned_by": name,
                        "supports_caching": caching,
                    }
            return list(out.values())

        return models

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            path: str = scope["path"]
            admin_port = self.config.server.admin_port
            if admin_port is not None:
                server = scope.get("server")
                on_admin = server is not None and server[1] == admin_port
                if on_admin != (path == "/metrics" or path.startswith("/admin/")):
                    # The admin listener serves only admin routes, the public one none.
                    await _respond(
                        send,
                        404,
                        b'{"error":{"message":"not found","type":"invalid_request_error"}}',
                    )
                    return
            if path in _PROXIED:
                if scope["method"] != "POST":
                    await self.api(scope, receive, send)  # renders 405 in the caller's format
                    return
                await self.proxy(scope, receive, send)
                return
            if path == "/livez":
                await _respond(send, 200, b'{"status":"ok"}')
            elif path == "/readyz":
                ok = self.ready
                await _respond(
                    send, 200 if ok else 503, b'{"ready":%s}' % (b"true" if ok else b"false")
                )
            elif path == "/dashboard" and scope["method"] == "GET":
                # Static: it asks for a key and reads /v1/cache/stats with it.
                await _respond(send, 200, _DASHBOARD, b"text/html; charset=utf-8")
            elif path == "/metrics" and self.config.server.metrics_need_admin:
                await self.api(scope, receive, send)
            elif path == "/metrics":
                await _respond(send, 200, self.metrics.render(), b"text/plain; version=0.0.4")
            else:
                await self.api(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _api_routes(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = RequestContext.of(scope)
        assert ctx.principal is not None
        path, method = scope["path"], scope["method"]
        if path in _PROXIED:
            raise MethodNotAllowed(f"{path} accepts POST only")
        if path == "/v1/models" and method == "GET":
            body = orjson.dumps({"object": "list", "data": self._allowed_models(ctx.principal)})
            await _respond(send, 200, body)
            return
        if path == "/v1/usage/logs" and method == "GET":
            await _respond(send, 200, await self._usage(scope, ctx.principal))
            return
        if path == "/v1/cache/stats" and method == "GET":
            principal = ctx.principal
            q = Query(
                token=None if principal.admin else principal.token,
                start=time.time() - 86400,
                limit=100_000,
            )
            stats = cache_stats(await self.usage_log.query(q))
            await _respond(send, 200, orjson.dumps({"window_seconds": 86400, **stats}))
            return
        if path == "/metrics":  # reached here only when metrics need an admin key
            if not principal_is_admin(ctx.principal):
                raise Forbidden("/metrics needs an admin key")
            await _respond(send, 200, self.metrics.render(), b"text/plain; version=0.0.4")
            return
        if path.startswith("/admin/"):
            if not principal_is_admin(ctx.principal):
                raise Forbidden("admin routes need an admin key")
            status, body = await self._admin(scope, receive, method, path)
            await _respond(send, status, body)
            return
        if path == CACHE_API_PREFIX or path.startswith(CACHE_API_PREFIX + "/"):
            await self.cache_api.handle(scope, receive, send, ctx.principal.token)
            return
        if path.startswith(_RESPONSE_PREFIX) and method in ("GET", "DELETE"):
            status, body = await self._stored_response(scope, ctx.principal, method)
            await _respond(send, status, body)
            return
        raise NotFound(f"no route for {method} {path}")

    async def _admin(
        self, scope: Scope, receive: Receive, method: str, path: str
    ) -> tuple[int, bytes]:
        """Token administration and configuration reload, for admin keys only."""
        if path == "/admin/reload" and method == "POST":
            error = self.reload_from_file()
            if error is not None:
                raise BadRequest(f"configuration not reloaded, the old one stays: {error}")
            return 200, b'{"reloaded":true}'
        if path == "/admin/tokens" and method == "GET":
            specs = await self.tokens.list()
            return 200, orjson.dumps({"object": "list", "data": [s.public() for s in specs]})
        if path == "/admin/tokens" and method == "POST":
            doc = parse_json_object(scope, await read_body(scope, receive, 64 * 1024))
            spec = self._token_spec(doc)
            try:
                stored, key = await self.tokens.create(spec)
            except ValueError as exc:
                raise Conflict(str(exc)) from None
            return 201, orjson.dumps({**stored.public(), "key": key})
        parts = path.split("/")  # ["", "admin", "tokens", name, ...]
        if len(parts) >= 4 and parts[2] == "tokens":
            name = parts[3]
            if len(parts) == 5 and parts[4] == "rotate" and method == "POST":
                rotated = await self.tokens.rotate(name)
                if rotated is None:
                    raise NotFound(f"no runtime token named {name!r}")
                return 200, orjson.dumps({**rotated[0].public(), "key": rotated[1]})
            if len(parts) == 4 and method == "DELETE":
                if not await self.tokens.revoke(name):
                    raise NotFound(f"no runtime token named {name!r}")
                return 200, orjson.dumps({"name": name, "revoked": True})
        raise NotFound(f"no admin route for {method} {path}")

    def _token_spec(self, doc: dict[str, object]) -> TokenSpec:
        allowed = {
            "name",
            "group",
            "user",
            "user_group",
            "fallback_groups",
            "rpm",
            "tpm",
            "budget_usd_day",
            "budget_usd_month",
        }
        unknown = set(doc) - allowed
        if unknown:
            raise BadRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
        name, group = doc.get("name"), doc.get("group")
        if not isinstance(name, str) or not name or not isinstance(group, str):
            raise BadRequest("'name' and 'group' are required strings")
        if group not in self.config.groups:
            raise BadRequest(f"unknown group {group!r}", param="group")
        fallbacks = doc.get("fallback_groups", ())
        if not isinstance(fallbacks, list | tuple) or any(
            g not in self.config.groups for g in fallbacks
        ):
            raise BadRequest("'fallback_groups' must list configured groups")

        def number(field: str) -> float | None:
            value = doc.get(field)
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise BadRequest(f"{field!r} must be a non-negative number", param=field)
            return value

        rpm, tpm = number("rpm"), number("tpm")
        return TokenSpec(
            name=name,
            key_hash="",
            group=group,
            user=str(doc.get("user") or name),
            user_group=str(doc.get("user_group") or "default"),
            fallback_groups=tuple(str(g) for g in fallbacks),
            rpm=int(rpm) if rpm is not None else None,
            tpm=int(tpm) if tpm is not None else None,
            budget_usd_day=number("budget_usd_day"),
            budget_usd_month=number("budget_usd_month"),
        )

    async def _stored_response(
        self, scope: Scope, principal: Principal, method: str
    ) -> tuple[int, bytes]:
        """GET / DELETE a stored response on the account that holds it."""
        rest: str = scope["path"][len(_RESPONSE_PREFIX) :]
        response_id = rest.split("/", 1)[0]
        found = await self.owners.get(response_id)
        if found is None or (found.token != principal.token and not principal.admin):
            raise NotFound(f"no stored response {response_id!r} for this key", code="not_found")
        account = self.accounts.get(found.account)
        if account is None or not account.speaks("responses"):
            raise NotFound(
                f"the account holding response {response_id!r} is gone", code="not_found"
            )
        url = f"{account.urls['responses']}/{rest}"
        query = scope.get("query_string", b"").decode("latin-1")
        try:
            async with (
                asyncio.timeout(self.config.server.timeouts.first_byte),
                self.upstream.session.request(
                    method, f"{url}?{query}" if query else url, headers=dict(account.auth)
                ) as r,
            ):
                body = await r.read()
        except TimeoutError:
            raise UpstreamTimeout(f"account {account.name}: no response in time") from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(
                f"account {account.name}: connection failed ({type(exc).__name__})"
            ) from None
        if r.status >= 400:
            raise UpstreamStatus(r.status, f"the upstream provider answered {r.status}")
        return r.status, body

    async def _usage(self, scope: Scope, principal: Principal) -> bytes:
        """This token's usage records, newest first; an admin token sees every token's."""
        params = parse_qs(scope.get("query_string", b"").decode("latin-1"))

        def one(name: str) -> str | None:
            values = params.get(name)
            return values[-1] if values else None

        def number(name: str, default: float) -> float:
            raw = one(name)
            if raw is None:
                return default
            try:
                return float(raw)
            except ValueError:
                raise BadRequest(f"query parameter {name!r} must be a number", param=name) from None

        limit = int(number("limit", 100))
        if not 1 <= limit <= 1000:
            raise BadRequest("'limit' must be between 1 and 1000", param="limit")
        cursor = one("cursor")
        q = Query(
            token=None
            if principal.admin and one("token") is None
            else (one("token") if principal.admin else principal.token),
            start=number("start", 0.0),
            end=number("end", float("inf")),
            model=one("model"),
            group=one("group"),
            limit=limit,
            before=number("cursor", 0.0) if cursor is not None else None,
        )
        records = await self.usage_log.query(q)
        next_cursor = repr(records[-1].time) if len(records) == limit else None
        return orjson.dumps(
            {"object": "list", "data": [r.to_dict() for r in records], "next_cursor": next_cursor}
        )

    def begin_drain(self, deadline: float) -> None:
        """SIGTERM: not ready from now on; in-flight requests get `deadline` seconds."""
        self.ready = False
        if not self.drain.draining:
            self._drain_task = asyncio.get_running_loop().create_task(self.drain.run(deadline))

    async def start(self) -> None:
        await self.upstream.start()
        await self.usage_log.start()
        await self.tokens.start()
        await self.response_store.start()
        await self.kv_store.start()
        if self.config_path is not None and threading.current_thread() is threading.main_thread():
            # SIGHUP re-reads the configuration; a bad one is logged and ignored.
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.reload_from_file)
        self.ready = True
        log.info(
            "gateway ready: %d accounts in %d pools, state %s",
            len(self.accounts),
            len(self.config.pools),
            "redis" if self.config.state.redis_url else "embedded",
        )

    async def aclose(self) -> None:
        self.ready = False
        await self.upstream.aclose()
        await self.usage_log.aclose()  # flushes what is buffered
        await self.owners.aclose()
        await self.tokens.aclose()
        await self.response_store.aclose()
        await self.kv_store.aclose()
        await self.state.aclose()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.start()
                except Exception as exc:
                    log.exception("startup failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


def create_app(
    config: Config, *, metrics: Metrics | None = None, config_path: str | None = None
) -> Gateway:
    return Gateway(config, metrics=metrics, config_path=config_path)
