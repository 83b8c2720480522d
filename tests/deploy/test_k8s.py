"""Kubernetes manifests: every kustomization renders, validates against the API schemas
of Kubernetes 1.29 and 1.33, and has the properties the deployment relies on."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml

from gateway.config import ConfigError, parse_config
from tests.deploy.support import (
    CONFIG_PATH,
    K8S,
    KUSTOMIZATIONS,
    Manifest,
    arg_value,
    dockerfile_instructions,
    find,
    labels_match,
    one,
    pod_specs,
    tool_missing,
)

KUBERNETES_VERSIONS = ("1.29.0", "1.33.0")
# Custom resources have no schema in kubernetes-validate; their tests below check them.
NOT_IN_API_SCHEMAS = {"ServiceMonitor"}
GATEWAY_KUSTOMIZATIONS = ("base", "overlays/replicated", "overlays/monitoring")
GATEWAY_LABELS = {
    "app.kubernetes.io/name": "affinity-gateway",
    "app.kubernetes.io/component": "gateway",
}
# The CLI lets uvicorn cut connections 3 s after the drain deadline; then the process exits.
EXIT_MARGIN_SECONDS = 5


def kubernetes_validate() -> Any:
    try:
        import kubernetes_validate as kv
    except ImportError:
        tool_missing("kubernetes-validate")
    return kv


def gateway_deployment(docs: list[Manifest]) -> Manifest:
    return one(docs, "Deployment", "affinity-gateway")


def container(pod: Manifest, name: str, *, init: bool = False) -> Manifest:
    field = "initContainers" if init else "containers"
    found = [c for c in pod.get(field, []) if c["name"] == name]
    assert len(found) == 1, f"expected one container {name!r}"
    return found[0]


# ---- rendering and schema validation


def test_every_kustomization_is_tested() -> None:
    on_disk = {str(p.parent.relative_to(K8S)) for p in K8S.rglob("kustomization.yaml")}
    assert on_disk == set(KUSTOMIZATIONS)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_renders_what_each_setup_needs(rendered: dict[str, list[Manifest]], name: str) -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for d in rendered[name]}
    shared = {("Secret", "affinity-gateway-secrets")}
    standalone = {
        ("ServiceAccount", "affinity-gateway"),
        ("Deployment", "affinity-gateway"),
        ("Service", "affinity-gateway"),
        ("PodDisruptionBudget", "affinity-gateway"),
        ("HorizontalPodAutoscaler", "affinity-gateway"),
        ("NetworkPolicy", "affinity-gateway"),
    }
    expected = {
        "base": shared | standalone,
        "overlays/replicated": shared
        | standalone
        | {
            ("StatefulSet", "affinity-gateway-redis"),
            ("Service", "affinity-gateway-redis"),
            ("NetworkPolicy", "affinity-gateway-redis"),
        },
        "overlays/sidecar": shared | {("Deployment", "example-app")},
        "overlays/monitoring": shared
        | standalone
        | {
            ("ServiceMonitor", "affinity-gateway"),
            ("ConfigMap", "affinity-gateway-prometheus-scrape"),
        },
    }[name]
    assert expected <= kinds
    if name == "overlays/sidecar":
        # The standalone gateway is gone: the app's pod carries it.
        assert not (standalone & kinds)
    configmaps = [
        n for k, n in kinds if k == "ConfigMap" and n.startswith("affinity-gateway-config-")
    ]
    assert len(configmaps) == 1


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_validates_strictly(rendered: dict[str, list[Manifest]], name: str, version: str) -> None:
    kv = kubernetes_validate()
    errors = []
    checked = 0
    for doc in rendered[name]:
        if doc["kind"] in NOT_IN_API_SCHEMAS:
            continue
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as exc:
            path = "/".join(str(p) for p in exc.path)
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {path}: {exc.message}")
        checked += 1
    assert checked >= 3
    assert not errors, "\n".join(errors)


def test_the_validator_rejects_what_it_should(rendered: dict[str, list[Manifest]]) -> None:
    """An unknown field and a wrong type fail: the strict validation above is not a no-op."""
    kv = kubernetes_validate()
    deployment = json.loads(json.dumps(gateway_deployment(rendered["base"])))
    gateway = container(deployment["spec"]["template"]["spec"], "gateway")
    gateway["livenessProbe"]["httpGet"]["pathh"] = "/livez"
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)
    del gateway["livenessProbe"]["httpGet"]["pathh"]
    kv.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)
    deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "45"
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


# ---- pod security, for every container of every workload


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_container_is_locked_down(rendered: dict[str, list[Manifest]], name: str) -> None:
    pods = list(pod_specs(rendered[name]))
    assert pods
    for where, pod in pods:
        pod_sc = pod.get("securityContext", {})
        assert pod.get("automountServiceAccountToken") is False, where
        assert pod_sc.get("runAsNonRoot") is True, where
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        tmp_volumes = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
        for c in [*pod.get("initContainers", []), *pod["containers"]]:
            at = f"{where} container {c['name']}"
            sc = c.get("securityContext", {})
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, at
            assert sc.get("readOnlyRootFilesystem") is True, at
            assert sc.get("allowPrivilegeEscalation") is False, at
            assert "ALL" in sc.get("capabilities", {}).get("drop", []), at
            assert not sc.get("capabilities", {}).get("add"), at
            assert sc.get("privileged", False) is False, at
            seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
            assert seccomp.get("type") == "RuntimeDefault", at
            uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
            assert isinstance(uid, int) and uid > 0, at
            # A writable /tmp on a read-only root: an emptyDir.
            tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            assert len(tmp) == 1 and tmp[0]["name"] in tmp_volumes, at
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c.get("resources", {}).get(kind, {})), at


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_service_accounts_mount_no_token(rendered: dict[str, list[Manifest]], name: str) -> None:
    accounts = find(rendered[name], "ServiceAccount")
    assert accounts
    for sa in accounts:
        assert sa.get("automountServiceAccountToken") is False, sa["metadata"]["name"]
    names = {sa["metadata"]["name"] for sa in accounts}
    for where, pod in pod_specs(rendered[name]):
        if "serviceAccountName" in pod:
            assert pod["serviceAccountName"] in names, where


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_images_are_pinned(rendered: dict[str, list[Manifest]], name: str) -> None:
    for where, pod in pod_specs(rendered[name]):
        for c in [*pod.get("initContainers", []), *pod["containers"]]:
            image = c["image"]
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            assert tag and tag != "latest", f"{where} {c['name']}: {image}"


# ---- the standalone gateway: probes, shutdown, configuration


@pytest.mark.parametrize("name", GATEWAY_KUSTOMIZATIONS)
def test_gateway_probes(rendered: dict[str, list[Manifest]], name: str) -> None:
    pod = gateway_deployment(rendered[name])["spec"]["template"]["spec"]
    gw = container(pod, "gateway")
    ports = {p["name"]: p["containerPort"] for p in gw["ports"]}
    assert ports == {"http": 8080}
    assert arg_value(gw["args"], "--port") == "8080"
    assert arg_value(gw["args"], "--host") == "0.0.0.0"
    assert gw["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert gw["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert gw["startupProbe"]["httpGet"]["path"] == "/livez"


@pytest.mark.parametrize("name", GATEWAY_KUSTOMIZATIONS)
def test_grace_period_outlasts_prestop_and_drain(
    rendered: dict[str, list[Manifest]], name: str
) -> None:
    pod = gateway_deployment(rendered[name])["spec"]["template"]["spec"]
    gw = container(pod, "gateway")
    command = gw["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2
    pre_stop = float(command[1])
    assert pre_stop >= 3  # time for endpoints to drop the pod before SIGTERM
    drain = arg_value(gw["args"], "--drain-seconds")
    assert drain is not None, "--drain-seconds must be explicit next to the grace period"
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > pre_stop + float(drain) + EXIT_MARGIN_SECONDS


@pytest.mark.parametrize("name", GATEWAY_KUSTOMIZATIONS)
def test_config_is_the_generated_configmap_at_the_image_path(
    rendered: dict[str, list[Manifest]], name: str
) -> None:
    docs = rendered[name]
    pod = gateway_deployment(docs)["spec"]["template"]["spec"]
    gw = container(pod, "gateway")
    assert arg_value(gw["args"], "--config") == CONFIG_PATH
    mount_dir, _, filename = CONFIG_PATH.rpartition("/")
    mounts = {m["mountPath"]: m for m in gw["volumeMounts"]}
    assert mounts[mount_dir].get("readOnly") is True
    volume = next(v for v in pod["volumes"] if v["name"] == mounts[mount_dir]["name"])
    configmap = one(docs, "ConfigMap", volume["configMap"]["name"])
    assert filename in configmap["data"]
    # The generated name carries a content hash: a changed config is a new ConfigMap,
    # and the Deployment that names it rolls.
    assert re.fullmatch(r"affinity-gateway-config-[a-z0-9]{10}", configmap["metadata"]["name"])
    # The image's ENTRYPOINT reads the same path.
    (entrypoint,) = [json.loads(r) for _, i, r in dockerfile_instructions() if i == "ENTRYPOINT"]
    assert arg_value(entrypoint, "--config") == CONFIG_PATH


def gateway_env(docs: list[Manifest], pod: Manifest, gw: Manifest) -> dict[str, str]:
    """The environment the gateway container gets: its Secrets' keys, then `env`."""
    env: dict[str, str] = {}
    for source in gw.get("envFrom", []):
        secret = one(docs, "Secret", source["secretRef"]["name"])
        env.update(secret.get("stringData", {}))
    for item in gw.get("env", []):
        env[item["name"]] = item["value"]
    return env


def load_mounted_config(
    docs: list[Manifest], pod: Manifest, gw: Manifest, monkeypatch: pytest.MonkeyPatch
) -> Any:
    mount_dir, _, filename = CONFIG_PATH.rpartition("/")
    mount = next(m for m in gw["volumeMounts"] if m["mountPath"] == mount_dir)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    text = one(docs, "ConfigMap", volume["configMap"]["name"])["data"][filename]
    env = gateway_env(docs, pod, gw)
    for var in set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text)):
        monkeypatch.delenv(var, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    try:
        return parse_config(yaml.safe_load(text))
    except ConfigError as exc:
        pytest.fail(f"the mounted gateway.yaml with the container's environment: {exc}")


@pytest.mark.parametrize("name", GATEWAY_KUSTOMIZATIONS)
def test_mounted_config_loads_with_the_container_environment(
    rendered: dict[str, list[Manifest]], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = rendered[name]
    pod = gateway_deployment(docs)["spec"]["template"]["spec"]
    config = load_mounted_config(docs, pod, container(pod, "gateway"), monkeypatch)
    assert config.accounts
    # Secrets come from the environment: the ConfigMap holds no provider key.
    assert all(a.api_key == "REPLACE-ME" for a in config.accounts)


def test_base_is_one_replica_on_embedded_state(
    rendered: dict[str, list[Manifest]], monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = rendered["base"]
    pod = gateway_deployment(docs)["spec"]["template"]["spec"]
    config = load_mounted_config(docs, pod, container(pod, "gateway"), monkeypatch)
    assert config.state.redis_url == ""
    hpa = one(docs, "HorizontalPodAutoscaler", "affinity-gateway")
    assert hpa["spec"]["maxReplicas"] == 1


@pytest.mark.parametrize("name", GATEWAY_KUSTOMIZATIONS)
def test_selectors_find_the_gateway_pods(rendered: dict[str, list[Manifest]], name: str) -> None:
    docs = rendered[name]
    deployment = gateway_deployment(docs)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels_match(GATEWAY_LABELS, labels)
    assert labels_match(deployment["spec"]["selector"]["matchLabels"], labels)
    service = one(docs, "Service", "affinity-gateway")
    assert labels_match(service["spec"]["selector"], labels)
    assert {(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        ("http", 8080, "http")
    }
    pdb = one(docs, "PodDisruptionBudget", "affinity-gateway")
    assert labels_match(pdb["spec"]["selector"]["matchLabels"], labels)
    hpa = one(docs, "HorizontalPodAutoscaler", "affinity-gateway")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "affinity-gateway",
    }
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    policy = one(docs, "NetworkPolicy", "affinity-gateway")
    assert labels_match(policy["spec"]["podSelector"]["matchLabels"], labels)
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    ingress_ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert ingress_ports == {"http"}
    egress_ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}
    assert {53, 443} <= egress_ports


# ---- replicated


def test_replicated_shares_state_in_the_redis_it_ships(
    rendered: dict[str, list[Manifest]], monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = rendered["overlays/replicated"]
    deployment = gateway_deployment(docs)
    assert deployment["spec"]["replicas"] == 3
    hpa = one(docs, "HorizontalPodAutoscaler", "affinity-gateway")
    assert hpa["spec"]["minReplicas"] == 3 and hpa["spec"]["maxReplicas"] > 3
    pod = deployment["spec"]["template"]["spec"]
    config = load_mounted_config(docs, pod, container(pod, "gateway"), monkeypatch)
    match = re.fullmatch(r"redis://([a-z0-9-]+):(\d+)/\d+", config.state.redis_url)
    assert match, config.state.redis_url
    host, port = match.group(1), int(match.group(2))
    service = one(docs, "Service", host)
    assert port in {p["port"] for p in service["spec"]["ports"]}
    redis = one(docs, "StatefulSet", "affinity-gateway-redis")
    redis_labels = redis["spec"]["template"]["metadata"]["labels"]
    assert labels_match(service["spec"]["selector"], redis_labels)
    governing = one(docs, "Service", redis["spec"]["serviceName"])
    assert governing["spec"]["clusterIP"] == "None"
    # NetworkPolicies: gateway pods may reach Redis; Redis takes only gateway pods.
    gateway_labels = deployment["spec"]["template"]["metadata"]["labels"]
    egress = [
        p
        for p in find(docs, "NetworkPolicy")
        if labels_match(p["spec"]["podSelector"]["matchLabels"], gateway_labels)
        for rule in p["spec"].get("egress", [])
        for peer in rule.get("to", [])
        if labels_match(peer.get("podSelector", {}).get("matchLabels", {"-": "-"}), redis_labels)
        and port in {x["port"] for x in rule["ports"]}
    ]
    assert egress
    guard = one(docs, "NetworkPolicy", "affinity-gateway-redis")
    assert labels_match(guard["spec"]["podSelector"]["matchLabels"], redis_labels)
    peers = [peer for rule in guard["spec"]["ingress"] for peer in rule["from"]]
    assert peers and all(
        labels_match(peer["podSelector"]["matchLabels"], gateway_labels) for peer in peers
    )


# ---- sidecar


def sidecar_pod(rendered: dict[str, list[Manifest]]) -> Manifest:
    docs = rendered["overlays/sidecar"]
    pod: Manifest = one(docs, "Deployment", "example-app")["spec"]["template"]["spec"]
    return pod


def test_sidecar_is_a_native_sidecar_on_loopback(rendered: dict[str, list[Manifest]]) -> None:
    pod = sidecar_pod(rendered)
    gw = container(pod, "gateway", init=True)
    assert gw["restartPolicy"] == "Always"
    assert arg_value(gw["args"], "--host") == "127.0.0.1"
    port = arg_value(gw["args"], "--port")
    assert port == "8080"
    assert arg_value(gw["args"], "--config") == CONFIG_PATH
    # Nothing reaches it from outside the pod: no declared port, no Service.
    assert not gw.get("ports")
    app = container(pod, "app")
    env = {e["name"]: e.get("value") for e in app.get("env", [])}
    assert env["OPENAI_BASE_URL"] == f"http://127.0.0.1:{port}/v1"
    assert env["ANTHROPIC_BASE_URL"] == f"http://127.0.0.1:{port}"


def test_sidecar_probes_run_inside_the_pod(rendered: dict[str, list[Manifest]]) -> None:
    """The kubelet's httpGet goes to the pod IP, which a loopback listener never answers:
    the sidecar's probes must be commands run in the container."""
    gw = container(sidecar_pod(rendered), "gateway", init=True)
    expected = {"startupProbe": "/readyz", "livenessProbe": "/livez", "readinessProbe": "/readyz"}
    for probe, path in expected.items():
        assert "httpGet" not in gw[probe], probe
        command = gw[probe]["exec"]["command"]
        assert command[:2] == ["python", "-c"], probe
        assert f"'http://127.0.0.1:8080{path}'" in command[2], probe


def test_sidecar_config_and_grace(
    rendered: dict[str, list[Manifest]], monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = rendered["overlays/sidecar"]
    pod = sidecar_pod(rendered)
    gw = container(pod, "gateway", init=True)
    config = load_mounted_config(docs, pod, gw, monkeypatch)
    assert config.accounts
    drain = float(arg_value(gw["args"], "--drain-seconds") or "nan")
    # The app stops first, then the gateway drains: both inside the grace period.
    assert pod["terminationGracePeriodSeconds"] > drain + EXIT_MARGIN_SECONDS


# ---- monitoring


def test_servicemonitor_scrapes_the_gateway_service(rendered: dict[str, list[Manifest]]) -> None:
    docs = rendered["overlays/monitoring"]
    monitor = one(docs, "ServiceMonitor", "affinity-gateway")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service = one(docs, "Service", "affinity-gateway")
    assert labels_match(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert monitor["spec"]["endpoints"]
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}
        assert endpoint["port"] in port_names
        assert endpoint["path"] == "/metrics"


def test_prometheus_scrape_config_keeps_the_gateway_service(
    rendered: dict[str, list[Manifest]],
) -> None:
    docs = rendered["overlays/monitoring"]
    data = one(docs, "ConfigMap", "affinity-gateway-prometheus-scrape")["data"]
    (text,) = data.values()
    (job,) = yaml.safe_load(text)["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    service = one(docs, "Service", "affinity-gateway")
    (keep,) = [r for r in job["relabel_configs"] if r.get("action") == "keep"]
    meta = {
        "__meta_kubernetes_service_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", k): v
        for k, v in service["metadata"]["labels"].items()
    }
    (port,) = service["spec"]["ports"]
    meta["__meta_kubernetes_endpointslice_port_name"] = port["name"]
    value = ";".join(meta.get(label, "") for label in keep["source_labels"])
    assert re.fullmatch(keep["regex"], value)
    # ... and only that: the same labels with another port name are dropped.
    meta["__meta_kubernetes_endpointslice_port_name"] = "other"
    value = ";".join(meta.get(label, "") for label in keep["source_labels"])
    assert not re.fullmatch(keep["regex"], value)


def test_no_secret_values_in_the_repository(rendered: dict[str, list[Manifest]]) -> None:
    for name in KUSTOMIZATIONS:
        for secret in find(rendered[name], "Secret"):
            assert "data" not in secret
            for key, value in secret["stringData"].items():
                assert value.startswith("REPLACE-ME"), f"{name} {key}"
