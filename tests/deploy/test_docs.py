"""docs/deploy.md against the files it describes: the paths it names exist, the metric
names it lists are the gateway's, its shutdown arithmetic is the manifests', and the
only placeholders are the figures a benchmark will measure."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.deploy.support import DEPLOY, REPO, arg_value

DOC = (REPO / "docs" / "deploy.md").read_text(encoding="utf-8")
REQUIRED_METRICS = (
    "gateway_requests_total",
    "gateway_cached_tokens_total",
    "gateway_prompt_tokens_total",
    "gateway_affinity_decisions_total",
    "gateway_upstream_attempts_total",
    "gateway_redis_fallbacks_total",
)
GATEWAY_SOURCE = "\n".join(p.read_text(encoding="utf-8") for p in (REPO / "gateway").rglob("*.py"))


def test_names_the_metrics_to_watch() -> None:
    for metric in REQUIRED_METRICS:
        assert f"`{metric}`" in DOC, metric


@pytest.mark.parametrize("metric", sorted(set(re.findall(r"\bgateway_[a-z_]+\b", DOC))))
def test_every_metric_named_is_exported_by_the_gateway(metric: str) -> None:
    family = re.sub(r"_(total|bucket|sum|count)$", "", metric)
    assert f'"{family}"' in GATEWAY_SOURCE, f"{metric}: no metric family {family!r} in gateway/"


@pytest.mark.parametrize(
    "path",
    sorted(set(re.findall(r"`((?:deploy|grafana|examples|tests|docs|bench)/[^`\s]*)`", DOC))),
)
def test_every_path_named_exists(path: str) -> None:
    assert (REPO / path).exists(), path


def test_shutdown_arithmetic_is_the_deployments() -> None:
    deployment = yaml.safe_load((DEPLOY / "k8s/base/deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    (gateway,) = pod["containers"]
    sleep = gateway["lifecycle"]["preStop"]["exec"]["command"][1]
    drain = arg_value(gateway["args"], "--drain-seconds")
    grace = pod["terminationGracePeriodSeconds"]
    assert f"(`sleep {sleep}`)" in DOC
    assert f"**{grace} s = {sleep} s + {drain} s + margin**" in DOC


def test_no_placeholders_left() -> None:
    assert "PLACEHOLDER" not in DOC
    assert not re.search(r"\b(TODO|TBD|FIXME|XXX)\b", DOC)


def test_sizing_figures_are_the_manifests() -> None:
    deployment = yaml.safe_load((DEPLOY / "k8s/base/deployment.yaml").read_text())
    (gateway,) = deployment["spec"]["template"]["spec"]["containers"]
    requests, limits = gateway["resources"]["requests"], gateway["resources"]["limits"]
    assert f"asks for {requests['cpu']} CPU\nand caps at {limits['cpu']} CPU" in DOC
    assert f"({requests['memory']} requested, {limits['memory']} limit)" in DOC
    hpa = yaml.safe_load((DEPLOY / "k8s/base/horizontalpodautoscaler.yaml").read_text())
    (metric,) = hpa["spec"]["metrics"]
    assert f"{metric['resource']['target']['averageUtilization']} % CPU" in DOC
    patch = (DEPLOY / "k8s/overlays/replicated/kustomization.yaml").read_text()
    low, high = re.findall(r"path: /spec/(?:min|max)Replicas\s+value: (\d+)", patch)
    assert f"the HPA scales {low}\u2013{high} on CPU" in DOC  # an en dash
