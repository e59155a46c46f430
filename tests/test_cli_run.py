"""The run command through click's CliRunner, with tiny models behind the loader."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from conftest import TINY_32, counting_loader, invoke, records


@pytest.fixture
def fake_loader(monkeypatch):
    return counting_loader(monkeypatch, "run")


def test_run_writes_png_with_aspect_ratio_metadata_and_report(tmp_path, photo, fake_loader):
    out = tmp_path / "out.png"
    report = tmp_path / "report.jsonl"
    result = invoke("run", "-p", "starry night", str(photo), "-o", str(out), "--report", str(report), *TINY_32)
    assert result.exit_code == 0, result.output
    img = Image.open(out)
    assert img.size == (32, 24)  # 48x32 input, longest side 32, multiples of 8
    assert img.text["prompt"] == "starry night"
    meta = json.loads(img.text["clipstyle"])
    assert meta["settings"]["steps"] == 2 and meta["prompt"] == "starry night"
    (record,) = records(report)
    assert record["status"] == "ok" and record["output"] == str(out)
    for key in (
        "input",
        "prompt",
        "error",
        "seed",
        "steps",
        "size",
        "device",
        "seconds_total",
        "seconds_per_step",
        "losses",
        "peak_memory_bytes",
        "rejected_fraction",
    ):
        assert key in record
    assert set(record["losses"]) == {"total", "patch", "dir", "content", "tv"}


def test_existing_output_not_made_by_clipstyle_is_kept_and_refused(tmp_path, photo, fake_loader):
    out = tmp_path / "out.png"
    out.write_bytes(b"mine")
    result = invoke("run", "-p", "x", str(photo), "-o", str(out), *TINY_32)
    assert result.exit_code == 1  # not skipped as if done: it is not this pair's image
    assert f"clipstyle: error: {out}: exists, not made by clipstyle" in result.stderr
    assert out.read_bytes() == b"mine"
    assert fake_loader == []  # nothing to do: models never loaded
    result = invoke("run", "-p", "x", str(photo), "-o", str(out), "--overwrite", *TINY_32)
    assert result.exit_code == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_several_images_and_prompts_go_to_a_folder_with_safe_names(tmp_path, photo, fake_loader):
    second = tmp_path / "second.png"
    Image.new("RGB", (20, 40), (10, 200, 30)).save(second)
    out = tmp_path / "styled"
    result = invoke("run", "-p", "ink/wash", "-p", "../mosaic", str(photo), str(second), "-o", str(out), *TINY_32)
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.iterdir())
    assert names == ["photo-ink-wash.png", "photo-mosaic.png", "second-ink-wash.png", "second-mosaic.png"]
    assert len(fake_loader) == 1  # models load once per process


def test_same_seed_gives_identical_files(tmp_path, photo, fake_loader):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    invoke("run", "-p", "fire", str(photo), "-o", str(a), "--seed", "7", *TINY_32)
    invoke("run", "-p", "fire", str(photo), "-o", str(b), "--seed", "7", *TINY_32)
    assert a.read_bytes() == b.read_bytes()
    c = tmp_path / "c.png"
    invoke("run", "-p", "fire", str(photo), "-o", str(c), "--seed", "8", *TINY_32)
    assert a.read_bytes() != c.read_bytes()


def test_save_style_then_apply_reproduces_the_run_at_full_resolution(tmp_path, fake_loader):
    import numpy as np

    from clipstyle.styles.stylefile import load_style

    src = tmp_path / "wide.png"
    Image.new("RGB", (101, 61), (30, 140, 90)).save(src)
    out, style = tmp_path / "out.png", tmp_path / "ink.style"
    result = invoke(
        "run", "-p", "ink", str(src), "-o", str(out), "--save-style", str(style), "--output-size", "full", *TINY_32
    )
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (101, 61)  # trained at 32 px, rendered at the input's resolution
    meta = load_style(style).metadata
    assert meta["prompt"] == "ink" and meta["input"] == "wide.png"
    applied = tmp_path / "applied.png"
    assert invoke("apply", str(style), str(src), "-o", str(applied), "-q").exit_code == 0
    a = np.asarray(Image.open(out), dtype=np.int16)
    b = np.asarray(Image.open(applied), dtype=np.int16)
    assert np.abs(a - b).max() <= 1


def test_strength_zero_returns_the_content(tmp_path, photo, fake_loader):
    import numpy as np

    out = tmp_path / "s0.png"
    assert invoke("run", "-p", "x", str(photo), "-o", str(out), "--strength", "0", *TINY_32).exit_code == 0
    from clipstyle.images import fit_size, to_pil, to_tensor

    src = Image.open(photo).convert("RGB")
    expected = np.asarray(to_pil(to_tensor(src, fit_size(*src.size, 32))), dtype=np.int16)
    assert np.abs(np.asarray(Image.open(out), dtype=np.int16) - expected).max() <= 1


# --- a long folder run says where the whole run is (issue 26) -----------------------------------------------


def test_the_overall_part_of_the_progress_line():
    from clipstyle.cli.run import overall, time_left

    assert overall(0, 40, 1, []) == "[1/40]"  # nothing computed yet: no guess
    assert overall(3, 40, 1, [60.0, 120.0, 90.0]) == "[4/40, 56 min left in all]"  # 37 pairs of 90 s
    assert overall(3, 40, 2, [90.0]) == "[4/40, 28 min left in all]"  # two pairs a batch
    assert [time_left(s) for s in (42, 720, 7500)] == ["42 s", "12 min", "2 h 05 min"]


def test_a_folder_run_shows_the_count_and_the_time_left_across_pairs(tmp_path, fake_loader):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.new("RGB", (24, 16), (80 * i, 90, 200)).save(photos / f"p{i}.png")
    loud = [a for a in TINY_32 if a != "-q"]
    result = invoke("run", photos, "-p", "fire", "-o", tmp_path / "out", *loud)
    assert result.exit_code == 0, result.output
    assert "[1/3] p0.png" in result.stderr
    assert "[2/3, " in result.stderr and "[3/3, " in result.stderr and "left in all]" in result.stderr, result.stderr


def test_the_progress_line_names_the_latest_snapshot(tmp_path, photo, fake_loader):
    loud = [a for a in TINY_32 if a != "-q"]
    result = invoke("run", photo, "-p", "fire", "-o", tmp_path / "out.png", *loud, "--save-every", "1")
    assert result.exit_code == 0, result.output
    snap = tmp_path / "out.step0001.png"
    assert snap.is_file() and f"snapshot={snap}" in result.stderr, result.stderr
