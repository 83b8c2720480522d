"""deploy/build-check.sh: the Dockerfile's steps without Docker. It builds the wheel and
installs it with its dependencies in fresh virtual environments (from PyPI), then serves
the example config from there and stops it with SIGTERM."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.deploy.support import DEPLOY, dockerfile_instructions

pytestmark = pytest.mark.build_check


@pytest.fixture(scope="module")
def build_check() -> Iterator[subprocess.CompletedProcess[str]]:
    env = {**os.environ, "PYTHON": sys.executable}
    yield subprocess.run(
        ["bash", str(DEPLOY / "build-check.sh")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def reported(result: subprocess.CompletedProcess[str], prefix: str) -> list[str]:
    return [
        line.removeprefix(prefix) for line in result.stdout.splitlines() if line.startswith(prefix)
    ]


def explain(result: subprocess.CompletedProcess[str]) -> str:
    return (
        f"exit {result.returncode}\n--- stdout\n{result.stdout[-6000:]}"
        f"\n--- stderr\n{result.stderr[-3000:]}"
    )


def test_image_steps_build_install_and_serve(
    build_check: subprocess.CompletedProcess[str],
) -> None:
    assert build_check.returncode == 0, explain(build_check)
    ok = reported(build_check, "build-check: ok ")
    for step in (
        "check-config",
        "healthcheck /livez",
        "readyz",
        "sigterm exit 0",
        "all",
    ):
        assert step in ok, explain(build_check)
    assert "build stage: affinity_gateway-0.1.0-py3-none-any.whl" in ok


def test_it_ran_exactly_the_dockerfiles_pip_steps(
    build_check: subprocess.CompletedProcess[str],
) -> None:
    names = {0: "build", 1: "runtime"}
    expected = [
        f"[{names[s]}] RUN {rest}"
        for s, i, rest in dockerfile_instructions()
        if i == "RUN" and "pip" in rest
    ]
    assert len(expected) == 2
    ran = [line for line in reported(build_check, "build-check: ") if line.startswith("[")]
    assert ran == expected, explain(build_check)
