from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gateway.cli import main
from gateway.config import load_config
from gateway.keys import hash_key

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "gateway.yaml"


def test_example_config_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(EXAMPLE)]) == 0
    assert "ok" in capsys.readouterr().out


def test_misspelt_key_is_rejected_with_its_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["accounts"][2]["limits"]["rmp"] = 10
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    assert main(["check-config", str(bad)]) == 2
    assert "accounts.2.limits.rmp" in capsys.readouterr().err


def test_missing_environment_variable_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["accounts"][0]["api_key"] = "${SURELY_UNSET_PROVIDER_KEY}"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    assert main(["check-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "accounts.0.api_key" in err and "SURELY_UNSET_PROVIDER_KEY" in err


def test_keys_new_prints_the_key_once_and_a_matching_hash(
    capsys: pytest.CaptureFixture[str],
) -> None:
    secret = load_config(EXAMPLE).server.secret
    assert (
        main(["keys", "new", "--name", "app", "--group", "default", "--config", str(EXAMPLE)]) == 0
    )
    out = capsys.readouterr().out
    key = next(line.split()[-1] for line in out.splitlines() if line.startswith("# sk-ag-"))
    entry = yaml.safe_load("\n".join(line for line in out.splitlines() if not line.startswith("#")))
    assert entry[0]["key_hash"] == hash_key(secret, key)
    assert out.count(key) == 1
