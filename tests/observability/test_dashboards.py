"""Lint of the Grafana dashboards and provisioning files: what Grafana needs to load
them, and what an operator needs to trust them (a unit and a query on every panel, one
datasource variable, only defined template variables)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.observability.exprs import (
    DATASOURCE_REF,
    GRAFANA,
    dashboard_files,
    label_values,
    load,
    panels,
    used_variables,
    variables,
)

EXPECTED = {"overview.json", "affinity.json", "accounts.json"}
FILES = dashboard_files()


def test_the_three_dashboards_are_there() -> None:
    assert {p.name for p in FILES} >= EXPECTED


@pytest.fixture(params=FILES, ids=[p.name for p in FILES])
def dashboard(request: pytest.FixtureRequest) -> dict[str, Any]:
    path: Path = request.param
    return load(path)


def test_datasource_variable(dashboard: dict[str, Any]) -> None:
    var = variables(dashboard).get("datasource")
    assert var is not None, "no $datasource variable"
    assert var["type"] == "datasource"
    assert var["query"] == "prometheus"


@pytest.mark.parametrize("name", ["group", "model"])
def test_group_and_model_variables(dashboard: dict[str, Any], name: str) -> None:
    var = variables(dashboard).get(name)
    assert var is not None, f"no ${name} variable"
    assert var["type"] == "query"
    assert var["datasource"] == DATASOURCE_REF
    _, label = label_values(var["query"])
    assert label == name
    # Panels match with =~, so "All" must be a regex rather than Grafana's value list.
    assert var["includeAll"] is True and var["allValue"] == ".*"


def test_every_panel_has_queries_and_a_unit(dashboard: dict[str, Any]) -> None:
    found = list(panels(dashboard))
    assert found
    for panel in found:
        title = panel.get("title")
        assert panel["type"] != "row", f"{title}: rows carry no data; use panels"
        targets = panel.get("targets") or []
        assert targets, f"{title}: no query"
        for target in targets:
            assert str(target.get("expr", "")).strip(), f"{title}: target without an expr"
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
        assert isinstance(unit, str) and unit, f"{title}: no unit"
        assert panel.get("description"), f"{title}: no description"


def test_every_datasource_reference_uses_the_variable(dashboard: dict[str, Any]) -> None:
    refs: list[tuple[str, Any]] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "datasource":
                    refs.append((path, value))
                else:
                    walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")

    walk(dashboard, "$")
    assert refs
    bad = [(path, ref) for path, ref in refs if ref != DATASOURCE_REF]
    assert not bad, bad


def test_queries_use_only_defined_variables(dashboard: dict[str, Any]) -> None:
    defined = set(variables(dashboard)) | {"__rate_interval", "__interval", "__range"}
    for panel in panels(dashboard):
        for target in panel["targets"]:
            unknown = used_variables(target["expr"]) - defined
            assert not unknown, f"{panel['title']}: undefined {sorted(unknown)}"
    for name, var in variables(dashboard).items():
        unknown = used_variables(str(var.get("query", ""))) - defined
        assert not unknown, f"${name}: undefined {sorted(unknown)}"


def test_layout(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: dict[tuple[int, int], str] = {}
    for panel in panels(dashboard):
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, f"{panel['title']}: off the grid"
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                other = cells.setdefault((x, y), panel["title"])
                assert other == panel["title"], f"{panel['title']} overlaps {other}"


def test_dashboard_identity() -> None:
    docs = [load(p) for p in FILES]
    uids = [d["uid"] for d in docs]
    assert len(set(uids)) == len(uids)
    assert all(d.get("id") is None for d in docs), "provisioned dashboards carry no id"
    assert all(0 < len(uid) <= 40 for uid in uids)


def test_provisioning() -> None:
    ds = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yaml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    boards = yaml.safe_load((GRAFANA / "provisioning/dashboards/dashboards.yaml").read_text())
    (provider,) = boards["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
