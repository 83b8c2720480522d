"""The overhead benchmark end to end, small: the emulator, the gateway and the Python peers
in processes of their own, 16 requests a row. Behaviour, not timings: every request
answered in full, and the table names every row."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[2]


def overhead(rows: str, out: Path) -> subprocess.CompletedProcess[str]:
    """bench.overhead, small: 16 requests at concurrency 4, one repeat, the figures in out."""
    run = subprocess.run(
        [
            *(sys.executable, "-m", "bench.overhead", "--requests", "16", "--concurrency", "4"),
            *("--repeat", "1", "--rows", rows, "--json", str(out)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return run


def test_direct_python_raw_and_gateway_rows(tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    run = overhead("direct,python-raw,gateway", out)

    rows = {line.split()[0] for line in run.stdout.splitlines() if line.strip()}
    assert {"direct", "python-raw", "gateway"} <= rows

    doc = orjson.loads(out.read_bytes())
    measured = {m["row"]: m for m in doc["measurements"]}
    assert set(measured) == {"direct", "python-raw", "gateway"}
    for m in measured.values():
        assert m["unavailable"] is None
        assert m["requests"] == 16
        assert m["ok"] == 16, m
        assert m["statuses"] == [200]
    summaries = {s["row"]: s for s in doc["summaries"]}
    assert summaries["gateway"]["failed"] == 0
    # The gateway's own process was measured; the direct row has no proxy to measure.
    assert summaries["gateway"]["cpu_ms"] is not None
    assert summaries["python-raw"]["cpu_ms"] is not None
    assert summaries["direct"]["cpu_ms"] is None


def test_answers_keep_one_kind_in_arrival_order() -> None:
    from bench.overhead import workload

    mixed = workload(400)
    assert 0 < sum(r.stream for r in mixed) < len(mixed)
    for answers, streamed in (("streamed", True), ("json", False)):
        only = workload(150, answers=answers)
        assert len(only) == 150
        assert all(r.stream is streamed for r in only)
        # The calls of that kind in a longer mixed sequence, in the same order.
        assert only == [r for r in workload(600) if r.stream is streamed][:150]


def test_the_halves_of_the_floor_run_only_when_named(tmp_path: Path) -> None:
    from bench.overhead import DEFAULT_ROWS, OPT_IN, Options

    assert Options().rows == DEFAULT_ROWS and not set(OPT_IN) & set(DEFAULT_ROWS)
    out = tmp_path / "halves.json"
    overhead("direct,uvicorn+raw,raw+aiohttp", out)
    measured = {m["row"]: m for m in orjson.loads(out.read_bytes())["measurements"]}
    assert set(measured) == {"direct", *OPT_IN}
    for row in OPT_IN:
        m = measured[row]
        assert m["unavailable"] is None
        assert (m["requests"], m["ok"], m["statuses"]) == (16, 16, [200]), m
