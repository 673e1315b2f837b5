"""`bench --constrained` on the tiny preset: every figure is there and comes from real runs."""

from __future__ import annotations

import pytest

pytest.importorskip("llguidance")


def test_constrained_bench_measures_free_and_schema_side_by_side():
    from safecode_guard.bench.constrained import run_constrained_bench

    said: list[str] = []
    report = run_constrained_bench("tiny", levels=(1, 2), rounds=2, new_tokens=6, progress=said.append)
    assert report.step_ms.keys() == report.cpu_ms.keys() == {"free", "schema"}
    assert all(set(levels) == {1, 2} and all(v > 0 for v in levels.values()) for levels in report.step_ms.values())
    # one compile for the whole run (warm-up included), every other request a cache hit
    assert report.cache["misses"] == 1 and report.cache["hits"] == 2 + 2 * (1 + 2) - 1
    assert 0 < report.grammar_share[2] < 1 and report.compile_ms > 0 and report.mask_ms > 0
    table = report.table()
    assert "grammar share" in table and "schema compile" in table
    assert report.verdicts() == []  # concurrency 8 was not measured: no verdict on it
    assert "concurrency 2: round 2/2" in said
