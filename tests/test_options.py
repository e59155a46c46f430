"""Options and inputs refused or flagged before any work (issue 16, items 11 and 12)."""

from __future__ import annotations

import math
import os

import pytest
from PIL import Image

from clipstyle.config import Settings
from clipstyle.errors import ClipstyleError
from clipstyle.jobs.inputs import collect_inputs

from conftest import TINY_16, counting_loader, invoke


@pytest.fixture
def loads(monkeypatch):
    return counting_loader(monkeypatch, "run")


@pytest.fixture
def img(tmp_path):
    path = tmp_path / "in.png"
    Image.new("RGB", (24, 16), (30, 90, 200)).save(path)
    return path


# --- item 11: float options -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["threshold", "lr", "lambda_patch", "lambda_dir", "lambda_content", "lambda_tv", "distortion"]
)
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_settings_refuse_values_that_are_not_numbers(name, value):
    with pytest.raises(ClipstyleError, match=f"{name.replace('_', ' ')} must be a number"):
        Settings(**{name: value})


@pytest.mark.parametrize("threshold, ok", [(0.0, True), (1.99, True), (2.0, False), (-0.1, False)])
def test_threshold_must_be_in_the_patch_loss_range(threshold, ok):
    if ok:
        assert Settings(threshold=threshold).threshold == threshold
    else:
        with pytest.raises(ClipstyleError, match="threshold must be at least 0 and under 2"):
            Settings(threshold=threshold)


@pytest.mark.parametrize(
    "option, value, words",
    [
        ("--lr", "nan", "must be a number"),
        ("--threshold", "nan", "must be a number"),
        ("--lambda-tv", "nan", "must be a number"),
        ("--strength", "nan", "must be a number"),
        ("--lr", "inf", "must be a number"),
        ("--threshold", "2", "0<=x<2"),
    ],
)
def test_run_refuses_bad_floats_before_anything(tmp_path, img, loads, option, value, words):
    result = invoke("run", img, "-p", "x", "-o", tmp_path / "out", *TINY_16, option, value)
    assert result.exit_code == 2 and option in result.stderr and words in result.stderr, result.stderr
    assert loads == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("option", ["--strength", "--mix"])
def test_apply_refuses_nan(tmp_path, img, option):
    result = invoke("apply", tmp_path / "a.style", tmp_path / "b.style", img, option, "nan")
    assert result.exit_code == 2 and "must be a number" in result.stderr, result.stderr


def test_zero_crops_warns_that_the_patch_loss_is_off(tmp_path, img, loads):
    result = invoke("run", img, "-p", "x", "-o", tmp_path / "out", *TINY_16, "--crops", "0")
    assert result.exit_code == 0, result.stderr
    assert "clipstyle: warning: --crops 0" in result.stderr and "patch loss" in result.stderr
    quiet = invoke("run", img, "-p", "y", "-o", tmp_path / "out", *TINY_16)
    assert "warning" not in quiet.stderr


# --- item 12: lists, outputs, folders, prompts, globs ---------------------------------------------


@pytest.mark.parametrize("option, value", [("--devices", ","), ("--devices", ""), ("--device", " , ")])
def test_a_device_list_naming_no_device_is_a_usage_error(tmp_path, img, loads, option, value):
    result = invoke("run", img, "-p", "x", "-o", tmp_path / "out", *TINY_16, option, value)
    assert result.exit_code == 2 and option in result.stderr and "names no device" in result.stderr, result.stderr
    assert loads == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["y.jpg", "y.PNG", "y.webp"])
def test_several_outputs_into_a_name_with_an_image_extension_are_refused(tmp_path, img, loads, name):
    other = tmp_path / "other.png"
    Image.new("RGB", (16, 16)).save(other)
    result = invoke("run", img, other, "-p", "x", "-o", tmp_path / name, *TINY_16)
    assert result.exit_code == 1 and f"{tmp_path / name}: an output file needs exactly" in result.stderr
    assert not (tmp_path / name).exists() and loads == []
    (tmp_path / name).mkdir()  # a folder that exists is the user's choice
    assert invoke("run", img, other, "-p", "x", "-o", tmp_path / name, *TINY_16).exit_code == 0


def test_a_folder_named_like_an_image_says_it_holds_no_images(tmp_path, loads):
    folder = tmp_path / "x.jpg"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(folder / "sub" / "inside.png")
    result = invoke("run", folder, "-p", "x", "-o", tmp_path / "out", *TINY_16)
    assert result.exit_code == 1, result.stderr
    assert f"clipstyle: error: {folder}: is a folder and holds no images" in result.stderr
    assert "-r looks in its subfolders" in result.stderr and loads == []
    assert invoke("run", folder, "-r", "-p", "x", "-o", tmp_path / "out", *TINY_16).exit_code == 0


@pytest.mark.parametrize("prompt", ["\u200b", "\u200b\u200c\u200d\u2060\ufeff", " \u3164 ", "\u00ad\u034f", "\u2028"])
def test_a_prompt_of_invisible_characters_is_empty(tmp_path, img, loads, prompt):
    result = invoke("run", img, "-p", prompt, "-o", tmp_path / "out", *TINY_16)
    assert result.exit_code == 1 and "the prompt is empty" in result.stderr, result.stderr


def test_visible_prompts_in_any_script_are_not_empty():
    from clipstyle.prompts import is_blank

    assert not any(is_blank(p) for p in ["ink", "墨", "चित्र", "🔥", "a\u200b"])


def test_a_recursive_glob_never_enters_a_folder_twice(tmp_path, monkeypatch):
    photos = tmp_path / "photos"
    (photos / "sub" / "deeper").mkdir(parents=True)
    for name in ["a.jpg", "b.jpg", "sub/c.jpg", "sub/d.jpg", "sub/deeper/e.jpg"]:
        Image.new("RGB", (16, 16)).save(photos / name)
    os.symlink("..", photos / "sub" / "loop")  # a link back up the tree
    os.symlink("../..", photos / "sub" / "deeper" / "up")
    monkeypatch.chdir(tmp_path)
    found = collect_inputs(["photos/**/*.jpg"], recursive=True)
    assert sorted(str(f.path) for f in found) == sorted(
        f"photos/{n}" for n in ["a.jpg", "b.jpg", "sub/c.jpg", "sub/d.jpg", "sub/deeper/e.jpg"]
    )


def test_globs_match_what_glob_matches_in_a_tree_without_links(tmp_path, monkeypatch):
    import glob

    from clipstyle.jobs.globs import expand_glob

    for name in ["p/a.jpg", "p/b.JPG", "p/.hidden.jpg", "p/.h/x.jpg", "p/s/c.jpg", "p/s/t/d.png", "p/x1.jpg"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    for pattern in [
        "p/*.jpg",
        "p/**/*.jpg",
        "p/*/x?.jpg",
        "p/.*",
        "p/**/*",
        "**/*.png",
        "p/[ab]*",
        "p/s/*/d.png",
        str(tmp_path / "p" / "**" / "*.jpg"),
    ]:
        for recursive in (True, False):
            assert sorted(expand_glob(pattern, recursive)) == sorted(glob.glob(pattern, recursive=recursive))
