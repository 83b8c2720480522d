"""The in-process chain benchmark, small: every request goes through the configured chain
and answers 200 (the benchmark raises otherwise), one row per request shape."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_chain_rows() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "bench.chain", "--requests", "40", "--repeat", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()[3:]  # title, header, rule
    names = ("all", "chat json", "chat stream", "messages json", "messages stream")
    cells = {
        name: line[len(name) :].split()
        for line in lines
        for name in names
        if line.split()[: len(name.split())] == name.split()
    }
    assert set(cells) == set(names), run.stdout
    counts = {name: int(c[0]) for name, c in cells.items()}
    assert counts["all"] == 40 == sum(v for k, v in counts.items() if k != "all")
    assert all(int(c[1]) > 0 for c in cells.values())  # CPU microseconds per request
