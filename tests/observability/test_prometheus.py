"""Every PromQL expression of grafana/ against a real Prometheus scraping a real gateway.

The emulator and a gateway serve a workload that touches every metric: chat
completions streamed and not with a long shared system prompt (cache reads), Anthropic
messages, embeddings, an unknown model, provider 429s and 500s, and a stream cut before
its usage. A `prometheus` process scrapes the gateway every second and evaluates
grafana/prometheus/rules.yml every second. Then each dashboard query (with its template
variables instantiated as Grafana would for "All"), each variable query and each rule
must parse and return data, and every rule must be loaded and healthy.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from gateway.config import EncryptionKey
from gateway.emulator import EmulatorServer
from gateway.presets import emulated_config
from tests.conftest import (
    Emulator,
    GatewayHandle,
    LoopThread,
    emulator_config,
    free_port,
    start_gateway,
)
from tests.observability.exprs import (
    RULES,
    Query,
    dashboard_queries,
    instantiate,
    label_values,
    metric_names,
    rule_queries,
    rules,
    tool,
    variable_queries,
)

# Metrics the dashboards and rules are ready for but that a gateway may not export:
# an expression reading one of them may return no data only while /metrics lacks it.
OPTIONAL_METRICS = {
    "gateway_account_window_utilization": "per-account window gauges, not exported yet",
    "gateway_redis_fallbacks_total": "exported only with Redis state (state.redis_url)",
    "gateway_redis_circuit_open": "exported only with Redis state (state.redis_url)",
}

# Expressions that return nothing in a healthy run, each with the reason. Alert rules
# are not listed: they describe trouble, so for them parsing and loading is the check.
MAY_BE_EMPTY: dict[str, str] = {}

SYSTEM = "You are a meticulous assistant for an observability test. " * 250  # ~3.7k tokens
ACCOUNTS = 4


def http_json(url: str, timeout: float = 5) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def http_text(url: str, timeout: float = 5) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return str(r.read().decode())


@dataclass
class Prometheus:
    url: str

    def query(self, expr: str) -> dict[str, Any]:
        qs = urllib.parse.urlencode({"query": expr})
        try:
            body: dict[str, Any] = http_json(f"{self.url}/api/v1/query?{qs}")
        except urllib.error.HTTPError as exc:  # 400 on a parse error, with a JSON body
            body = json.loads(exc.read())
            exc.close()
        return body

    def vector(self, expr: str) -> list[dict[str, Any]]:
        body = self.query(expr)
        assert body["status"] == "success", (expr, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def value(self, expr: str) -> float:
        (sample,) = self.vector(expr)
        return float(sample["value"][1])


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    return tool("prometheus")


@pytest.fixture(scope="module")
def stack(
    loop_thread: LoopThread, request: pytest.FixtureRequest
) -> Iterator[tuple[Emulator, GatewayHandle]]:
    """A dedicated emulator and gateway: their metrics hold only this module's traffic."""
    state: dict[str, Any] = {}
    if importlib.util.find_spec("affinity.redis_state") and shutil.which("redis-server"):
        # A database of its own on the shared server: other tests' keys stay apart.
        redis = request.getfixturevalue("redis_server")
        state["redis_url"] = f"redis://127.0.0.1:{redis.port}/9"
    server = EmulatorServer(emulator_config(ACCOUNTS))
    loop_thread.run(server.start())
    config = emulated_config(server.url, accounts=ACCOUNTS, state=state)
    # The platform response cache on, so its panel has data (keys: Redis needs them).
    group = config.groups["default"]
    cache = group.response_cache.model_copy(update={"enabled": True})
    keys = (EncryptionKey(id="k1", key=base64.b64encode(bytes(range(32))).decode()),)
    config = config.model_copy(
        update={
            "groups": {"default": group.model_copy(update={"response_cache": cache})},
            "platform_cache": config.platform_cache.model_copy(update={"encryption_keys": keys}),
        }
    )
    gw = start_gateway(loop_thread, config)
    try:
        yield Emulator(server, loop_thread), gw
    finally:
        gw.stop()
        loop_thread.run(server.stop())


@pytest.fixture(scope="module")
def prometheus(
    prometheus_binary: str,
    stack: tuple[Emulator, GatewayHandle],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Prometheus]:
    _, gw = stack
    tmp = tmp_path_factory.mktemp("prometheus")
    target = gw.url.removeprefix("http://")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": "affinity-gateway",
                "static_configs": [{"targets": [target]}],
            }
        ],
    }
    (tmp / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    port = free_port()
    log_path = tmp / "prometheus.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                prometheus_binary,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    prom = Prometheus(f"http://127.0.0.1:{port}")
    try:
        wait_for(lambda: ready(prom, proc, log_path), 20, "prometheus to be ready")
        wait_for(
            lambda: [s for s in prom.vector("up") if s["value"][1] == "1"],
            10,
            "the first scrape of the gateway",
        )
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def ready(prom: Prometheus, proc: subprocess.Popen[bytes], log: Path) -> bool:
    if proc.poll() is not None:
        pytest.fail(f"prometheus exited with {proc.returncode}:\n{log.read_text()}")
    try:
        http_text(f"{prom.url}/-/ready", timeout=1)
    except OSError:
        return False
    return True


def wait_for(check: Any, seconds: float, what: str) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def chat(client: openai.OpenAI, question: str, **kw: Any) -> Any:
    kw.setdefault("max_tokens", 16)
    return client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        **kw,
    )


def workload_round(gw: GatewayHandle, n: int) -> None:
    oai = openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.key, max_retries=0)
    ant = anthropic.Anthropic(base_url=gw.url, api_key=gw.key, max_retries=0)
    with oai, ant:
        for i in range(3):
            chat(oai, f"round {n} question {i}")
        for _ in range(2):  # deterministic and tiny: the second is a platform-cache hit
            oai.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": f"round {n} asked twice"}],
                max_tokens=4,
                temperature=0,
            )
        for _ in chat(oai, f"round {n} streamed", stream=True):
            pass
        system: Any = [{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}]
        for i in range(2):
            ant.messages.create(
                model="claude-sonnet-4-6",
                max_tokens=16,
                system=system,
                messages=[{"role": "user", "content": f"round {n} message {i}"}],
            )
        with ant.messages.stream(
            model="claude-sonnet-4-6",
            max_tokens=16,
            system=system,
            messages=[{"role": "user", "content": f"round {n} streamed"}],
        ) as s:
            s.until_done()
        oai.embeddings.create(model="text-embedding-3-small", input=f"round {n}")
        # Short prompts are spread over the accounts: some reach acct-0.
        for i in range(2 * ACCOUNTS):
            oai.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": f"round {n} short {i}"}],
                max_tokens=4,
            )


def trouble(emulator: Emulator, gw: GatewayHandle, *, cut: bool) -> None:
    oai = openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.key, max_retries=0)
    with oai:
        with pytest.raises(openai.NotFoundError):
            oai.chat.completions.create(
                model="no-such-model", messages=[{"role": "user", "content": "x"}]
            )
        # Provider 429s on all accounts but one: whichever account routing picks first,
        # most requests meet a 429, cool that account down and fail over to the last one.
        for i in range(ACCOUNTS - 1):
            emulator.faults(f"acct-{i}", error_rate=1.0, status=429, retry_after=1)
        for i in range(2 * ACCOUNTS):
            oai.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": f"rate limited {i}"}],
                max_tokens=4,
            )
        for i in range(ACCOUNTS - 1):
            emulator.faults(f"acct-{i}")
        # Every account fails with 500: the caller gets a 5xx.
        for i in range(ACCOUNTS):
            emulator.faults(f"acct-{i}", error_rate=1.0, status=500)
        with pytest.raises(openai.APIStatusError) as failed:
            chat(oai, "everything is down")
        assert failed.value.status_code >= 500
        if cut:
            # A stream cut before its usage: metered as estimated.
            for i in range(ACCOUNTS):
                emulator.faults(f"acct-{i}", cut_after_chunks=2)
            with pytest.raises(openai.APIError):
                for _ in chat(oai, "cut short", stream=True, max_tokens=64):
                    pass
        for i in range(ACCOUNTS):
            emulator.faults(f"acct-{i}")


def requests_total(exposition: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in exposition.splitlines()
        if line.startswith("gateway_requests_total{")
    )


def settle(prom: Prometheus, gw: GatewayHandle) -> str:
    """Wait until Prometheus has scraped every request served so far; the exposition."""
    exposition = http_text(gw.url + "/metrics")
    total = requests_total(exposition)

    def scraped() -> bool:
        result = prom.vector("sum(gateway_requests_total)")
        return bool(result) and float(result[0]["value"][1]) == total

    wait_for(scraped, 10, "the gateway's requests to be scraped")
    return exposition


@pytest.fixture(scope="module")
def observed(
    stack: tuple[Emulator, GatewayHandle], prometheus: Prometheus
) -> tuple[Prometheus, str]:
    """Prometheus after the workload: returns it and the gateway's final /metrics text.

    Everything happens twice with a scrape in between, so that rates are not 0.
    """
    emulator, gw = stack
    workload_round(gw, 1)
    trouble(emulator, gw, cut=True)
    settle(prometheus, gw)
    workload_round(gw, 2)
    # Round 1's 429s cooled their accounts down for a second (Retry-After: 1); while any
    # still cools, routing skips it and round 2 meets no 429 there, leaving the
    # per-account 429 rate at 0.
    time.sleep(1.2)
    trouble(emulator, gw, cut=False)
    exposition = settle(prometheus, gw)
    time.sleep(2.5)  # two more scrapes and rule evaluations over the final values
    return prometheus, exposition


def exported_names(exposition: str) -> set[str]:
    return {
        line.split("{", 1)[0].split(" ", 1)[0]
        for line in exposition.splitlines()
        if line and not line.startswith("#")
    }


def all_queries() -> list[Query]:
    return [*dashboard_queries(), *rule_queries()]


def test_promtool_check_metrics(observed: tuple[Prometheus, str]) -> None:
    _, exposition = observed
    out = subprocess.run(
        [tool("promtool"), "check", "metrics"], input=exposition, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_metric_read_is_exported_or_known_optional(
    observed: tuple[Prometheus, str],
) -> None:
    _, exposition = observed
    exported = exported_names(exposition)
    recorded = {r["record"] for r in rules() if "record" in r}
    unknown = {
        (q.where, name)
        for q in all_queries()
        for name in metric_names(q.expr)
        if name not in exported and name not in recorded and name not in OPTIONAL_METRICS
    }
    assert not unknown, sorted(unknown)


def test_every_expression_parses_and_returns_data(observed: tuple[Prometheus, str]) -> None:
    prom, exposition = observed
    exported = exported_names(exposition)
    problems: list[str] = []
    checked = 0
    for q in all_queries():
        expr = instantiate(q.expr)
        body = prom.query(expr)
        if body.get("status") != "success":
            problems.append(f"{q.where}: {body.get('error')}\n  {expr}")
            continue
        checked += 1
        if q.alert or body["data"]["result"]:
            continue
        missing = metric_names(q.expr) & OPTIONAL_METRICS.keys() - exported
        if q.where in MAY_BE_EMPTY or missing:
            continue
        problems.append(f"{q.where}: no data\n  {expr}")
    assert not problems, "\n".join(problems)
    assert checked > 50


def test_recorded_series_exist(observed: tuple[Prometheus, str]) -> None:
    prom, _ = observed
    empty = [r["record"] for r in rules() if "record" in r and not prom.vector(r["record"])]
    assert not empty


def test_every_rule_is_loaded_and_healthy(observed: tuple[Prometheus, str]) -> None:
    prom, _ = observed
    body = http_json(f"{prom.url}/api/v1/rules")
    loaded = {
        rule["name"]: rule
        for group in body["data"]["groups"]
        for rule in group["rules"]
        if group["file"] == str(RULES)
    }
    expected = {r.get("record") or r["alert"] for r in rules()}
    assert set(loaded) == expected
    unhealthy = {
        name: rule.get("lastError") for name, rule in loaded.items() if rule["health"] != "ok"
    }
    assert not unhealthy


def test_variable_queries_find_values(observed: tuple[Prometheus, str]) -> None:
    prom, _ = observed
    for where, query in variable_queries():
        selector, label = label_values(query)
        qs = urllib.parse.urlencode({"match[]": instantiate(selector)})
        body = http_json(f"{prom.url}/api/v1/label/{label}/values?{qs}")
        assert body["status"] == "success", where
        assert body["data"], f"{where}: no values"
    qs = urllib.parse.urlencode({"match[]": "gateway_requests_total"})
    assert "gpt-4o-mini" in http_json(f"{prom.url}/api/v1/label/model/values?{qs}")["data"]


def test_the_numbers_mean_what_the_panels_say(observed: tuple[Prometheus, str]) -> None:
    prom, _ = observed
    # The long system prompt is read back from the provider cache in both rounds.
    hit = prom.value('model:gateway_cache_hit_ratio:rate5m{model="gpt-4o-mini"}')
    assert 0.2 < hit < 1
    # OpenAI cached input is half price: caching saved money on gpt-4o-mini.
    assert prom.value('group_model:gateway_savings_usd:rate5m{model="gpt-4o-mini"}') > 0
    assert prom.value("sum(rate(gateway_requests_total[30s]))") > 0
    p99 = prom.value(
        "histogram_quantile(0.99, sum by (le) (rate(gateway_request_duration_seconds_bucket[30s])))"
    )
    assert 0 < p99 < 30
    codes = {
        s["metric"]["outcome"]
        for s in prom.vector('sum by (outcome) (gateway_upstream_attempts_total{outcome!="ok"})')
    }
    assert {"status_429", "status_500"} <= codes
    assert max(float(s["value"][1]) for s in prom.vector("account:gateway_upstream_429:rate5m")) > 0
    assert prom.value('group:gateway_requests_5xx:ratio_rate5m{group="default"}') > 0
    assert prom.vector("gateway_usage_estimated_total")


def label_values_in(exposition: str, label: str) -> set[str]:
    pattern = re.compile(rf'[{{,]{label}="((?:[^"\\]|\\.)*)"')
    return {
        value
        for line in exposition.splitlines()
        if line.startswith("gateway_")
        for value in pattern.findall(line)
    }


def test_model_labels_are_configured_models(
    stack: tuple[Emulator, GatewayHandle], observed: tuple[Prometheus, str]
) -> None:
    _, gw = stack
    _, exposition = observed
    # The workload asked for "no-such-model": a caller's free text is never a label value.
    configured = {m for g in gw.app.config.groups.values() for m in g.models}
    assert label_values_in(exposition, "model") <= configured | {""}


def test_only_cut_streams_are_estimated(observed: tuple[Prometheus, str]) -> None:
    _, exposition = observed
    estimated = sum(
        float(line.rsplit(" ", 1)[1])
        for line in exposition.splitlines()
        if line.startswith("gateway_usage_estimated_total{")
    )
    assert estimated == 1  # the one stream trouble() cut
