"""Emulator rate limits and configuration."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.emulator import AccountSpec, EmulatorConfig, FaultSpec, default_config, load_config
from gateway.emulator.config import LimitSpec
from gateway.emulator.limits import RateWindow, admit


def test_window_forgets_events_older_than_its_length() -> None:
    window = RateWindow(60.0)
    window.add(0.0, 100)
    window.add(30.0, 50)
    assert window.usage(59.9) == (2, 150)
    assert window.usage(60.0) == (1, 50)
    assert window.reset_in(60.0) == pytest.approx(30.0)
    assert window.usage(90.0) == (0, 0)
    assert window.reset_in(90.0) == 0.0


def test_rpm_denies_until_the_oldest_request_leaves_the_window() -> None:
    limits, window = LimitSpec(rpm=2), RateWindow(60.0)
    for now in (0.0, 10.0):
        assert admit(limits, window, active=0, tokens=1, now=now, concurrency_retry=1.0) is None
    denial = admit(limits, window, active=0, tokens=1, now=20.0, concurrency_retry=1.0)
    assert denial is not None
    assert denial.kind == "requests"
    assert denial.retry_after == pytest.approx(40.0)  # the request at 0 leaves at 60
    assert window.usage(20.0) == (2, 2)  # a denied request is not counted
    assert admit(limits, window, active=0, tokens=1, now=60.0, concurrency_retry=1.0) is None


def test_itpm_denies_until_enough_tokens_leave_the_window() -> None:
    limits, window = LimitSpec(itpm=1000), RateWindow(60.0)
    assert admit(limits, window, active=0, tokens=600, now=0.0, concurrency_retry=1.0) is None
    assert admit(limits, window, active=0, tokens=300, now=5.0, concurrency_retry=1.0) is None
    denial = admit(limits, window, active=0, tokens=500, now=10.0, concurrency_retry=1.0)
    assert denial is not None
    assert denial.kind == "tokens"
    assert denial.retry_after == pytest.approx(50.0)  # freeing the 600 at t=0 is enough
    assert admit(limits, window, active=0, tokens=100, now=10.0, concurrency_retry=1.0) is None


def test_request_larger_than_the_limit_never_fits() -> None:
    limits, window = LimitSpec(itpm=100), RateWindow(60.0)
    denial = admit(limits, window, active=0, tokens=101, now=0.0, concurrency_retry=1.0)
    assert denial is not None
    assert denial.retry_after == 60.0


def test_concurrency_limit_counts_requests_in_flight() -> None:
    limits, window = LimitSpec(concurrency=2), RateWindow(60.0)
    assert admit(limits, window, active=1, tokens=1, now=0.0, concurrency_retry=0.5) is None
    denial = admit(limits, window, active=2, tokens=1, now=0.0, concurrency_retry=0.5)
    assert denial is not None
    assert (denial.kind, denial.retry_after) == ("concurrency", 0.5)


# --- configuration -----------------------------------------------------------------


def test_default_config_names_and_keys() -> None:
    config = default_config(3, seed=5)
    assert [a.name for a in config.accounts] == ["acct-0", "acct-1", "acct-2"]
    assert [a.key for a in config.accounts] == ["sk-emu-0", "sk-emu-1", "sk-emu-2"]
    assert config.seed == 5


def test_load_config_reads_accounts_faults_and_latency(tmp_path: Path) -> None:
    path = tmp_path / "emulator.yaml"
    path.write_text(
        """
seed: 3
time_scale: 10
latency: {base_ms: 0, decode_ms_per_token: 0.5}
accounts:
  - name: primary
    key: sk-a
    rpm: 100
    itpm_counts_cached: false
    faults: {error_rate: 0.25, status: 529, retry_after: 2}
  - {name: backup, key: sk-b}
"""
    )
    config = load_config(path)
    assert config.seed == 3
    assert config.time_scale == 10
    assert config.latency.base_ms == 0
    assert config.latency.prefill_ms_per_1k_uncached == 4.0
    primary = config.accounts[0]
    assert (primary.rpm, primary.itpm_counts_cached) == (100, False)
    assert primary.faults == FaultSpec(error_rate=0.25, status=529, retry_after=2)


def test_load_config_accepts_an_account_count(tmp_path: Path) -> None:
    path = tmp_path / "emulator.yaml"
    path.write_text("accounts: 2\n")
    assert [a.key for a in load_config(path).accounts] == ["sk-emu-0", "sk-emu-1"]


def test_load_config_rejects_unknown_keys_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "emulator.yaml"
    path.write_text("accounts:\n  - {name: a, key: k, faults: {eror_rate: 1}}\n")
    with pytest.raises(ValueError, match=r"accounts\.0\.faults\.eror_rate"):
        load_config(path)


@pytest.mark.parametrize(
    "make",
    [
        lambda: EmulatorConfig(accounts=[]),
        lambda: EmulatorConfig(accounts=[AccountSpec("a", "k"), AccountSpec("b", "k")]),
        lambda: default_config(1, time_scale=0),
        lambda: AccountSpec("a", "k", rpm=0),
        lambda: FaultSpec(error_rate=1.5),
        lambda: FaultSpec(status=200),
    ],
)
def test_invalid_configs_are_rejected(make: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        make()
