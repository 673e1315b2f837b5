"""The benchmark runs end to end (on the tiny preset); what it measures is not asserted here."""

from __future__ import annotations

import json

from safecode_guard.bench import METHODS, run_bench
from safecode_guard.cli import main


def test_run_bench_measures_every_method_for_the_same_token_count():
    report = run_bench("tiny", rounds=1, new_tokens=6)
    assert [m.name for m in report.methods] == list(METHODS)
    assert all(m.new_tokens == 6 for m in report.methods)
    assert report.ratio("plain") == 1.0
    assert all(m.total_s > 0 and m.ms_per_token > 0 for m in report.methods)
    assert report.prompt_tokens > 20 and report.target_ratio == 1.3
    assert len(report.verdicts()) == 4 and "plain" in report.table()
    assert report.kv_row_mb > 0 and "KV-cache row" in report.verdicts()[-1]


def test_bench_command_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--preset", "tiny", "--rounds", "1", "--new-tokens", "4", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "x plain" in printed and "reference" in printed and "target <= 1.3" in printed
    data = json.loads(out.read_text())
    assert {m["name"] for m in data["methods"]} == set(METHODS)


def test_bench_command_rejects_bad_arguments(capsys):
    assert main(["bench", "--preset", "tiny", "--rounds", "0"]) == 2
    assert "--rounds" in capsys.readouterr().err


def test_concurrency_bench_measures_three_methods_per_level(tmp_path, capsys):
    out = tmp_path / "conc.json"
    assert main(["bench", "--preset", "tiny", "--concurrency", "1,2", "--rounds", "1", "--new-tokens", "3",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "x serial" in printed and "p95 TTFT s" in printed and "peak memory per extra concurrent request" in printed
    rows = json.loads(out.read_text())["rows"]
    assert sorted((r["method"], r["concurrency"]) for r in rows) == sorted(
        (m, n) for m in ("batched", "serialised", "plain") for n in (1, 2)
    )
    assert all(r["tokens_per_s"] > 0 and r["p95_ttft_s"] <= r["p95_latency_s"] for r in rows)
    assert main(["bench", "--preset", "tiny", "--concurrency", "0,x"]) == 2


def test_mixed_concurrency_bench_checks_every_answer_against_its_solo_run(tmp_path, capsys):
    out = tmp_path / "mix.json"
    assert main(["bench", "--preset", "tiny", "--concurrency", "2", "--mix", "--rounds", "1", "--new-tokens", "4",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mixed traffic" in printed and "self judge" in printed and "equals its solo (serialised) answer" in printed
    data = json.loads(out.read_text())
    assert data["mix"] and data["prompt_tokens_max"] > data["prompt_tokens"]  # prompts of different lengths
    assert data["answers_equal"] == {"2": [1, 1]}
    assert main(["bench", "--preset", "tiny", "--mix"]) == 2  # --mix needs --concurrency


def test_stall_bench_times_a_running_stream_with_chunked_prefill_off_and_on(tmp_path, capsys):
    out = tmp_path / "stall.json"
    assert main(["bench", "--preset", "tiny", "--stall", "150", "--rounds", "1", "--prefill-chunk-tokens", "32",
                 "--json", str(out)]) == 0
    assert "worst inter-token gap while a" in capsys.readouterr().out
    rows = {r["setting"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["whole"]["chunk_tokens"] is None and rows["chunked"]["chunk_tokens"] == 32
    assert all(0 < r["median_gap_s"] <= r["worst_gap_s"] and r["long_ttft_s"] > 0 for r in rows.values())
    assert main(["bench", "--preset", "tiny", "--stall", "8"]) == 2
