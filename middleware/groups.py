"""Resolve the caller's route plan. Reads ctx.principal and the body; writes ctx.raw_body,
ctx.body, ctx.model, ctx.stream and ctx.plan.

The body is read here, once and bounded, because this is the first layer that needs
it (auth rejects strangers before a byte of their body is read). The plan is the
token's group, then its fallback groups, keeping those that the user group may use,
that offer the model, and whose pool speaks the endpoint.
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.body import parse_json_object, read_body
from gateway.config import GroupConfig, Route, UserGroupConfig
from gateway.context import Principal, RequestContext
from gateway.errors import BadRequest, Forbidden, NotFound


class GroupsMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        groups: Mapping[str, GroupConfig],
        user_groups: Mapping[str, UserGroupConfig],
        pool_endpoints: Mapping[str, frozenset[str]],
        max_body_bytes: int,
    ) -> None:
        self.app = app
        self.groups = dict(groups)
        self.allowed = {name: frozenset(ug.groups) for name, ug in user_groups.items()}
        self.pool_endpoints = dict(pool_endpoints)
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = RequestContext.of(scope)
        assert ctx.principal is not None and ctx.endpoint is not None
        ctx.raw_body = await read_body(scope, receive, self.max_body_bytes)
        ctx.body = body = parse_json_object(scope, ctx.raw_body)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("'model' is required and must be a string", param="model")
        ctx.model = model
        ctx.stream = body.get("stream") is True
        ctx.plan = self.plan(ctx.principal, model, ctx.endpoint.value)
        await self.app(scope, receive, send)

    def plan(self, principal: Principal, model: str, endpoint: str) -> tuple[Route, ...]:
        names = (principal.group, *principal.fallback_groups)
        if not principal.fallback_groups:
            names = (principal.group, *self.groups[principal.group].fallback_groups)
        allowed = self.allowed.get(principal.user_group)
        offering = [n for n in dict.fromkeys(names) if model in self.groups[n].models]
        if not offering:
            elsewhere = sorted(n for n, g in self.groups.items() if model in g.models)
            where = f"; it is offered by group(s): {', '.join(elsewhere)}" if elsewhere else ""
            raise NotFound(
                f"model {model!r} is not available to this key{where}",
                code="model_not_found",
                param="model",
            )
        permitted = [n for n in offering if allowed is None or n in allowed]
        if not permitted:
            raise Forbidden(
                f"user group {principal.user_group!r} may not use group(s) "
                f"{', '.join(offering)}, which offer model {model!r}"
            )
        routes = []
        for name in permitted:
            group = self.groups[name]
            pool = group.models[model]
            if endpoint in self.pool_endpoints[pool]:
                routes.append(Route(name, pool, group.multiplier, group.affinity))
        if not routes:
            raise BadRequest(
                f"model {model!r} is not served over /v1/{endpoint} in group(s) "
                f"{', '.join(permitted)}",
                code="endpoint_not_supported",
            )
        return tuple(routes)
