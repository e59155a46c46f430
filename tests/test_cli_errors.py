"""Bad input through ``clipstyle run`` (issue 5): each case ends in a correct result
or one line ``clipstyle: error: <file>: <reason>``; nothing partial is left behind."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import conftest
from conftest import PATIENCE, TINY_16, WAIT, counting_loader, invoke, records


@pytest.fixture
def loads(monkeypatch):
    """Tiny models behind the CLI's loader; the list records each load."""
    return counting_loader(monkeypatch, "run")


def error_lines(result):
    assert "Traceback" not in result.stderr
    return [ln for ln in result.stderr.splitlines() if ln.startswith("clipstyle: error: ")]


def assert_one_error(result, path, *words):
    assert result.exit_code == 1, result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"clipstyle: error: {path}: "), lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def img(tmp_path):
    path = tmp_path / "in.png"
    Image.new("RGB", (24, 16), (30, 90, 200)).save(path)
    return path


# --- error format ---------------------------------------------------------------------------------


def test_missing_input_is_one_line(tmp_path, loads):
    result = invoke("run", tmp_path / "nope.jpg", "-p", "x", "-o", tmp_path / "out", *TINY_16)
    assert_one_error(result, tmp_path / "nope.jpg", "file not found")


def test_traceback_only_with_debug(tmp_path, img):
    """A real process: one line on stderr and exit 1; the traceback appears only with --debug.
    (Refusing an output that is the input happens before any model loads.)"""
    before = img.read_bytes()
    base = [sys.executable, "-m", "clipstyle"]
    args = ["run", str(img), "-p", "x", "-o", str(img)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    plain = subprocess.run(base + args, capture_output=True, text=True, timeout=WAIT, env=env)
    assert plain.returncode == 1
    assert plain.stderr == f"clipstyle: error: {img}: the output would overwrite an input image\n"
    debug = subprocess.run(base + ["--debug"] + args, capture_output=True, text=True, timeout=WAIT, env=env)
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr and "OutputError" in debug.stderr
    assert img.read_bytes() == before


# --- prompts --------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["", "   ", "\t\n"])
def test_empty_prompt_is_an_error(tmp_path, img, loads, prompt):
    result = invoke("run", img, "-p", "ok", "-p", prompt, "-o", tmp_path / "out", *TINY_16)
    assert result.exit_code == 1
    assert error_lines(result) == ["clipstyle: error: the prompt is empty"]
    assert loads == [] and not (tmp_path / "out").exists()


def test_long_prompt_warns_that_it_was_cut(tmp_path, img, loads):
    prompt = "a very detailed oil painting with thick impasto brush strokes " * 8
    report = tmp_path / "r.jsonl"
    result = invoke("run", img, "-p", prompt, "-o", tmp_path / "out", "--report", report, *TINY_16)
    assert result.exit_code == 0, result.stderr
    warnings = [ln for ln in result.stderr.splitlines() if ln.startswith("clipstyle: warning: ")]
    assert len(warnings) == 1 and "more than CLIP's 77" in warnings[0] and "cut off" in warnings[0]
    (png,) = (tmp_path / "out").iterdir()
    assert Image.open(png).text["prompt"] == prompt
    assert json.loads(report.read_text())["prompt"] == prompt


def test_unicode_prompts_give_safe_names_and_keep_the_full_prompt(tmp_path, img, loads):
    prompts = ["../../etc/passwd", "水墨画/ink wash", ".hidden", "🎨", "a\u202egnp.exe", "C:\\windows"]
    out, report = tmp_path / "out", tmp_path / "r.jsonl"
    args = ["run", img, "-o", out, "--report", report, *TINY_16]
    for p in prompts:
        args += ["-p", p]
    result = invoke(*args)
    assert result.exit_code == 0, result.stderr
    written = sorted(p.name for p in out.iterdir())
    assert len(written) == len(prompts)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png", "out", "r.jsonl"]  # nothing escaped
    for name in written:
        assert not name.startswith(".") and "/" not in name and "\\" not in name and "\u202e" not in name
        assert len(name.encode("utf-8")) <= 255
    assert "in-水墨画-ink-wash.png" in written and "in-etc-passwd.png" in written
    kept = {Image.open(out / name).text["prompt"] for name in written}
    assert kept == set(prompts)
    assert {r["prompt"] for r in records(report)} == set(prompts)


# --- paths ----------------------------------------------------------------------------------------


def test_missing_output_folders_are_created(tmp_path, img, loads):
    out = tmp_path / "a" / "b" / "c"
    result = invoke("run", img, "-p", "x", "-o", out, *TINY_16)
    assert result.exit_code == 0, result.stderr
    assert [p.name for p in out.iterdir()] == ["in-x.png"]
    result = invoke("run", img, "-p", "x", "-o", tmp_path / "new" / "file.png", *TINY_16)
    assert result.exit_code == 0 and (tmp_path / "new" / "file.png").is_file()


def test_output_that_is_the_input_is_refused_before_compute(tmp_path, img, loads):
    before = img.read_bytes()
    result = invoke("run", img, "-p", "x", "-o", img, "--overwrite", *TINY_16)
    assert_one_error(result, img, "would overwrite an input")
    assert loads == [] and img.read_bytes() == before


def test_unwritable_output_is_refused_before_compute(tmp_path, img, loads):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file where a folder should be")
    result = invoke("run", img, "-p", "x", "-o", blocker / "out", *TINY_16)
    assert_one_error(result, blocker / "out", "cannot create the output folder")
    assert loads == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write anywhere")
def test_read_only_output_folder_is_refused_before_compute(tmp_path, img, loads):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        result = invoke("run", img, "-p", "x", "-o", out, *TINY_16)
    finally:
        out.chmod(0o755)
    assert_one_error(result, out, "not writable")
    assert loads == []


def test_full_disk_leaves_no_partial_file(tmp_path, img, loads, monkeypatch):
    import clipstyle.images as io

    real = io.write_atomic

    def disk_full(path, write, overwrite=False):
        def write_half(fh):
            fh.write(b"\x89PNG\r\n\x1a\n half an image")
            raise OSError(errno.ENOSPC, "No space left on device")

        return real(path, write_half, overwrite)

    monkeypatch.setattr(io, "write_atomic", disk_full)
    out, report = tmp_path / "out", tmp_path / "r.jsonl"
    result = invoke("run", img, "-p", "x", "-o", out, "--report", report, *TINY_16)
    assert_one_error(result, out / "in-x.png", "No space left on device")
    assert not out.exists()  # neither the image nor a temporary file, nor the folder this run made for them
    assert json.loads(report.read_text())["status"] == "failed"


# --- images ---------------------------------------------------------------------------------------


def _odd_folder(tmp_path):
    d = tmp_path / "odd"
    d.mkdir()
    phone = Image.new("RGB", (48, 24), (0, 0, 255))
    ImageDraw.Draw(phone).rectangle([0, 0, 23, 23], fill=(255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: 24 wide, 48 high
    phone.save(d / "phone.jpg", exif=exif.tobytes())
    logo = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    ImageDraw.Draw(logo).ellipse([3, 3, 16, 16], fill=(200, 20, 20, 255))
    logo.save(d / "logo.png")
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(d / "print.jpg")
    Image.fromarray(np.linspace(0, 65535, 400, dtype=np.uint16).reshape(20, 20)).save(d / "deep.png")
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 255, 0)]]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:])
    Image.new("RGB", (1, 1), (9, 99, 199)).save(d / "dot.png")
    Image.new("RGB", (3, 5), (9, 99, 199)).save(d / "tiny.png")
    bad = {"thin.png": None, "empty.jpg": b"", "notes.jpg": b"shopping list: eggs, milk\n"}
    Image.new("RGB", (7, 900)).save(d / "thin.png")
    full = (d / "phone.jpg").read_bytes()
    bad["half.jpg"] = full[: len(full) // 2]
    for name, data in bad.items():
        if data is not None:
            (d / name).write_bytes(data)
    return d, {"thin.png": "20:1", "empty.jpg": "empty file", "notes.jpg": "not an image", "half.jpg": "truncated"}


def test_odd_images_work_or_fail_with_one_line_each(tmp_path, loads):
    folder, refusals = _odd_folder(tmp_path)
    out = tmp_path / "out"
    result = invoke("run", folder, "-p", "x", "-o", out, *TINY_16, "--size", "32")
    assert result.exit_code == 1
    lines = error_lines(result)
    assert len(lines) == len(refusals), result.stderr
    for name, reason in refusals.items():
        (line,) = [ln for ln in lines if ln.startswith(f"clipstyle: error: {folder / name}: ")]
        assert reason in line, line
    assert any(f"{folder / 'anim.gif'}: file has 2 frames" in ln for ln in result.stderr.splitlines())
    sizes = {p.name: Image.open(p).size for p in out.iterdir()}
    assert set(sizes) == {f"{n}-x.png" for n in ("phone", "logo", "print", "deep", "anim", "dot", "tiny")}
    assert sizes["phone-x.png"] == (16, 32)  # EXIF rotation: portrait, as viewers show it
    assert sizes["dot-x.png"] == (32, 32) and sizes["tiny-x.png"] == (16, 32)  # smaller than a crop: upscaled
    for p in out.iterdir():
        with Image.open(p) as im:
            im.verify()


def test_max_pixels_limit_is_settable(tmp_path, img, loads):
    result = invoke("run", img, "-p", "x", "-o", tmp_path / "a", "--max-pixels", "100", *TINY_16)
    assert_one_error(result, img, "24x16 = 384 pixels, over the limit of 100", "--max-pixels")
    assert invoke("run", img, "-p", "x", "-o", tmp_path / "b", "--max-pixels", "384", *TINY_16).exit_code == 0


# --- weight files, through the real loader (tiny architectures, no downloads) ---------------------


@pytest.fixture
def tiny_architectures(monkeypatch, tmp_path):
    """open_clip and VGG-19 built at tiny widths, so the real loading path runs in milliseconds;
    returns valid CLIP and VGG weight files for them."""
    import open_clip

    import clipstyle.models.loading as enc

    monkeypatch.setattr(open_clip, "create_model", lambda *a, **k: conftest.tiny_clip().model)
    narrow = enc.vgg19_features
    monkeypatch.setattr(enc, "vgg19_features", lambda width_divisor=1: narrow(16))
    clip_file, vgg_file = tmp_path / "clip.pt", tmp_path / "vgg.pth"
    torch.save(conftest.tiny_clip().model.state_dict(), clip_file)
    torch.save(narrow(16).state_dict(), vgg_file)
    return clip_file, vgg_file


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def test_weight_files_load_or_fail_with_one_line(tmp_path, img, tiny_architectures):
    clip_file, vgg_file = tiny_architectures
    run = ["run", img, "-p", "x", "--device", "cpu", *TINY_16]
    ok = invoke(*run, "-o", tmp_path / "ok", "--clip-weights", clip_file, "--vgg-weights", vgg_file)
    assert ok.exit_code == 0, ok.stderr  # the real loading path works with good files
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(clip_file.read_bytes()[:5000])
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"visual.proj": _Payload(marker)}, evil)
    cases = [
        (["--clip-weights", tmp_path / "nope.pt"], tmp_path / "nope.pt", "weights file not found"),
        (["--clip-weights", corrupt], corrupt, "not a readable weights file"),
        (["--clip-weights", vgg_file], vgg_file, "not open_clip ViT-B-32 weights"),
        (["--clip-weights", clip_file, "--vgg-weights", clip_file], clip_file, "not torchvision vgg19 weights"),
        (["--clip-weights", evil], evil, "could run code"),
    ]
    for options, path, reason in cases:
        result = invoke(*run, "-o", tmp_path / "out", *options)
        assert_one_error(result, path, reason)
    assert not marker.exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    debug = invoke("--debug", *run, "-o", tmp_path / "out", "--clip-weights", corrupt, catch_exceptions=True)
    assert type(debug.exception).__name__ == "WeightsError" and debug.exit_code == 1


@pytest.mark.parametrize(
    "bad",
    [
        ["--output-size", "bogus"],
        ["--strength", "2"],
        ["--device", "tpu"],
        ["--shard", "3/2"],
        ["--lr", "-1"],
        ["--preset", "nope"],
    ],
)
def test_a_bad_option_creates_nothing(tmp_path, img, loads, bad, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = invoke("run", img, "-p", "x", "--report", "r/x.jsonl", "-o", "out/", *TINY_16, *bad)
    assert result.exit_code != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no report folder, no output folder
    assert loads == []


# --- hostile command-line values (issue 26) -------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_report_that_is_a_pipe_is_refused_without_opening_it(tmp_path, img, loads):
    """Opening a pipe for writing blocks until a reader comes, deaf to SIGTERM: refused before that.
    (A reader waits here so that a broken check fails instead of hanging.)"""
    import threading

    fifo = tmp_path / "report.fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()), daemon=True)
    reader.start()
    try:
        result = invoke("run", img, "-p", "x", "-o", tmp_path / "out", "--report", fifo, *TINY_16)
    finally:
        while reader.is_alive():  # let the reader go, if nothing else did (once it is waiting)
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
            reader.join(0.05)
    assert_one_error(result, fifo, "is a pipe")
    assert loads == [] and got in ([], [b""]) and not (tmp_path / "out").exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
@pytest.mark.parametrize("command", ["run", "mask"])
def test_an_output_that_is_a_pipe_is_refused_without_opening_it(tmp_path, img, loads, command, monkeypatch):
    """Reading a pipe's record (is it a clipstyle output?) blocked in open() for ever. A writer
    stands by so that a broken check fails instead of hanging; it must never be needed."""
    import threading

    fifo = tmp_path / "out.png"
    os.mkfifo(fifo)
    opened, done = [], threading.Event()

    def writer():
        while not done.is_set():
            try:
                end = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # only succeeds while a reader waits
                opened.append(True)
                try:  # a PNG's first bytes, then none: the reader goes on to image code, which fails
                    os.write(end, b"\x89PNG\r\n\x1a\n" + b"\0" * 16)
                finally:
                    os.close(end)
            except OSError:
                done.wait(0.05)

    if command == "mask":  # a stand-in CLIP: the pipe is refused before a mask is made
        monkeypatch.setattr("clipstyle.cli.mask.load_where_clip", lambda region, *args: object())
    helper = threading.Thread(target=writer, daemon=True)
    helper.start()
    try:
        args = ["-p", "x"] if command == "run" else ["--where", "x"]
        result = invoke(command, img, *args, "-o", fifo, *(TINY_16 if command == "run" else ["-q"]))
    finally:
        done.set()
        helper.join(PATIENCE)
    assert opened == [], "the pipe was opened"
    assert result.exit_code == 1 and "out.png" in result.output and "--overwrite" in result.output
    assert len(error_lines(result)) == 1 and loads == []
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)  # the pipe is still there, untouched


def test_a_report_onto_an_image_that_is_not_an_input_is_refused(tmp_path, img, loads):
    other = tmp_path / "holiday.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(other)
    before = other.read_bytes()
    result = invoke("run", img, "-p", "x", "-o", tmp_path / "out", "--report", other, *TINY_16)
    assert_one_error(result, other, "not a report")
    assert other.read_bytes() == before and loads == []
    report = tmp_path / "r.jsonl"  # an existing report is appended to, as before
    report.write_text('{"status": "ok"}\n')
    assert invoke("run", img, "-p", "x", "-o", tmp_path / "out", "--report", report, *TINY_16).exit_code == 0
    assert len(records(report)) == 2


@pytest.mark.parametrize("command", ["run", "mask"])
def test_an_output_ending_in_a_slash_named_like_an_image_is_refused(tmp_path, img, loads, command):
    args = ["-p", "x", *TINY_16] if command == "run" else ["--where", "x"]
    result = invoke(command, img, "-o", f"{tmp_path / 'x.png'}/", *args)
    assert_one_error(result, f"{tmp_path / 'x.png'}/", "ends in a slash")
    assert not (tmp_path / "x.png").exists() and loads == []


@pytest.mark.parametrize("option", ["--from-file", "--templates"])
@pytest.mark.parametrize("source", ["/dev/zero", "big"])
def test_huge_list_and_template_files_are_refused_with_one_line(tmp_path, img, loads, monkeypatch, option, source):
    if source == "big":  # a file over the bound (made small here)
        monkeypatch.setattr("clipstyle.errors.MAX_TEXT_BYTES", 1024)
        source = tmp_path / "big.txt"
        source.write_text(f"{img}\n" * 200 if option == "--from-file" else "art of {}\n" * 200)
    elif not os.path.exists(source):
        pytest.skip("no /dev/zero")
    given = [option, source] if option == "--from-file" else [img, option, source]
    tiny = [a for a in TINY_16 if a != "--no-templates"]
    result = invoke("run", *given, "-p", "x", "-o", tmp_path / "out", *tiny)
    assert_one_error(result, source, "larger than")
    assert loads == [] and not (tmp_path / "out").exists()


def test_a_failed_run_leaves_no_new_output_folder(tmp_path, img, monkeypatch):
    from clipstyle.errors import WeightsError

    def no_weights(*args, **kwargs):
        raise WeightsError("weights not cached and not downloadable")

    monkeypatch.setattr("clipstyle.jobs.plan.load_models", no_weights)
    out = tmp_path / "new" / "deeper"
    result = invoke("run", img, "-p", "x", "-o", f"{out}/", *TINY_16)
    assert result.exit_code == 1 and "not downloadable" in result.stderr, result.stderr
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()  # a folder that was there stays
    assert invoke("run", img, "-p", "x", "-o", tmp_path / "kept", *TINY_16).exit_code == 1
    assert (tmp_path / "kept").is_dir()


def test_checking_outputs_creates_nothing(tmp_path, img):
    from clipstyle.jobs.inputs import check_outputs, collect_inputs
    from clipstyle.jobs.pairs import plan_pairs

    jobs = plan_pairs(collect_inputs([str(img)]), ["x"], tmp_path / "a" / "b", 0)
    check_outputs(jobs, tmp_path / "c" / "report.jsonl")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]


HUGE = "1" + "0" * 400  # a typo no arithmetic should meet


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (["--size", HUGE], "size must be between 8 and 65,536"),
        (["--output-size", HUGE], "at most 65,536 pixels a side"),
        (["--steps", "100000000"], "steps must be between 1 and 100,000"),
        (["--crops", "100000000"], "crops must be between 0 and 4,096"),
        (["--source", "\u200b "], "the source text is empty"),  # was embedded as it was
        (["--source", "a\udcff"], "not valid UTF-8"),  # a byte the terminal's encoding lacks
    ],
)
def test_sizes_and_counts_beyond_any_use_are_refused_in_one_line(tmp_path, img, loads, bad, reason):
    """Each used to be an internal error (an overflow) or to draw every step's crops for minutes,
    until memory ran out, before the first step."""
    result = invoke("run", img, "-p", "x", "-o", tmp_path / "out.png", *TINY_16, *bad)
    assert result.exit_code == 1 and "internal error" not in result.output
    assert reason in result.output and len(result.output.strip().splitlines()) == 1
    assert loads == [] and not (tmp_path / "out.png").exists()


def test_apply_refuses_a_size_beyond_any_use(tmp_path, img):
    style = tmp_path / "s.style"
    from clipstyle.method.loop import make_network
    from clipstyle.styles.stylefile import save_style

    save_style(style, make_network(0, torch.device("cpu")), {"prompt": "x"})
    result = invoke("apply", style, img, "-o", tmp_path / "out.png", "--size", HUGE)
    assert result.exit_code == 1 and "at most 65,536 pixels a side" in result.output
    assert "internal error" not in result.output
