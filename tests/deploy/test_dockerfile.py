"""The container image's recipe, read statically: two stages, a wheel built in the first
and only installed in the second, a fixed non-root user, the config path and port that
the Kubernetes manifests and compose.yaml use."""

from __future__ import annotations

import json
import re
import shlex

import yaml

from tests.deploy.support import CONFIG_PATH, DEPLOY, REPO, arg_value, dockerfile_instructions

INSTRUCTIONS = dockerfile_instructions()


def stage(index: int) -> list[tuple[str, str]]:
    return [(i, rest) for s, i, rest in INSTRUCTIONS if s == index]


def build_args() -> dict[str, str]:
    args = {}
    for s, instr, rest in INSTRUCTIONS:
        if s == -1 and instr == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args[key] = value
    return args


def base_image(rest: str) -> str:
    image = rest.split()[0]
    return re.sub(r"\$\{(\w+)\}", lambda m: build_args()[m.group(1)], image)


def test_two_stages_from_slim_python_311() -> None:
    froms = [rest for _, i, rest in INSTRUCTIONS if i == "FROM"]
    assert len(froms) == 2
    assert froms[0].split()[-2:] == ["AS", "build"]
    for rest in froms:
        assert re.fullmatch(r"python:3\.11-slim(-\w+)?", base_image(rest))


def test_build_stage_builds_only_this_wheel() -> None:
    runs = [rest for i, rest in stage(0) if i == "RUN"]
    assert runs == ["python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels ."]
    copies = [shlex.split(rest) for i, rest in stage(0) if i == "COPY"]
    copied = {src for words in copies for src in words[:-1]}
    # What pyproject.toml packages, and the readme it names, reach the build stage; the
    # pinned versions go beside the wheel, into what the runtime stage mounts.
    assert {"pyproject.toml", "README.md", "gateway/", "middleware/", "affinity/"} == (
        copied - {"constraints.txt"}
    )
    assert ["COPY", "constraints.txt", "/wheels/"] in [["COPY", *w] for w in copies]


def test_runtime_stage_installs_binary_wheels_and_nothing_else() -> None:
    runs = [rest for i, rest in stage(1) if i == "RUN"]
    pip = [r for r in runs if "python -m pip" in r]
    assert len(pip) == 1
    (install,) = pip
    assert "--mount=type=bind,from=build,source=/wheels,target=/wheels" in install
    assert "--only-binary=:all:" in install and "--no-cache-dir" in install
    assert "-c /wheels/constraints.txt" in install  # the versions the suite passed with
    assert install.endswith("/wheels/affinity_gateway-*.whl")
    text = " ".join(runs)
    for word in ("apt-get", "apk", "gcc", "build-essential", "make ", "curl", "wget"):
        assert word not in text, word
    # Nothing copied in from the build context: only the wheel, through the mount.
    assert not [rest for i, rest in stage(1) if i in ("COPY", "ADD")]


def test_runs_as_a_fixed_non_root_uid_that_kubernetes_also_uses() -> None:
    (user,) = [rest for i, rest in stage(1) if i == "USER"]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) >= 10000 and gid == uid
    assert any(f"--uid {uid}" in rest for i, rest in stage(1) if i == "RUN")
    deployment = yaml.safe_load((DEPLOY / "k8s/base/deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == int(uid)
    assert pod["securityContext"]["runAsGroup"] == int(gid)


def test_entrypoint_serves_the_mounted_config_on_all_interfaces() -> None:
    (entrypoint,) = [json.loads(rest) for i, rest in stage(1) if i == "ENTRYPOINT"]
    assert entrypoint[:2] == ["affinity-gateway", "serve"]
    assert arg_value(entrypoint, "--config") == CONFIG_PATH
    assert arg_value(entrypoint, "--host") == "0.0.0.0"
    port = arg_value(entrypoint, "--port")
    assert [rest for i, rest in stage(1) if i == "EXPOSE"] == [port]


def test_healthcheck_asks_livez_with_python() -> None:
    (check,) = [rest for i, rest in stage(1) if i == "HEALTHCHECK"]
    command = json.loads(check.split(" CMD ", 1)[1])
    assert command[:2] == ["python", "-c"]
    assert "'http://127.0.0.1:8080/livez'" in command[2]


def test_no_secret_or_config_baked_in() -> None:
    copied = [
        src for _, i, rest in INSTRUCTIONS if i in ("COPY", "ADD") for src in shlex.split(rest)[:-1]
    ]
    assert copied and not [src for src in copied if src.endswith((".yaml", ".yml", ".env"))]
    env = " ".join(rest for _, i, rest in INSTRUCTIONS if i in ("ENV", "ARG"))
    assert not re.search(r"SECRET|KEY|TOKEN|PASSWORD", env)


def test_dockerignore_keeps_every_copied_path() -> None:
    """BuildKit reads deploy/Dockerfile.dockerignore for `-f deploy/Dockerfile`: it must
    let through what the COPY lines name, and they must exist."""
    lines = [
        line.strip()
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    kept = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    for i, rest in stage(0):
        if i == "COPY":
            for src in shlex.split(rest)[:-1]:
                assert src.rstrip("/") in kept, src
                assert (REPO / src).exists(), src
