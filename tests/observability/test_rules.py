"""The Prometheus rules: valid for promtool, unit-tested, and every alert is tested both
firing and quiet."""

from __future__ import annotations

import subprocess
from collections import defaultdict

import yaml

from tests.observability.exprs import RULES, RULES_TEST, rules, tool


def test_promtool_check_rules() -> None:
    out = subprocess.run(
        [tool("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_unit_tests() -> None:
    out = subprocess.run(
        [tool("promtool"), "test", "rules", RULES_TEST.name],
        capture_output=True,
        text=True,
        cwd=RULES_TEST.parent,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_is_unit_tested_firing_and_quiet() -> None:
    doc = yaml.safe_load(RULES_TEST.read_text())
    seen: dict[str, set[bool]] = defaultdict(set)
    for case in doc["tests"]:
        for check in case.get("alert_rule_test", []):
            seen[check["alertname"]].add(bool(check.get("exp_alerts")))
    alerts = {r["alert"] for r in rules() if "alert" in r}
    assert alerts
    missing = {name: {True, False} - seen[name] for name in alerts}
    assert not {k: v for k, v in missing.items() if v}, "alerts lacking a firing/quiet test"


def test_alerts_carry_severity_and_summary() -> None:
    for rule in rules():
        if "alert" in rule:
            assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
            assert rule["annotations"]["summary"], rule["alert"]


def test_recorded_names_follow_the_convention() -> None:
    for rule in rules():
        if "record" in rule:
            level, metric, ops = rule["record"].split(":")
            assert level and metric.startswith("gateway_") and ops, rule["record"]
