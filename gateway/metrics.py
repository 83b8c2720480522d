"""Every Prometheus object of the gateway, on its own registry.

Labels are bounded by configuration: endpoint, group, model (only configured models
get past the groups layer), account, provider, status class, reason. Never a token,
a user, a key or a hash.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

M = TypeVar("M", bound=MetricWrapperBase)

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _Callback(Collector):
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()


class Metrics:
    def __init__(self) -> None:
        # metric.labels() validates, locks and hashes its values on every call; the label
        # sets are bounded by configuration, so each child is looked up once.
        self._children: dict[tuple[MetricWrapperBase, tuple[str, ...]], MetricWrapperBase] = {}
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "gateway_requests",
            "Requests answered, by endpoint, group, model and HTTP status class.",
            ["endpoint", "group", "model", "status_class"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "gateway_request_duration_seconds",
            "Time from the request's arrival to its last response byte.",
            ["endpoint", "group"],
            buckets=_LATENCY,
            registry=r,
        )
        self.ttfb_seconds = Histogram(
            "gateway_time_to_first_byte_seconds",
            "Time from the request's arrival to the first response byte sent to the client.",
            ["endpoint", "group"],
            buckets=_LATENCY,
            registry=r,
        )
        self.attempts = Counter(
            "gateway_upstream_attempts",
            "Upstream attempts by account and outcome (ok, status_<code>, connect_error, timeout,"
            " client_gone).",
            ["account", "outcome"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "gateway_prompt_tokens",
            "Input tokens reported by providers (cached and not).",
            ["group", "model", "account"],
            registry=r,
        )
        self.cached_tokens = Counter(
            "gateway_cached_tokens",
            "Input tokens the provider served from its prompt cache.",
            ["group", "model", "account"],
            registry=r,
        )
        self.cache_write_tokens = Counter(
            "gateway_cache_write_tokens",
            "Input tokens the provider wrote to its prompt cache.",
            ["group", "model", "account"],
            registry=r,
        )
        self.completion_tokens = Counter(
            "gateway_completion_tokens",
            "Output tokens reported by providers.",
            ["group", "model", "account"],
            registry=r,
        )
        self.cost = Counter(
            "gateway_cost_usd",
            "What callers were charged, in USD (price times group multiplier).",
            ["group", "model"],
            registry=r,
        )
        self.uncached_cost = Counter(
            "gateway_uncached_cost_usd",
            "What the same requests would have cost with no prompt caching, in USD"
            " (savings = this - gateway_cost_usd).",
            ["group", "model"],
            registry=r,
        )
        self.decisions = Counter(
            "gateway_affinity_decisions",
            "Routing decisions by reason (longest_match, rendezvous, session, fixed, hot_spread,"
            " spill_headroom, round_robin, fallback_group, saturated).",
            ["group", "reason"],
            registry=r,
        )
        self.in_flight = Gauge(
            "gateway_account_in_flight",
            "Requests in flight per upstream account.",
            ["account"],
            registry=r,
        )
        self.usage_estimated = Counter(
            "gateway_usage_estimated",
            "Requests whose usage was estimated because the stream ended before usage arrived.",
            ["group", "model"],
            registry=r,
        )
        self.platform_cache_hits = Counter(
            "gateway_platform_cache_hits",
            "Answers served by the platform response cache, with no upstream call (provider"
            " prompt-cache reads are gateway_cached_tokens).",
            ["group", "model"],
            registry=r,
        )
        self.platform_cache_requests = Counter(
            "gateway_platform_cache_requests",
            "Requests of groups with a response cache, by cache status (hit, miss, bypass).",
            ["group", "model", "status"],
            registry=r,
        )

    def child(self, metric: M, *values: str) -> M:
        """``metric.labels(*values)``, remembered."""
        key = (metric, values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found  # type: ignore[return-value]

    def add_collector(self, collect: Callable[[], Iterable[Metric]]) -> None:
        """Register gauges read at scrape time (pin index size, windows, Redis state)."""
        self.registry.register(_Callback(collect))

    def render(self) -> bytes:
        return generate_latest(self.registry)
