from __future__ import annotations

import io
from pathlib import Path

from gateway.savings import read_records, savings_rows, write_records
from gateway.usagelog import UsageRecord


def rec(
    t: float, model: str, prompt: int, cached: int, cost: float, discount: float, status: int = 200
) -> UsageRecord:
    return UsageRecord(
        time=t,
        request_id=f"r{t}",
        token="t",
        user="u",
        group="g",
        model=model,
        endpoint="chat/completions",
        account="a",
        status=status,
        prompt_tokens=prompt,
        cached_tokens=cached,
        cache_write_tokens=0,
        completion_tokens=10,
        reasoning_tokens=0,
        cost=cost,
        cache_discount=discount,
        estimated=False,
        latency_ms=1.0,
        ttfb_ms=None,
        decision="longest_match",
        attempts=1,
    )


LOG = [
    # One day apart: 2 calls on m1, one of them 75 % cached; one call on m2; one failure.
    rec(0.0, "m1", 1000, 0, 1.00, 0.0),
    rec(86400.0, "m1", 1000, 750, 0.40, 0.60),
    rec(43200.0, "m2", 2000, 1000, 1.50, 0.50),
    rec(50000.0, "m2", 9999, 9999, 9.0, 9.0, status=500),  # failed calls are not savings
]


def test_savings_by_model_match_hand_computed_figures() -> None:
    rows = {r[0]: r for r in savings_rows(LOG, "model", accounts=4)}
    # model, requests, cached, uncached, hit rate, paid, without cache, saved, per 30 days, rr
    assert rows["m1"] == [
        "m1",
        "2",
        "750",
        "1250",
        "37.5%",
        "1.4000",
        "2.0000",
        "0.6000",
        "18.00",
        "1.8500",
    ]
    # m2: one call, span clamps to 1 s: 0.5 USD/s * 30 days
    assert rows["m2"][:8] == ["m2", "1", "1000", "1000", "50.0%", "1.5000", "2.0000", "0.5000"]
    assert rows["m2"][8] == f"{0.5 * 30 * 86400:.2f}"
    total = rows["total"]
    assert total[1:8] == ["3", "1750", "2250", "43.8%", "2.9000", "4.0000", "1.1000"]
    # Over the one-day span: 1.10 USD/day -> 33.00 per 30 days.
    assert total[8] == "33.00"
    # Without affinity a pool of 4 keeps a quarter of the savings: 2.90 + 1.10 * 0.75.
    assert total[9] == "3.7250"


def test_export_round_trips_through_csv_and_jsonl(tmp_path: Path) -> None:
    dicts = [r.to_dict() for r in LOG]
    for fmt, suffix in (("csv", ".csv"), ("jsonl", ".jsonl")):
        buf = io.StringIO()
        write_records(dicts, fmt, buf)
        path = tmp_path / f"log{suffix}"
        path.write_text(buf.getvalue())
        assert read_records(path) == LOG
