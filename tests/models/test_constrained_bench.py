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


def test_bench_constrained_runs_from_the_command_line(capsys, tmp_path):
    import json

    from safecode_guard.cli.main import main

    out = tmp_path / "constrained.json"
    argv = ["bench", "--constrained", "--preset", "tiny", "--rounds", "1", "--new-tokens", "4",
            "--concurrency", "1,2", "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "with and without a JSON schema" in printed and "grammar share" in printed
    saved = json.loads(out.read_text())
    assert set(saved["step_ms"]) == {"free", "schema"} and set(saved["step_ms"]["schema"]) == {"1", "2"}
    assert main(["bench", "--constrained", "--preset", "tiny", "--concurrency", "0"]) == 2
