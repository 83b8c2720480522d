"""The typed per-request context shared by the middleware chain.

One `RequestContext` lives in the ASGI scope under `SCOPE_KEY`. It is the inventory of
everything that crosses a middleware boundary; each field names its single writer.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.types import Scope

if TYPE_CHECKING:
    from affinity.fingerprint import Fingerprint
    from affinity.select import Choice
    from affinity.types import Demand
    from gateway.config import Route
    from gateway.upstream import Account
    from gateway.usage import Usage

SCOPE_KEY = "affinity_gateway.ctx"


class Family(enum.StrEnum):
    """The API family a caller speaks; errors are rendered in it."""

    OPENAI = "openai"
    ANTHROPIC = "anthropic"


class Endpoint(enum.StrEnum):
    """Proxied endpoints. The value is the path below the provider's `/v1` root."""

    CHAT = "chat/completions"
    MESSAGES = "messages"
    COUNT_TOKENS = "messages/count_tokens"
    EMBEDDINGS = "embeddings"
    RESPONSES = "responses"

    @property
    def family(self) -> Family:
        if self in (Endpoint.MESSAGES, Endpoint.COUNT_TOKENS):
            return Family.ANTHROPIC
        return Family.OPENAI


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a token and what it may use. Never holds the key itself."""

    token: str
    user: str
    user_group: str
    group: str
    fallback_groups: tuple[str, ...] = ()
    rpm: int | None = None
    tpm: int | None = None
    budget_usd_day: float | None = None
    budget_usd_month: float | None = None
    admin: bool = False


@dataclass(frozen=True, slots=True)
class CacheHit:
    """An answer served by the platform response cache: no upstream call was made."""

    group: str  # the group whose cache policy served it
    provider: str  # the provider that produced the stored answer (its usage format)
    price_share: float  # of the normal price, charged for it


@dataclass(frozen=True, slots=True)
class Attempt:
    """One upstream attempt, as the failover middleware saw it."""

    account: str
    status: int  # HTTP status from the provider, or 0 for a connection error / timeout
    reason: str  # ok | connect_error | timeout | status_<code> | ...
    seconds: float


@dataclass(slots=True)
class RequestContext:
    request_id: str  # errors
    family: Family  # errors (from the path)
    endpoint: Endpoint | None = None  # errors (None for non-proxied routes)
    started: float = field(default_factory=time.perf_counter)  # errors

    principal: Principal | None = None  # auth

    raw_body: bytes = b""  # groups (read once, bounded)
    body: dict[str, Any] = field(default_factory=dict)  # groups (parsed once)
    model: str = ""  # groups
    stream: bool = False  # groups
    plan: tuple[Route, ...] = ()  # groups: token group, then fallback groups
    cache_status: str = ""  # response_cache: HIT | MISS | BYPASS; "" when the group has none
    cache_hit: CacheHit | None = None  # response_cache: set on a HIT
    # Top-level body fields to set before forwarding, one writer per key (pinning:
    # prompt_cache_key). Empty = forward the raw bytes.
    body_patch: dict[str, Any] = field(default_factory=dict)

    fingerprint: Fingerprint | None = None  # prefix
    demand: Demand | None = None  # prefix: token estimates for admission
    route: Route | None = None  # pinning: the plan step being tried
    choice: Choice | None = None  # pinning
    decision: str = ""  # pinning: the reason counted for this request
    candidates: tuple[Account, ...] = ()  # pinning: ordered, first is the pick

    account: Account | None = None  # failover: the account of the current attempt
    attempts: list[Attempt] = field(default_factory=list)  # failover

    upstream_status: int = 0  # upstream
    first_byte: float | None = None  # upstream: perf_counter when the first byte went out
    usage: Usage | None = None  # metering
    cost: float | None = None  # metering
    cache_discount: float = 0.0  # metering
    response_started: bool = False  # errors

    @staticmethod
    def of(scope: Scope) -> RequestContext:
        ctx: RequestContext = scope[SCOPE_KEY]
        return ctx

    @property
    def tokens_estimate(self) -> int:
        """Prompt size estimate (bytes / 4) before any tokenizer has run."""
        return len(self.raw_body) // 4
