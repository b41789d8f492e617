"""`mmfa demo` end to end on a small image: the kept patches must be the prompt's colour."""

from __future__ import annotations

import numpy as np
import pytest

from mmfa_jax import cli, demo


def test_demo_finds_the_colour(tmp_path, capsys):
    out = tmp_path / "kept.png"
    status = cli.main(["demo", "--size", "112", "--repeats", "1", "--out", str(out), "--prompt", "the blue sky"])
    printed = capsys.readouterr().out
    assert status == 0, printed  # 0 means >= 80% of the kept patches are the closest to the colour
    assert out.stat().st_size > 10_000
    assert "mmfa pipeline" in printed and "torch SDPA" in printed and "per layer, 8 layers" in printed
    # On the CPU the demo says its timings mean little, after the table of them.
    assert printed.strip().splitlines()[-1] == cli.NOT_REPRESENTATIVE
    assert "not representative" in cli.NOT_REPRESENTATIVE and "README" in cli.NOT_REPRESENTATIVE


def test_demo_needs_a_colour(tmp_path, capsys):
    """A usage error before any work (it was a ValueError traceback after the image was loaded)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--size", "56", "--prompt", "what is this", "--out", str(tmp_path / "x.png")])
    assert exit_info.value.code == 2
    assert "argument --prompt: the prompt must name a colour" in capsys.readouterr().err
    with pytest.raises(ValueError, match="must name a colour"):  # the library function's own check
        demo.build_tokens(np.zeros((1, 28, 28, 3), np.float32), 14, "what is this", 1, 8, 1, np.float32)


def test_prompt_colour():
    assert demo.prompt_colour("The Blue sky.") == "blue"
    assert demo.prompt_colour("red, then green") == "red"
    with pytest.raises(ValueError, match="must name a colour"):
        demo.prompt_colour("bluish")


def test_attention_subcommand(capsys):
    assert cli.main(["attention", "--seq-len", "64", "--heads", "2", "--head-dim", "32", "--repeats", "1"]) == 0
    printed = capsys.readouterr().out
    assert "mmfa (interpret)" in printed and printed.startswith("mmfa attention on cpu")
    assert printed.strip().splitlines()[-1] == cli.NOT_REPRESENTATIVE
