"""yamllint over deploy/ with the repository's .yamllint, and a check that the
configuration is really the one applied (it flags what it should)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.deploy.support import DEPLOY, REPO, tool_missing


def yamllint(*paths: str | Path) -> subprocess.CompletedProcess[str]:
    try:
        import yamllint as _  # noqa: F401
    except ImportError:
        tool_missing("yamllint")
    config = REPO / ".yamllint"
    command = [sys.executable, "-m", "yamllint", "--strict", "--format", "parsable"]
    return subprocess.run(
        [*command, "--config-file", str(config), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=REPO,
    )


def test_deploy_yaml_is_clean() -> None:
    files = [p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml")]
    assert len(files) >= 15
    result = yamllint(DEPLOY, REPO / ".yamllint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_configuration_bites(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("enabled: yes\nlong: " + "x " * 70 + "\nkey:   value\n", encoding="utf-8")
    result = yamllint(bad)
    assert result.returncode != 0
    for rule in ("truthy", "line-length", "colons"):
        assert f"({rule})" in result.stdout, result.stdout
