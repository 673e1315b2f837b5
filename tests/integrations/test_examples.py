"""The scripts in examples/ run on a tiny model, so they cannot rot.

Each example's `main(argv)` is imported from its file and called with a tiny
model path; one subprocess run per script checks the command line and the
SAFECODE_MODEL environment variable as a user would meet them.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from support.examples import EXAMPLES, load_example

from safecode_guard import ChatSafeCoDe


@pytest.fixture(scope="module")
def model_path(tiny_model_dir: Callable[[str], Path]) -> str:
    return str(tiny_model_dir("llava"))


# -- chain_branch_on_verdict ---------------------------------------------------------------------


def test_branch_unsafe_scene_returns_the_safe_completion_and_logs(model_path, image_path, caplog):
    example = load_example("chain_branch_on_verdict")
    with caplog.at_level(logging.WARNING, logger="safecode.example"):
        result = example.main(["--model", model_path, "--image", image_path, "--judge", "fixed:unsafe",
                               "--max-new-tokens", "12"])
    assert result["route"] == "safe_completion"
    assert result["answer"] == example.SAFE_COMPLETION
    assert result["safety"]["verdict"] == "unsafe"
    assert any("unsafe scene" in r.getMessage() for r in caplog.records)


def test_branch_safe_scene_continues_the_chain_with_the_model_answer(model_path, image_path):
    example = load_example("chain_branch_on_verdict")
    result = example.main(["--model", model_path, "--image", image_path, "--judge", "fixed:safe",
                           "--max-new-tokens", "12"])
    assert result["route"] == "answered"
    assert result["safety"]["verdict"] == "safe"
    # the chain passed on exactly what the model said for the same message
    llm = ChatSafeCoDe(model=model_path, judge="fixed:safe", max_new_tokens=12)
    direct = llm.invoke([example.image_message("How do I run faster here?", image_path)])
    assert result["answer"] == direct.content
    assert result["answer"] != example.SAFE_COMPLETION


def test_branch_follows_the_self_judge_whatever_it_decides(model_path, image_path):
    example = load_example("chain_branch_on_verdict")
    result = example.main(["--model", model_path, "--image", image_path, "--max-new-tokens", "8"])
    expected = "safe_completion" if result["safety"]["verdict"] == "unsafe" else "answered"
    assert result["route"] == expected
    assert result["safety"]["judge"] == "self:direct"


# -- stream_verdict ------------------------------------------------------------------------------


def test_stream_example_reads_the_verdict_before_the_text(model_path, image_path, capsys):
    example = load_example("stream_verdict")
    result = example.main(["--model", model_path, "--image", image_path, "--judge", "fixed:safe",
                           "--max-new-tokens", "12"])
    out, err = capsys.readouterr()
    assert result["safety"]["verdict"] == "safe"
    assert "[verdict: safe" in err
    assert out.rstrip("\n") == result["text"]
    assert result["usage"]["output_tokens"] >= 1
    llm = ChatSafeCoDe(model=model_path, judge="fixed:safe", max_new_tokens=12)
    assert result["text"] == llm.invoke([example.image_message("How do I run faster here?", image_path)]).content


def test_stream_example_can_stop_on_an_unsafe_verdict(model_path, image_path, capsys):
    example = load_example("stream_verdict")
    result = example.main(["--model", model_path, "--image", image_path, "--judge", "fixed:unsafe",
                           "--stop-on-unsafe", "--max-new-tokens", "12"])
    out, _ = capsys.readouterr()
    assert result["safety"]["verdict"] == "unsafe"
    assert result["text"] == ""  # no model text was shown
    assert out.startswith("Sorry, I can't help with that here.")


# -- as a user runs them ------------------------------------------------------------------------


# Both scripts in one interpreter, as `python <script> ...` runs them (runpy with
# run_name="__main__"), to pay the torch/transformers import once.
_RUN_AS_MAIN = """
import runpy, sys
for script in sys.argv[1:]:
    sys.argv = [script, "--image", IMAGE, "--judge", "fixed:unsafe", "--max-new-tokens", "8"]
    runpy.run_path(script, run_name="__main__")
"""


def test_examples_run_from_the_command_line_with_SAFECODE_MODEL(model_path, image_path):
    env = {**os.environ, "SAFECODE_MODEL": model_path}
    scripts = [str(EXAMPLES / "chain_branch_on_verdict.py"), str(EXAMPLES / "stream_verdict.py")]
    code = _RUN_AS_MAIN.replace("IMAGE", repr(image_path))
    proc = subprocess.run([sys.executable, "-c", code, *scripts], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert '"route": "safe_completion"' in proc.stdout  # the branch example's JSON
    assert "unsafe scene" in proc.stderr  # its log line
    assert "[verdict: unsafe" in proc.stderr  # the streaming example


def test_examples_refuse_to_run_without_a_model(monkeypatch, capsys):
    monkeypatch.delenv("SAFECODE_MODEL", raising=False)
    example = load_example("stream_verdict")
    with pytest.raises(SystemExit):
        example.main([])
    assert "SAFECODE_MODEL" in capsys.readouterr().err
