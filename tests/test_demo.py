"""`mmfa demo` end to end on a small image: the kept patches must be the prompt's colour."""

from __future__ import annotations

import pytest

from mmfa_jax import cli


def test_demo_finds_the_colour(tmp_path, capsys):
    out = tmp_path / "kept.png"
    status = cli.main(["demo", "--size", "112", "--repeats", "1", "--out", str(out), "--prompt", "the blue sky"])
    printed = capsys.readouterr().out
    assert status == 0, printed  # 0 means >= 80% of the kept patches are the closest to the colour
    assert out.stat().st_size > 10_000
    assert "mmfa pipeline" in printed and "torch SDPA" in printed and "per layer, 8 layers" in printed


def test_demo_needs_a_colour(tmp_path):
    with pytest.raises(ValueError, match="must name a colour"):
        cli.main(["demo", "--size", "56", "--prompt", "what is this", "--out", str(tmp_path / "x.png")])


def test_attention_subcommand(capsys):
    assert cli.main(["attention", "--seq-len", "64", "--heads", "2", "--head-dim", "32", "--repeats", "1"]) == 0
    assert "mmfa (interpret)" in capsys.readouterr().out
