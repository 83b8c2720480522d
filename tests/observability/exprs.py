"""The PromQL of grafana/: dashboard targets, template variables and rules, as data.

Grafana substitutes its variables before a query reaches Prometheus; `instantiate`
does the same with the values an "All" selection and a short time range produce.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
GRAFANA = REPO / "grafana"
DASHBOARDS = GRAFANA / "dashboards"
RULES = GRAFANA / "prometheus" / "rules.yml"
RULES_TEST = GRAFANA / "prometheus" / "rules_test.yml"

DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}

# What Grafana sends for "All" (allValue ".*") and a short time range.
VALUES = {
    "__rate_interval": "30s",
    "__interval": "15s",
    "__range": "5m",
    "group": ".*",
    "model": ".*",
    "account": ".*",
}
_VAR = re.compile(r"\$\{(\w+)\}|\$(\w+)")
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
_LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>\w+)\)$")


@dataclass(frozen=True)
class Query:
    where: str  # "overview.json: Cache hit ratio [A]" or "rule model:...:rate5m"
    expr: str
    alert: bool = False


def dashboard_files() -> list[Path]:
    return sorted(DASHBOARDS.glob("*.json"))


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}


def dashboard_queries() -> Iterator[Query]:
    for path in dashboard_files():
        for panel in panels(load(path)):
            for target in panel.get("targets", []):
                where = f"{path.name}: {panel.get('title')} [{target.get('refId')}]"
                yield Query(where, target["expr"])


def label_values(query: str) -> tuple[str, str]:
    """(series selector, label) of a `label_values(selector, label)` variable query."""
    m = _LABEL_VALUES.match(query.strip())
    if m is None:
        raise ValueError(f"not a label_values(selector, label) query: {query!r}")
    return m["selector"].strip(), m["label"]


def variable_queries() -> Iterator[tuple[str, str]]:
    for path in dashboard_files():
        for name, var in variables(load(path)).items():
            if var.get("type") == "query":
                yield f"{path.name}: ${name}", var["query"]


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def rule_queries() -> Iterator[Query]:
    for rule in rules():
        if "alert" in rule:
            yield Query(f"alert {rule['alert']}", rule["expr"], alert=True)
        else:
            yield Query(f"rule {rule['record']}", rule["expr"])


def instantiate(expr: str) -> str:
    def value(m: re.Match[str]) -> str:
        name = m[1] or m[2]
        if name not in VALUES:
            raise KeyError(f"no test value for template variable ${name}")
        return VALUES[name]

    return _VAR.sub(value, expr)


def used_variables(expr: str) -> set[str]:
    return {m[1] or m[2] for m in _VAR.finditer(expr)}


def metric_names(expr: str) -> set[str]:
    """Names of the gateway's series and of recorded series an expression reads."""
    bare = _QUOTED.sub('""', expr)
    return {n for n in _NAME.findall(bare) if n.startswith("gateway_") or n.count(":") == 2}


def tool(name: str) -> str:
    """Path of a Prometheus binary: skipped when missing locally, a failure in CI."""
    path = shutil.which(name)
    if path is None:
        why = f"{name} is not installed (apt-get install -y prometheus)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(why)
        pytest.skip(why)
    return path
