"""The ``mmfa`` command checks its arguments before any work: a bad value is a one-line usage error
(exit code 2) naming the flag and the value, never a fallback to a default or a traceback.

The functions that do the work (``image_demo``, ``attention_demo``) are replaced by ones that fail
the test, so every check here must fire before the work starts, and the tests stay fast."""

from __future__ import annotations

import os

import pytest

from mmfa_jax import cli, demo


@pytest.fixture(autouse=True)
def no_work(monkeypatch):
    """Records the arguments a run would start its work with, instead of doing the work."""
    started = []

    def record(args, *rest, **kw):
        started.append(args)
        return 0

    monkeypatch.setattr(cli, "image_demo", record)
    monkeypatch.setattr(cli, "attention_demo", record)
    return started


@pytest.fixture
def image(tmp_path):
    from PIL import Image

    path = tmp_path / "photo.png"
    Image.new("RGB", (32, 32), (20, 40, 200)).save(path)
    return str(path)


def usage_error(capsys, no_work, argv, *words):
    """Runs ``mmfa argv``: it must exit with code 2 before any work, on one line naming ``words``."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert not no_work, f"mmfa {' '.join(argv)} started its work"
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("mmfa "), err
    assert "Traceback" not in err
    for word in words:
        assert word in last, (word, last)
    return last


# --- values of 0 were taken as "unset" and replaced by the default -------------------------------

@pytest.mark.parametrize("value", ["0", "-0.5", "1.5", "nan", "inf", "half"])
def test_demo_keep_is_a_ratio(capsys, no_work, value):
    usage_error(capsys, no_work, ["demo", "--keep", value], "--keep", value)


@pytest.mark.parametrize("flag", ["--size", "--patch", "--repeats"])
@pytest.mark.parametrize("value", ["0", "-3", "2.5"])
def test_demo_counts_are_positive(capsys, no_work, flag, value):
    usage_error(capsys, no_work, ["demo", flag, value], flag, value)


@pytest.mark.parametrize("flag", ["--batch", "--seq-len", "--heads", "--kv-heads", "--head-dim", "--repeats"])
@pytest.mark.parametrize("value", ["0", "-1", "x"])
def test_attention_counts_are_positive(capsys, no_work, flag, value):
    usage_error(capsys, no_work, ["attention", flag, value], flag, value)


def test_attention_seed_is_not_negative(capsys, no_work):
    usage_error(capsys, no_work, ["attention", "--seed", "-1"], "--seed", "-1")


def test_given_values_are_kept(no_work, image, tmp_path):
    """What passes the checks reaches the work as given, the edges included."""
    out = str(tmp_path / "kept.png")
    assert cli.main(["demo", "--image", image, "--keep", "1", "--size", "56", "--patch", "14", "--repeats", "1",
                     "--out", out]) == 0
    args = no_work.pop()
    assert (args.keep, args.size, args.patch, args.repeats, args.out, args.image) == (1.0, 56, 14, 1, out, image)
    assert all(size == 56 and keep == 1.0 for _, (_, _, size, _, keep) in cli.demo_configs(args))
    assert cli.main(["attention", "--seq-len", "1", "--heads", "6", "--kv-heads", "3", "--head-dim", "8",
                     "--batch", "2", "--repeats", "1", "--seed", "0"]) == 0
    args = no_work.pop()
    assert (args.seq_len, args.heads, args.kv_heads, args.head_dim, args.batch, args.repeats, args.seed) == (
        1, 6, 3, 8, 2, 1, 0)


def test_defaults_fill_what_is_not_given(no_work):
    assert cli.main(["demo"]) == 0
    args = no_work.pop()
    assert (args.keep, args.size, args.patch, args.image, args.video, args.out) == (
        None, None, 14, None, None, "mmfa_demo.png")
    names = ("moderate", "heavy") if cli._gpu() else ("cpu",)
    assert cli.demo_configs(args) == [(name, demo.CONFIGS[name]) for name in names]
    assert cli.main(["attention", "--heads", "8"]) == 0
    args = no_work.pop()
    seq_len, head_dim = (cli.ATTENTION_DEFAULTS[n][cli._gpu()] for n in ("seq_len", "head_dim"))
    assert (args.seq_len, args.heads, args.kv_heads, args.head_dim) == (seq_len, 8, 8, head_dim)


# --- combinations of flags --------------------------------------------------------------------

@pytest.mark.parametrize("size, patch", [("100", "14"), ("14", "28")])
def test_demo_patch_divides_size(capsys, no_work, size, patch):
    usage_error(capsys, no_work, ["demo", "--size", size, "--patch", patch], "--patch", patch, size)


def test_demo_patch_divides_default_size(capsys, no_work):
    usage_error(capsys, no_work, ["demo", "--patch", "15"], "--patch", "15", "--size")


def test_attention_kv_heads_divide_heads(capsys, no_work):
    usage_error(capsys, no_work, ["attention", "--heads", "4", "--kv-heads", "3"], "--kv-heads", "3", "4")
    usage_error(capsys, no_work, ["attention", "--heads", "2", "--kv-heads", "4"], "--kv-heads", "4", "2")


def test_attention_head_dim_within_the_kernels_limit(capsys, no_work):
    limit = cli._max_head_dim()
    assert limit is not None, "the CLI no longer finds the kernels' head-dim limit"
    usage_error(capsys, no_work, ["attention", "--head-dim", str(limit + 1)], "--head-dim", str(limit + 1))
    assert cli.main(["attention", "--head-dim", str(limit)]) == 0


def test_defaults_of_a_gpu(capsys, no_work, monkeypatch):
    """On a GPU the defaults differ (heavy configuration 336 px, 16 heads): checked against those."""
    monkeypatch.setattr(cli, "_gpu", lambda: True)
    usage_error(capsys, no_work, ["demo", "--patch", "32"], "--patch", "32", "336", "heavy")
    usage_error(capsys, no_work, ["attention", "--kv-heads", "3"], "--kv-heads", "3", "16")
    assert cli.main(["demo", "--patch", "16"]) == 0  # 224 and 336 are multiples of 16
    assert [size for _, (_, _, size, _, _) in cli.demo_configs(no_work.pop())] == [224, 336]


def test_demo_image_or_video(capsys, no_work, image):
    usage_error(capsys, no_work, ["demo", "--image", image, "--video", image, image], "--video", "--image")


# --- files ------------------------------------------------------------------------------------

def test_demo_image_missing(capsys, no_work, tmp_path):
    missing = str(tmp_path / "nowhere.jpg")
    usage_error(capsys, no_work, ["demo", "--image", missing], "--image", missing)


def test_demo_image_not_an_image(capsys, no_work, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    usage_error(capsys, no_work, ["demo", "--image", str(text)], "--image", str(text))
    usage_error(capsys, no_work, ["demo", "--image", str(tmp_path)], "--image", str(tmp_path))


def test_demo_image_truncated(capsys, no_work, tmp_path):
    from PIL import Image

    path = tmp_path / "cut.jpg"
    Image.new("RGB", (256, 256), (200, 30, 30)).save(path, quality=95)
    path.write_bytes(path.read_bytes()[:400])
    usage_error(capsys, no_work, ["demo", "--image", str(path)], "--image", str(path))


def test_demo_video_frames_are_images(capsys, no_work, image, tmp_path):
    missing = str(tmp_path / "frame2.png")
    usage_error(capsys, no_work, ["demo", "--video", image, missing], "--video", missing)


def test_demo_out_folder_missing(capsys, no_work, tmp_path):
    out = str(tmp_path / "no" / "such" / "folder" / "kept.png")
    usage_error(capsys, no_work, ["demo", "--out", out], "--out", out)


def test_demo_out_is_a_folder(capsys, no_work, tmp_path):
    usage_error(capsys, no_work, ["demo", "--out", str(tmp_path)], "--out", str(tmp_path))


@pytest.mark.parametrize("name", ["kept.xyz", "kept"])
def test_demo_out_format(capsys, no_work, tmp_path, name):
    out = str(tmp_path / name)
    usage_error(capsys, no_work, ["demo", "--out", out], "--out", out)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_demo_out_not_writable(capsys, no_work, tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir(mode=0o500)
    out = str(folder / "kept.png")
    usage_error(capsys, no_work, ["demo", "--out", out], "--out", out)


def test_demo_default_out_is_checked(capsys, no_work, tmp_path, monkeypatch):
    """The default --out (mmfa_demo.png in the current folder) is checked like a given one."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mmfa_demo.png").mkdir()
    usage_error(capsys, no_work, ["demo"], "--out", "mmfa_demo.png")


# --- the prompt -------------------------------------------------------------------------------

def test_demo_prompt_names_a_colour(capsys, no_work):
    last = usage_error(capsys, no_work, ["demo", "--prompt", "what is this"], "--prompt", "what is this")
    assert "blue" in last  # the colours it knows


def test_no_subcommand_is_the_demo(no_work):
    assert cli.main([]) == 0
    assert no_work.pop().command == "demo"
