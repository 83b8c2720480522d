from __future__ import annotations

import random
from pathlib import Path

import orjson
import pytest

from affinity.simulate import (
    Request,
    derive_limits,
    load_trace,
    main,
    run,
    trace_fingerprint,
    with_hot_prefix,
)


def write_trace(path: Path, conversations: int = 60, seed: int = 7) -> Path:
    """Conversations that each grow turn by turn, interleaved over ~20 minutes."""
    rng = random.Random(seed)
    rows: list[tuple[int, dict[str, object]]] = []
    next_id = 1
    for _ in range(conversations):
        blocks = [0]
        start = rng.uniform(0, 900)
        for turn in range(rng.randint(2, 8)):
            grow = rng.randint(2, 6)
            blocks += range(next_id, next_id + grow)
            next_id += grow
            at = int((start + 40 * turn) * 1000)
            row = {
                "timestamp": at,
                "input_length": 512 * len(blocks) - 100,
                "output_length": rng.randint(50, 400),
                "hash_ids": list(blocks),
            }
            rows.append((at, row))
    rows.sort(key=lambda pair: pair[0])
    path.write_bytes(b"\n".join(orjson.dumps(row) for _, row in rows) + b"\n")
    return path


def test_trace_fingerprint_shares_prefixes_like_the_trace() -> None:
    a = trace_fingerprint(Request(0, 2000, 10, (0, 1, 2, 3)), min_tokens=1024)
    b = trace_fingerprint(Request(0, 2500, 10, (0, 1, 2, 9, 10)), min_tokens=1024)
    assert a.hashes[:4] == b.hashes[:4]
    assert a.hashes[4] != b.hashes[4]
    assert a.tokens == (0, 512, 1024, 1536, 2000)
    assert a.pin_from == 2
    assert a.root == b.root


def test_hot_prefix_doubles_tokens_at_half_share() -> None:
    requests = [Request(0, 5120, 10, tuple(range(10))), Request(1, 5120, 10, tuple(range(10)))]
    hot = with_hot_prefix(requests, 0.5)
    assert [r.input_tokens for r in hot] == [10240, 10240]
    assert hot[0].blocks[:10] == hot[1].blocks[:10]
    assert hot[0].blocks[10:] == requests[0].blocks


def test_affinity_beats_spreading_and_keeps_limits(tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "trace.jsonl")
    results = {r.policy: r for r in run(trace, accounts=4, headroom=2.0)}
    assert set(results) == {"round_robin", "random", "affinity", "ideal"}
    ideal = results["ideal"].hit_rate
    assert ideal > 0.5
    assert results["affinity"].hit_rate > ideal - 0.05
    assert results["round_robin"].hit_rate < results["affinity"].hit_rate - 0.2
    for policy in ("round_robin", "random", "affinity"):
        assert results[policy].over_limit == 0
        assert results[policy].served == results[policy].requests
    assert results["affinity"].decisions["longest_match"] > 0


def test_tight_limits_defer_instead_of_overrunning(tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "trace.jsonl")
    requests = load_trace(trace)
    (affinity,) = run(trace, policies=["affinity"], accounts=4, headroom=0.6)
    assert affinity.deferred > 0
    assert affinity.over_limit == 0
    assert derive_limits(requests, 4, 0.6).itpm is not None


def test_main_prints_the_comparison(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = write_trace(tmp_path / "trace.jsonl", conversations=10)
    assert main([str(trace), "--accounts", "2", "--policy", "affinity", "--policy", "ideal"]) == 0
    out = capsys.readouterr().out
    assert "affinity" in out and "ideal" in out and "hit rate" in out
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing.jsonl")])
