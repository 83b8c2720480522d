"""Choose the accounts to try. Reads ctx.plan, ctx.fingerprint, ctx.demand; writes
ctx.route, ctx.choice, ctx.candidates (and ctx.body_patch["prompt_cache_key"]).

For each group of the plan in turn the affinity router orders the pool's accounts:
the one holding the longest live prefix with headroom, else the rendezvous order of
the prompt's root. When failover exhausts a group, the next group of the plan is
tried. When no group has an account with headroom, the caller gets 429 naming the
group whose upstream is saturated, with Retry-After.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

from affinity.router import AffinityRouter
from affinity.types import AccountSpec
from gateway.context import Endpoint, RequestContext
from gateway.errors import BadRequest, GatewayError, RateLimited, RouteExhausted
from gateway.health import Health
from gateway.metrics import Metrics
from gateway.owners import ResponseOwners
from gateway.upstream import Account

# Endpoints where OpenAI takes a cache-routing hint; sent only when the caller did not.
_CACHE_KEY_ENDPOINTS = frozenset({Endpoint.CHAT})

_Members = tuple[tuple[Account, ...], dict[str, Account], tuple[AccountSpec, ...]]


class PinningMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        router: AffinityRouter,
        pools: Mapping[str, Sequence[Account]],
        health: Health,
        metrics: Metrics,
        owners: ResponseOwners,
    ) -> None:
        self.app = app
        self.router = router
        self.owners = owners
        self.health = health
        self.metrics = metrics
        # (pool, endpoint) -> the accounts that speak it, by name, and their affinity specs.
        self._members: dict[tuple[str, str], _Members] = {}
        for pool, accounts in pools.items():
            for endpoint in Endpoint:
                members = tuple(a for a in accounts if a.speaks(endpoint.value))
                self._members[pool, endpoint.value] = (
                    members,
                    {a.name: a for a in members},
                    tuple(a.spec for a in members),
                )

    def _healthy(self) -> Callable[[AccountSpec], bool] | None:
        """The availability filter, or None while every account is healthy."""
        if not self.health.troubled:
            return None
        available = self.health.available
        return lambda spec: available(spec.name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = RequestContext.of(scope)
        assert ctx.endpoint is not None and ctx.fingerprint is not None and ctx.demand is not None
        assert ctx.principal is not None
        if ctx.endpoint is Endpoint.RESPONSES:
            previous = ctx.body.get("previous_response_id")
            if isinstance(previous, str) and previous:
                await self._to_owner(scope, receive, send, ctx, previous)
                return
        last: GatewayError | None = None
        retry_after: float | None = None
        saturated: str | None = None
        for step, route in enumerate(ctx.plan):
            members, by_name, specs = self._members[route.pool, ctx.endpoint.value]
            mode = route.affinity if ctx.fingerprint.hashes else "off"
            choice = await self.router.choose(
                specs,
                ctx.fingerprint,
                ctx.demand,
                mode=mode,
                token=ctx.principal.token,
                healthy=self._healthy(),
            )
            if not choice.candidates:
                self.metrics.child(self.metrics.decisions, route.group, "saturated").inc()
                saturated = saturated or route.group
                # Accounts cooling down or ejected are not in the choice at all: the first
                # of them back is as good a time to retry as a window with headroom.
                for wait in (choice.retry_after, self.health.retry_in(a.name for a in members)):
                    if wait is not None:
                        retry_after = wait if retry_after is None else min(retry_after, wait)
                continue
            reason = "fallback_group" if step else choice.reason
            self.metrics.child(self.metrics.decisions, route.group, reason).inc()
            ctx.decision = reason
            ctx.route = route
            ctx.choice = choice
            ctx.candidates = tuple(by_name[s.name] for s in choice.candidates)
            if (
                ctx.endpoint in _CACHE_KEY_ENDPOINTS
                and mode != "off"
                and "prompt_cache_key" not in ctx.body
                and all(a.provider == "openai" for a in ctx.candidates)
            ):
                # OpenAI routes its own cache by this key: give one conversation family one key.
                # A hot root's conversations get keys of their own (choice.cache_key).
                key = ctx.fingerprint.root if choice.cache_key is None else choice.cache_key
                ctx.body_patch["prompt_cache_key"] = f"ag-{key:016x}"
            try:
                await self.app(scope, receive, send)
                return
            except RouteExhausted as exc:
                last = exc.last
                ctx.body_patch.pop("prompt_cache_key", None)
        if last is not None:
            raise last
        group = saturated or (ctx.plan[0].group if ctx.plan else "?")
        raise RateLimited(
            f"the upstream of group {group!r} is saturated; retry later",
            retry_after=retry_after if retry_after is not None else 1.0,
            code="upstream_saturated",
        )

    async def _to_owner(
        self, scope: Scope, receive: Receive, send: Send, ctx: RequestContext, previous: str
    ) -> None:
        """A follow-up to a stored response goes to the account that holds it, or fails
        clearly: any other account would answer that the response does not exist."""
        assert ctx.fingerprint is not None and ctx.demand is not None
        found = await self.owners.get(previous)
        # Another token's stored response is as unknown to this caller as a made-up id.
        owner = (
            found.account
            if found and ctx.principal and found.token == ctx.principal.token
            else None
        )
        if owner is None:
            raise BadRequest(
                f"previous response {previous!r} is not known to this gateway (expired, or"
                " created elsewhere); send the conversation itself instead",
                code="previous_response_not_found",
                param="previous_response_id",
            )
        for route in ctx.plan:
            account = self._members[route.pool, Endpoint.RESPONSES.value][1].get(owner)
            if account is not None:
                break
        else:
            raise BadRequest(
                f"the account holding previous response {previous!r} is not available to this"
                " key any more; send the conversation itself instead",
                code="previous_response_unavailable",
                param="previous_response_id",
            )
        choice = await self.router.choose(
            [account.spec],
            ctx.fingerprint,
            ctx.demand,
            mode="prefix",
            token=ctx.principal.token if ctx.principal else None,
            healthy=self._healthy(),
        )
        if not choice.candidates:
            self.metrics.child(self.metrics.decisions, route.group, "saturated").inc()
            raise RateLimited(
                f"the account holding previous response {previous!r} is busy; retry later",
                retry_after=choice.retry_after or 1.0,
                code="previous_response_owner_busy",
            )
        self.metrics.child(self.metrics.decisions, route.group, "session").inc()
        ctx.decision = "session"
        ctx.route, ctx.choice, ctx.candidates = route, choice, (account,)
        try:
            await self.app(scope, receive, send)
        except RouteExhausted as exc:
            raise exc.last from None
