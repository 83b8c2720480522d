"""Smoke test of the end-to-end trace replay: the first few hundred requests of the
Mooncake trace through the real gateway and emulator, every policy side by side."""

from __future__ import annotations

import re

import pytest

from bench import replay
from bench.common import POLICIES

REQUESTS = 300
TIME_SCALE = 60  # the 300 requests span ~100 emulated seconds: under 2 s a policy


def _table(output: str) -> dict[str, dict[str, str]]:
    """The printed table, by policy then column name; columns are cut where the dashed
    rule under the header says."""
    lines = output.splitlines()
    rule = next(i for i, line in enumerate(lines) if line.startswith("---"))
    spans = [m.span() for m in re.finditer(r"-+", lines[rule])]
    names = [lines[rule - 1][a:b].strip() for a, b in spans]
    rows: dict[str, dict[str, str]] = {}
    for line in lines[rule + 1 :]:
        if not line.strip():
            break
        cells = dict(zip(names, (line[a:b].strip() for a, b in spans), strict=True))
        rows[cells["policy"]] = cells
    return rows


def _percent(cell: str) -> float:
    return float(cell.rstrip("%"))


def test_replay_compares_every_policy(capsys: pytest.CaptureFixture[str]) -> None:
    code = replay.main(
        [
            "--limit",
            str(REQUESTS),
            "--time-scale",
            str(TIME_SCALE),
            "--policies",
            ",".join(POLICIES),
            "--quiet",
        ]
    )
    out = capsys.readouterr().out
    rows = _table(out)
    assert set(rows) == set(POLICIES), out
    for policy, cells in rows.items():
        assert cells["errors"] == "0", f"{policy} had errors:\n{out}"
        assert cells["shed"] == "0", f"{policy} gave up on requests:\n{out}"
    assert code == 0
    # Cache affinity keeps conversations on the account that holds their prefix.
    assert _percent(rows["affinity"]["hit rate"]) > _percent(rows["round_robin"]["hit rate"]), out
    assert _percent(rows["ideal"]["hit rate"]) > 0, out
