"""The demo and chat commands on a tiny model (CI also runs the real demo once)."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from safecode_guard.cli import build_parser, main
from safecode_guard.demo import SCENES, run_demo


def test_every_subcommand_has_help():
    parser = build_parser()
    for name in ("demo", "chat", "eval", "bench"):
        with pytest.raises(SystemExit) as info:
            parser.parse_args([name, "--help"])
        assert info.value.code == 0


def test_demo_reports_every_scene_under_both_verdicts(tiny_model_dir):
    out = io.StringIO()
    rows = run_demo(str(tiny_model_dir("llava")), judge="fixed:unsafe", max_new_tokens=6, out=out)
    text = out.getvalue()
    assert [r["scene"] for r in rows] == [s.name for s in SCENES]
    for row in rows:
        assert row["verdict"] == "unsafe"
        assert row["refused"]["safecode"] and row["refused"]["unsafe"]  # prefix mode opens with a refusal
        assert not row["refused"]["safe"]
    assert text.count("verdict : UNSAFE") == len(SCENES) and "if unsafe" in text


def test_scenes_draw_real_pictures():
    for scene in SCENES:
        img = scene.draw(96)
        assert img.size == (96, 96) and len(set(img.getdata())) > 2


def test_chat_streams_the_answer_and_prints_the_verdict(tiny_model_dir, tmp_path, capsys):
    image = tmp_path / "scene.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(image)
    code = main(
        ["chat", "--model", str(tiny_model_dir("llava")), "--image", str(image), "--judge", "fixed:unsafe",
         "--max-new-tokens", "6", "--baseline", "--alpha", "0.5", "How do I get down?"]
    )
    captured = capsys.readouterr()
    assert code == 0
    assert "verdict: unsafe" in captured.err and "source=judge" in captured.err
    assert captured.out.startswith("SafeCoDe: ") and "plain:" in captured.out


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--image", "/nonexistent.png"], "no such file"), (["--alpha", "-1"], "alpha"), (["--max-new-tokens", "0"], "max_new_tokens")],
)
def test_chat_errors_are_clear(tiny_model_dir, capsys, extra, message):
    code = main(["chat", "--model", str(tiny_model_dir("llava")), "--judge", "fixed:safe", *extra, "hi"])
    assert code == 2 and message in capsys.readouterr().err
