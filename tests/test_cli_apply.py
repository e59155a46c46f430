"""The apply command through click's CliRunner, with randomly initialised styles."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from clipstyle.method.unet import StyleNet
from clipstyle.styles.stylefile import save_style

from conftest import invoke, records


@pytest.fixture
def styles(tmp_path):
    paths = []
    for seed, name in ((1, "ink"), (2, "fire")):
        torch.manual_seed(seed)
        path = tmp_path / f"{name}.style"
        save_style(path, StyleNet(), {"prompt": f"{name} painting"})
        paths.append(path)
    return paths


@pytest.fixture
def odd(tmp_path):
    """An image whose sides are not multiples of 8."""
    path = tmp_path / "odd.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (31, 45, 3), dtype=np.uint8)).save(path)
    return path


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_apply_keeps_the_input_size_names_the_output_and_reports(tmp_path, styles, odd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report = tmp_path / "r.jsonl"
    result = invoke("apply", styles[0], odd, "--report", report, "-q")
    assert result.exit_code == 0, result.output
    out = tmp_path / "odd-ink.png"
    img = Image.open(out)
    assert img.size == (45, 31)
    assert img.text["prompt"] == "ink painting"
    assert json.loads(img.text["clipstyle"])["styles"][0]["file"] == "ink.style"
    (record,) = records(report)
    assert record["status"] == "ok" and record["size"] == [45, 31] and record["output"] == "odd-ink.png"
    assert record["styles"] == [str(styles[0])] and record["seconds"] >= 0 and record["error"] is None
    result = invoke("apply", styles[0], odd, "--size", "20", "-o", tmp_path / "small.png", "-q")
    assert result.exit_code == 0 and Image.open(tmp_path / "small.png").size == (20, 14)


def test_existing_output_is_kept_unless_overwrite(tmp_path, styles, odd):
    out = tmp_path / "o.png"
    out.write_bytes(b"mine")
    result = invoke("apply", styles[0], odd, "-o", out)
    assert result.exit_code == 1 and "exists, not made by clipstyle" in result.stderr  # not this job's image
    assert out.read_bytes() == b"mine"
    assert invoke("apply", styles[0], odd, "-o", out, "--overwrite").exit_code == 0
    assert Image.open(out).size == (45, 31)


def test_mix_zero_and_one_give_each_style_and_strength_zero_the_input(tmp_path, styles, odd):
    a, b = styles
    for name, args in (
        ("a", [a]),
        ("b", [b]),
        ("m0", [a, b, "--mix", "0"]),
        ("m1", [a, b, "--mix", "1"]),
        ("m3", [a, b, "--mix", "0.3"]),
        ("s0", [a, "--strength", "0"]),
    ):
        result = invoke("apply", *args, odd, "-o", tmp_path / f"{name}.png", "-q")
        assert result.exit_code == 0, result.output
    assert np.array_equal(pixels(tmp_path / "m0.png"), pixels(tmp_path / "a.png"))
    assert np.array_equal(pixels(tmp_path / "m1.png"), pixels(tmp_path / "b.png"))
    assert not np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png"))
    blend = 0.7 * pixels(tmp_path / "a.png") + 0.3 * pixels(tmp_path / "b.png")
    assert np.abs(pixels(tmp_path / "m3.png") - blend).max() <= 1  # rounding to 8 bits
    assert np.array_equal(pixels(tmp_path / "s0.png"), pixels(odd))


def test_folder_with_a_broken_file_goes_on_and_fails_at_the_end(tmp_path, styles):
    src = tmp_path / "frames"
    (src / "sub").mkdir(parents=True)
    Image.new("RGB", (16, 24), (200, 10, 10)).save(src / "f1.png")
    Image.new("RGB", (24, 16), (10, 200, 10)).save(src / "sub" / "f2.png")
    (src / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "styled"
    result = invoke("apply", styles[0], styles[1], src, "-r", "-o", out, "-q")
    assert result.exit_code == 1
    assert "clipstyle: error: " in result.output and "broken.png" in result.output
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == [
        "f1-ink+fire.png",
        "sub/f2-ink+fire.png",
    ]


def test_a_hostile_style_is_refused_in_one_line_and_runs_nothing(tmp_path, odd):
    marker = tmp_path / "marker"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.style"
    evil.write_bytes(pickle.dumps({"stem.weight": Evil()}))
    result = invoke("apply", evil, odd, "-o", tmp_path / "o.png")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"clipstyle: error: {evil}: refused")
    assert not marker.exists() and not (tmp_path / "o.png").exists()


def test_usage_errors(tmp_path, styles, odd):
    assert invoke("apply", odd).exit_code == 2  # no style
    assert invoke("apply", styles[0]).exit_code == 2  # no image
    assert invoke("apply", styles[0], odd, "--mix", "0.5").exit_code == 2  # mix needs two styles
    assert invoke("apply", styles[0], odd, "--tile", "100", "--overlap", "60").exit_code == 2
    # --style: every argument is an image, whatever its name
    result = invoke("apply", "--style", styles[0], odd, "-o", tmp_path / "s.png", "-q")
    assert result.exit_code == 0 and (tmp_path / "s.png").exists()
