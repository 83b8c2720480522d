"""The one YAML configuration file, validated once at start.

Unknown keys are rejected, `${VAR}` / `${VAR:-default}` pull secrets from the
environment, and every error names the path of the bad value.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gateway.crypto import KeyRing

Provider = Literal["openai", "anthropic", "deepseek", "gemini-openai"]
AffinityMode = Literal["prefix", "session", "fixed", "off"]

# Which proxied endpoints each provider speaks (paths below its /v1 root).
PROVIDER_ENDPOINTS: Mapping[str, frozenset[str]] = {
    "openai": frozenset({"chat/completions", "embeddings", "responses"}),
    "anthropic": frozenset({"messages", "messages/count_tokens"}),
    "deepseek": frozenset({"chat/completions"}),
    "gemini-openai": frozenset({"chat/completions", "embeddings"}),
}


class ConfigError(Exception):
    """A configuration that cannot be used; the message names the bad path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


PositiveInt = Annotated[int, Field(gt=0)]
Seconds = Annotated[float, Field(gt=0)]


class Timeouts(_Strict):
    connect: Seconds = 10.0
    first_byte: Seconds = 120.0  # until the provider's first response byte
    idle: Seconds = 120.0  # between two chunks of a stream
    total: Seconds | None = None  # none by default: a 10-minute stream must not be cut


class Server(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    secret: str = Field(min_length=16)  # keys the token hashes (HMAC-SHA256)
    max_body_bytes: PositiveInt = 10 * 1024 * 1024
    max_messages: PositiveInt = 10_000  # messages in one request; more is a 400
    # With admin_port set, /metrics and /admin/* answer only there (bound to admin_host).
    admin_port: int | None = Field(None, ge=1, le=65535)
    admin_host: str = "127.0.0.1"
    metrics_need_admin: bool = False  # /metrics asks for an admin key
    timeouts: Timeouts = Timeouts()


class State(_Strict):
    redis_url: str = ""  # empty: embedded, per process
    redis_socket_timeout: Seconds = 0.05  # a slower Redis is bypassed, never waited for
    key_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")] = "ag"  # shared by replicas
    usage_retention_seconds: Seconds = 30 * 86400.0
    usage_max_records: PositiveInt = 100_000  # embedded log: the newest N records


class Limits(_Strict):
    rpm: PositiveInt | None = None
    itpm: PositiveInt | None = None
    otpm: PositiveInt | None = None
    concurrency: PositiveInt | None = None


class AccountConfig(_Strict):
    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")]
    provider: Provider
    base_url: Annotated[str, Field(pattern=r"^https?://")]
    api_key: Annotated[str, Field(min_length=1, repr=False)]
    cache_domain: str = ""  # accounts of one provider org share its cache; default: own name
    limits: Limits = Limits()
    weight: Annotated[float, Field(gt=0)] = 1.0


class ResponseCacheConfig(_Strict):
    """The platform response cache of one group (off unless enabled)."""

    enabled: bool = False
    ttl_seconds: Seconds = 3600.0
    shared: bool = False  # answers shared by the group's tokens; default: per token
    price_share: Annotated[float, Field(ge=0, le=1)] = 0.1  # of the normal price, per hit
    cache_nondeterministic: bool = False  # also cache sampled answers (temperature > 0, ...)
    max_entry_bytes: PositiveInt = 1 << 20  # larger answers are not stored
    max_ttl_seconds: Seconds = 7 * 86400.0  # the most an `x-cache-ttl` header may ask for


class GroupConfig(_Strict):
    models: dict[str, str]  # model -> pool
    multiplier: Annotated[float, Field(ge=0)] = 1.0
    fallback_groups: tuple[str, ...] = ()
    affinity: AffinityMode = "prefix"
    response_cache: ResponseCacheConfig = ResponseCacheConfig()


class UserGroupConfig(_Strict):
    groups: tuple[str, ...]


class TokenConfig(_Strict):
    name: Annotated[str, Field(min_length=1)]
    key_hash: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    user: str = ""
    user_group: str = "default"
    group: str
    fallback_groups: tuple[str, ...] = ()
    rpm: PositiveInt | None = None  # per-token limits, per replica
    tpm: PositiveInt | None = None
    budget_usd_day: Annotated[float, Field(ge=0)] | None = None  # refused once spent
    budget_usd_month: Annotated[float, Field(ge=0)] | None = None
    admin: bool = False  # reads every token's usage, manages tokens


class PriceConfig(_Strict):
    """USD per 1M tokens, or per call."""

    input: Annotated[float, Field(ge=0)] = 0.0
    cached_input: Annotated[float, Field(ge=0)] | None = None
    cache_write_5m: Annotated[float, Field(ge=0)] | None = None
    cache_write_1h: Annotated[float, Field(ge=0)] | None = None
    output: Annotated[float, Field(ge=0)] = 0.0
    per_call: Annotated[float, Field(ge=0)] | None = None


class AffinityConfig(_Strict):
    alpha: Annotated[float, Field(gt=0, le=1)] = 0.8
    min_tokens: PositiveInt = 1024
    min_tokens_by_model: dict[str, PositiveInt] = {}
    ttl_seconds: Seconds = 300.0
    window_seconds: Seconds = 60.0


class FailoverConfig(_Strict):
    deadline: Seconds = 30.0  # no retry starts later than this after the request arrived
    backoff_base: Seconds = 0.025  # full-jitter back-off: up to base x 2^(retry-1) ...
    backoff_max: Seconds = 1.0  # ... and never more than this
    retry_ratio: Annotated[float, Field(ge=0, le=1)] = 0.2  # retry budget: share of requests
    min_retries_in_flight: Annotated[int, Field(ge=0)] = 3  # retry budget floor
    eject_after: PositiveInt = 5  # consecutive failures
    base_ejection: Seconds = 10.0  # doubles with each ejection in a row ...
    max_ejection: Seconds = 300.0  # ... up to this
    max_ejected_share: Annotated[float, Field(ge=0, le=1)] = 0.5  # of a pool; one always stays


class EncryptionKey(_Strict):
    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    key: Annotated[str, Field(min_length=1, repr=False)]  # base64 of 32 bytes: ${ENV_VAR}


class PlatformCacheConfig(_Strict):
    """The Cache API and the storage of both platform caches."""

    # AES-256-GCM keys; the first encrypts, all decrypt. Empty: a random per-process key,
    # which only embedded state can use (with Redis, the Cache API is then off).
    encryption_keys: tuple[EncryptionKey, ...] = ()
    api_enabled: bool = True
    quota_bytes: PositiveInt = 100 * 1024 * 1024  # per token
    default_ttl_seconds: Seconds = 7 * 86400.0
    max_ttl_seconds: Seconds = 365 * 86400.0
    max_value_bytes: PositiveInt = 1 << 20
    memory_max_bytes: PositiveInt = 256 << 20  # embedded state: per cache, LRU beyond it


class Config(_Strict):
    server: Server
    state: State = State()
    accounts: tuple[AccountConfig, ...]
    pools: dict[str, tuple[str, ...]]
    groups: dict[str, GroupConfig]
    user_groups: dict[str, UserGroupConfig] = {}
    tokens: tuple[TokenConfig, ...] = ()
    pricing: dict[str, PriceConfig] = {}
    affinity: AffinityConfig = AffinityConfig()
    failover: FailoverConfig = FailoverConfig()
    platform_cache: PlatformCacheConfig = PlatformCacheConfig()

    @model_validator(mode="after")
    def _references(self) -> Config:
        names = [a.name for a in self.accounts]
        if len(set(names)) != len(names):
            raise ValueError("accounts: account names must be unique")
        known = set(names)
        for pool, members in self.pools.items():
            if not members:
                raise ValueError(f"pools.{pool}: a pool needs at least one account")
            for member in members:
                if member not in known:
                    raise ValueError(f"pools.{pool}: unknown account {member!r}")
        for gname, group in self.groups.items():
            for model, pool in group.models.items():
                if pool not in self.pools:
                    raise ValueError(f"groups.{gname}.models.{model}: unknown pool {pool!r}")
            for fb in group.fallback_groups:
                if fb not in self.groups:
                    raise ValueError(f"groups.{gname}.fallback_groups: unknown group {fb!r}")
        for uname, ug in self.user_groups.items():
            for g in ug.groups:
                if g not in self.groups:
                    raise ValueError(f"user_groups.{uname}.groups: unknown group {g!r}")
        seen: set[str] = set()
        for i, tok in enumerate(self.tokens):
            where = f"tokens.{i}"
            if tok.name in seen:
                raise ValueError(f"{where}.name: duplicate token name {tok.name!r}")
            seen.add(tok.name)
            if tok.group not in self.groups:
                raise ValueError(f"{where}.group: unknown group {tok.group!r}")
            for fb in tok.fallback_groups:
                if fb not in self.groups:
                    raise ValueError(f"{where}.fallback_groups: unknown group {fb!r}")
            if self.user_groups and tok.user_group not in self.user_groups:
                raise ValueError(f"{where}.user_group: unknown user group {tok.user_group!r}")
        keys = self.platform_cache.encryption_keys
        if keys:
            try:
                KeyRing.from_base64([(k.id, k.key) for k in keys])
            except ValueError as exc:  # names the key id, never the key
                raise ValueError(f"platform_cache.encryption_keys: {exc}") from None
        elif self.state.redis_url:
            for gname, group in self.groups.items():
                if group.response_cache.enabled:
                    raise ValueError(
                        f"groups.{gname}.response_cache: with state.redis_url set, "
                        "platform_cache.encryption_keys are required"
                    )
        return self

    def key_ring(self) -> KeyRing | None:
        """The configured platform-cache keys, or None when there are none."""
        keys = self.platform_cache.encryption_keys
        return KeyRing.from_base64([(k.id, k.key) for k in keys]) if keys else None

    def min_tokens(self, model: str) -> int:
        return self.affinity.min_tokens_by_model.get(model, self.affinity.min_tokens)


@dataclass(frozen=True, slots=True)
class Route:
    """One step of a request's route plan: a group and the pool serving the model there."""

    group: str
    pool: str
    multiplier: float
    affinity: AffinityMode


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(node: Any, path: str) -> Any:
    if isinstance(node, str):

        def sub(m: re.Match[str]) -> str:
            value = os.environ.get(m.group(1), m.group(2))
            if value is None:
                raise ConfigError(
                    f"{path or '<root>'}: environment variable {m.group(1)} is not set"
                )
            return value

        return _ENV.sub(sub, node)
    if isinstance(node, dict):
        return {k: _expand(v, f"{path}.{k}" if path else str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand(v, f"{path}.{i}") for i, v in enumerate(node)]
    return node


def parse_config(data: Any) -> Config:
    if not isinstance(data, dict):
        raise ConfigError("<root>: the configuration must be a mapping")
    try:
        return Config.model_validate(_expand(data, ""))
    except ValidationError as exc:
        lines = []
        for err in exc.errors(include_url=False, include_input=False):
            msg = err["msg"].removeprefix("Value error, ")
            if err["loc"]:
                msg = ".".join(str(p) for p in err["loc"]) + ": " + msg
            lines.append(msg)
        raise ConfigError("\n".join(lines)) from None


def load_config(path: str | Path) -> Config:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(data)
