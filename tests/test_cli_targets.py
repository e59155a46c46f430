"""``run --style-image``, ``--blend`` and ``--avoid`` through the command line, with tiny models:
what is recorded (PNG, report, style file), what is checked before anything is written, and
that a rerun with other targets is never skipped as done."""

from __future__ import annotations

import hashlib
import json

import pytest
from PIL import Image

from conftest import TINY_32, counting_loader, invoke, records


@pytest.fixture
def fake_loader(monkeypatch):
    return counting_loader(monkeypatch, "run")


@pytest.fixture
def painting(tmp_path):
    path = tmp_path / "monet.png"
    Image.new("RGB", (40, 30), (200, 120, 40)).save(path)
    return path


def meta(path) -> dict:
    return json.loads(Image.open(path).text["clipstyle"])


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_style_image_is_a_job_recorded_by_name_and_sha256(tmp_path, photo, painting, fake_loader):
    out, report = tmp_path / "out", tmp_path / "r.jsonl"
    result = invoke(
        "run", "--style-image", painting, photo, "-o", out, "--report", report, "--save-style", out, *TINY_32
    )
    assert result.exit_code == 0, result.output
    png = out / "photo-monet-png.png"
    expected = {"targets": [{"image": "monet.png", "image_sha256": sha(painting), "weight": 1.0}]}
    assert meta(png)["target"] == expected
    assert Image.open(png).text["prompt"] == "[monet.png]"
    (record,) = records(report)
    assert record["status"] == "ok" and record["target"] == expected
    from clipstyle.styles.stylefile import load_style

    assert load_style(out / "photo-monet-png.style").metadata["target"] == expected


def test_a_prompt_and_a_style_image_without_blend_are_two_jobs(tmp_path, photo, painting, fake_loader):
    out = tmp_path / "out"
    assert invoke("run", "-p", "ink", "--style-image", painting, photo, "-o", out, *TINY_32).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["photo-ink.png", "photo-monet-png.png"]
    assert "target" not in meta(out / "photo-ink.png")  # a plain prompt records what it always did


def test_blend_is_one_job_with_its_weights_and_a_literal_colon(tmp_path, photo, painting, fake_loader):
    out, report = tmp_path / "b.png", tmp_path / "r.jsonl"
    result = invoke(
        "run",
        "--blend",
        "-p",
        "starry night:0.7",
        "-p",
        "ratio 16\\:9",
        "--style-image",
        f"{painting}:0.3",
        photo,
        "-o",
        out,
        "--report",
        report,
        *TINY_32,
    )
    assert result.exit_code == 0, result.output
    targets = meta(out)["target"]["targets"]
    assert targets == [
        {"text": "starry night", "weight": 0.7},
        {"text": "ratio 16:9", "weight": 1.0},
        {"image": "monet.png", "image_sha256": sha(painting), "weight": 0.3},
    ]
    (record,) = records(report)
    assert record["prompt"] == "starry night:0.7 + ratio 16:9:1 + [monet.png]:0.3"


def test_avoid_is_recorded_and_a_rerun_with_other_targets_is_refused_not_skipped(tmp_path, photo, fake_loader):
    out, report = tmp_path / "o.png", tmp_path / "r.jsonl"
    assert invoke("run", "-p", "ink", photo, "-o", out, *TINY_32).exit_code == 0
    plain = out.read_bytes()
    avoid = ["--avoid", "written text, letters, watermark", "--avoid", "signature"]
    result = invoke("run", "-p", "ink", photo, "-o", out, *avoid, "--report", report, *TINY_32)
    assert result.exit_code == 1  # the plain output is not what --avoid asks for
    assert "made with other settings (target)" in result.stderr
    assert out.read_bytes() == plain
    result = invoke("run", "-p", "ink", photo, "-o", out, *avoid, "--avoid-weight", "0.25", "--overwrite", *TINY_32)
    assert result.exit_code == 0, result.output
    assert meta(out)["target"] == {
        "targets": [{"text": "ink", "weight": 1.0}],
        "avoid": ["written text, letters, watermark", "signature"],
        "avoid_weight": 0.25,
    }
    assert "avoid" in records(report)[0]["target"]
    # the same command again: done, skipped; without --avoid: refused
    again = invoke("run", "-p", "ink", photo, "-o", out, *avoid, "--avoid-weight", "0.25", "--report", report, *TINY_32)
    assert again.exit_code == 0 and records(report)[-1]["status"] == "skipped"
    assert invoke("run", "-p", "ink", photo, "-o", out, *TINY_32).exit_code == 1


@pytest.mark.parametrize("kind", ["set", "film"])
def test_a_set_or_film_style_records_its_targets_and_a_rerun_skips_it(tmp_path, painting, fake_loader, kind):
    """A style trained on a set (--train-on) or a film with a style image and --avoid records the
    target in its style file as a photo's does; the same command again is done, not refused."""
    if kind == "film":
        pytest.importorskip("av")
        from videos import make_video

        source = ["-o", tmp_path / "out.mp4", make_video(tmp_path / "clip.mp4", frames=6)]
    else:
        folder = tmp_path / "set"
        folder.mkdir()
        for i in range(2):
            Image.new("RGB", (32, 24), (60 * i, 90, 160)).save(folder / f"m{i}.png")
        source = ["--train-on", folder]
    kept, report = tmp_path / "s.style", tmp_path / "r.jsonl"
    args = ["run", "-p", "ink:0.5", "--style-image", painting, "--blend", "--avoid", "letters", *source]
    args += ["--save-style", kept, "--train-frames", "2", "--report", report, *TINY_32]
    assert invoke(*args).exit_code == 0
    from clipstyle.styles.stylefile import load_style

    target = load_style(kept).metadata["target"]
    assert target["avoid"] == ["letters"] and target["targets"][1]["image_sha256"] == sha(painting)
    again = invoke(*args)
    assert again.exit_code == 0, again.output
    assert records(report)[-1]["status"] == "skipped"


@pytest.mark.parametrize(
    "content,reason",
    [(b"", "empty file"), (b"\xff\xd8\xff\xe0 not a jpeg", "cannot decode image"), (None, "file not found")],
)
def test_a_bad_style_image_fails_in_one_line_before_anything_is_written(tmp_path, photo, fake_loader, content, reason):
    bad = tmp_path / "bad.jpg"
    if content is not None:
        bad.write_bytes(content)
    out = tmp_path / "out"
    result = invoke("run", "-p", "ink", "--style-image", bad, photo, "-o", out, *TINY_32)
    assert result.exit_code != 0
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"clipstyle: error: {bad}: ") and reason in line, line
    assert not out.exists() and fake_loader == []


@pytest.mark.parametrize(
    "args,message",
    [
        (["--blend", "-p", "a"], "--blend needs at least two targets"),
        (["--blend", "-p", "a:0", "-p", "b"], "weight must be a number above 0"),
        (["-p", "a", "--avoid", " "], "--avoid phrase is empty"),
        (["-p", "a", "--avoid", "b", "--avoid-weight", "-1"], "--avoid-weight"),
        ([], "at least one --prompt or --style-image"),
    ],
)
def test_bad_target_options_are_refused_before_anything_is_written(tmp_path, photo, fake_loader, args, message):
    out = tmp_path / "out"
    result = invoke("run", *args, photo, "-o", out, *TINY_32)
    assert result.exit_code != 0
    assert message in result.stderr, result.stderr
    assert not out.exists() and fake_loader == []
