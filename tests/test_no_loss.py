"""Nothing lost or silently skipped (issue 16, items 1-5 and 10): inputs with the same name,
reruns with other settings, --save-style on a rerun, two runs at once, report paths, and the
summary line of an interrupted run."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from clipstyle.jobs import claims
from clipstyle.jobs.inputs import collect_inputs
from clipstyle.jobs.pairs import pair_seed, plan_pairs

import conftest
from conftest import TINY_32, WAIT, invoke, records

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def loader(monkeypatch):
    monkeypatch.setattr("clipstyle.jobs.plan.load_models", conftest.tiny_loader)


def image(path: Path, colour=(200, 40, 40), size=(24, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="PNG")
    return path


def recorded(png: Path) -> dict:
    return json.loads(Image.open(png).info["clipstyle"])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- 1. the same file name from different folders ------------------------------------------------------------


@pytest.fixture
def cameras(tmp_path):
    """Two camera folders that both hold IMG_0001.JPG (different pictures), and one other file."""
    a = image(tmp_path / "cam1" / "IMG_0001.JPG", (200, 40, 40))
    b = image(tmp_path / "cam2" / "IMG_0001.JPG", (40, 200, 40))
    c = image(tmp_path / "cam2" / "other.png", (40, 40, 200))
    return a, b, c


def test_same_name_from_different_folders_gets_its_own_output_the_same_every_time(tmp_path, cameras):
    a, b, c = cameras
    out = tmp_path / "out"
    plans = {
        "paths": [str(a), str(b), str(c)],
        "glob": [str(tmp_path / "cam*" / "*")],
        "folders": [str(tmp_path / "cam1"), str(tmp_path / "cam2")],
    }
    outputs = {}
    for how, given in plans.items():
        pairs = plan_pairs(collect_inputs(given), ["fire"], out, 0)
        outputs[how] = {p.input.path.as_posix(): (p.output, p.seed) for p in pairs}
        assert len({p.output for p in pairs}) == 3, how  # three inputs, three outputs
        again = plan_pairs(collect_inputs(given), ["fire"], out, 0)
        assert [(p.output, p.seed) for p in again] == [(p.output, p.seed) for p in pairs]  # every rerun
        shards = [p for k in (1, 2, 3) for p in plan_pairs(collect_inputs(given), ["fire"], out, 0, (k, 3))]
        assert sorted(p.output for p in shards) == sorted(p.output for p in pairs)  # every shard
    assert outputs["paths"] == outputs["glob"] == outputs["folders"]  # however the files were named
    named = outputs["paths"]
    # the file that collides with nothing keeps its name and its seed (results stay reproducible)
    assert named[c.as_posix()] == (out / "other-fire.png", pair_seed(0, "other.png", "fire"))
    tagged = [named[a.as_posix()][0].name, named[b.as_posix()][0].name]
    assert all(re.fullmatch(r"IMG_0001-[0-9a-f]{8}-fire\.png", name) for name in tagged), tagged
    # a tag depends on the input's own path only: colliding with another file, a keeps its output
    third = image(tmp_path / "cam3" / "IMG_0001.JPG", (90, 90, 90))
    with_others = plan_pairs(collect_inputs([str(third), str(a)]), ["fire"], out, 0)
    assert {p.input.path.as_posix(): p.output for p in with_others}[a.as_posix()] == named[a.as_posix()][0]


def test_same_stem_with_another_suffix_or_case_gets_its_own_output(tmp_path):
    d = tmp_path / "photos"
    files = [image(d / "photo.jpg"), image(d / "photo.png"), image(tmp_path / "more" / "PHOTO.gif")]
    pairs = plan_pairs(collect_inputs([str(d), str(files[2])]), ["x"], tmp_path / "out", 0)
    names = [p.output.name.casefold() for p in pairs]
    assert len(set(names)) == 3, names  # apart even on file systems that ignore case


def test_cli_processes_both_same_named_inputs_then_skips_both(tmp_path, cameras, loader):
    a, b, _ = cameras
    out, report = tmp_path / "out", tmp_path / "r.jsonl"
    result = invoke("run", a, b, "-p", "fire", "-o", out, "--report", report, *TINY_32)
    assert result.exit_code == 0, result.stderr
    made = sorted(out.glob("*.png"))
    assert len(made) == 2 and [r["status"] for r in records(report)] == ["ok", "ok"]
    assert {recorded(p)["input_sha256"] for p in made} == {sha256(a), sha256(b)}  # one from each picture
    again = invoke("run", a, b, "-p", "fire", "-o", out, "--report", report, *TINY_32)
    assert again.exit_code == 0 and [r["status"] for r in records(report)][2:] == ["skipped", "skipped"]
    assert invoke("run", a, b, "-p", "fire", "-o", out, "--overwrite", *TINY_32).exit_code == 0
    assert {recorded(p)["input_sha256"] for p in out.glob("*.png")} == {sha256(a), sha256(b)}


# --- 2. a rerun with other settings --------------------------------------------------------------------------


def test_rerun_skips_only_what_was_made_with_the_same_settings(tmp_path, photo, loader):
    out, report = tmp_path / "o.png", tmp_path / "r.jsonl"
    assert invoke("run", photo, "-p", "fire", "-o", out, *TINY_32).exit_code == 0
    made = out.read_bytes()
    same = invoke("run", photo, "-p", "fire", "-o", out, "--report", report, *TINY_32)
    assert same.exit_code == 0 and records(report)[-1]["status"] == "skipped"
    # options that change speed or memory, not the result, still find it done
    assert invoke("run", photo, "-p", "fire", "-o", out, "--crop-batch", "1", *TINY_32).exit_code == 0
    for change, named in (
        (["--seed", "1"], "seed"),
        (["--steps", "3"], "steps"),
        (["--contrast"], "contrast"),
        (["--strength", "0.5"], "strength"),
    ):
        result = invoke("run", photo, "-p", "fire", "-o", out, "--report", report, *TINY_32, *change)  # last wins
        assert result.exit_code == 1, change
        lines = [ln for ln in result.stderr.splitlines() if ln.startswith("clipstyle: error:")]
        assert len(lines) == 1 and lines[0].startswith(f"clipstyle: error: {out}: exists, made with other settings")
        assert named in lines[0] and "--overwrite" in lines[0] and "-o" in lines[0]
        assert records(report)[-1]["status"] == "failed"
        assert out.read_bytes() == made
    image(photo, (10, 10, 10), (48, 32))  # the input was edited: its image is not this one
    result = invoke("run", photo, "-p", "fire", "-o", out, *TINY_32)
    assert result.exit_code == 1 and "input_sha256" in result.stderr and out.read_bytes() == made
    assert invoke("run", photo, "-p", "fire", "-o", out, "--seed", "1", "--overwrite", *TINY_32).exit_code == 0
    assert out.read_bytes() != made and recorded(out)["seed"] == pair_seed(1, "photo.jpg", "fire")


def test_apply_rerun_with_another_strength_is_refused(tmp_path, photo):
    from clipstyle.method.unet import StyleNet
    from clipstyle.styles.stylefile import save_style

    torch.manual_seed(0)
    style = tmp_path / "ink.style"
    save_style(style, StyleNet(), {"prompt": "ink"})
    out = tmp_path / "a.png"
    assert invoke("apply", style, photo, "-o", out, "-q").exit_code == 0
    made = out.read_bytes()
    assert invoke("apply", style, photo, "-o", out, "-q").exit_code == 0  # the same: skipped
    result = invoke("apply", style, photo, "-o", out, "--strength", "0.5", "-q")
    assert result.exit_code == 1 and f"{out}: exists, made with other settings (strength)" in result.stderr
    assert out.read_bytes() == made


# --- 3. --save-style when the image exists -------------------------------------------------------------------


def test_save_style_is_written_when_the_image_already_exists(tmp_path, photo, loader):
    out, style, report = tmp_path / "o.png", tmp_path / "o.style", tmp_path / "r.jsonl"
    assert invoke("run", photo, "-p", "fire", "-o", out, *TINY_32).exit_code == 0
    made = out.read_bytes()
    result = invoke("run", photo, "-p", "fire", "-o", out, "--save-style", style, "--report", report, *TINY_32)
    assert result.exit_code == 0, result.stderr
    assert style.exists() and out.read_bytes() == made  # the missing output made, the existing one kept
    assert records(report)[-1]["status"] == "ok" and records(report)[-1]["style"] == str(style)
    again = invoke("run", photo, "-p", "fire", "-o", out, "--save-style", style, "--report", report, *TINY_32)
    assert again.exit_code == 0 and records(report)[-1]["status"] == "skipped"


# --- 4. two runs on the same folder at once ------------------------------------------------------------------


def test_claims_are_exclusive_released_and_taken_over_when_stale(tmp_path):
    out = tmp_path / "o.png"
    held = claims.claim(out)
    assert isinstance(held, claims.Claim) and claims.lock_path(out).exists()
    other = claims.claim(out)  # this process is alive: the claim holds
    assert isinstance(other, str) and f"pid {os.getpid()}" in other
    held.release()
    assert not claims.lock_path(out).exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    claims.lock_path(out).write_text(json.dumps({"pid": dead.pid, "host": claims.HOST, "started": time.time()}))
    taken = claims.claim(out)  # its process is gone (a crash): stale
    assert isinstance(taken, claims.Claim)
    taken.release()
    claims.lock_path(out).write_text(json.dumps({"pid": dead.pid, "host": "elsewhere", "started": time.time()}))
    assert isinstance(claims.claim(out), str)  # another machine's process cannot be checked: honoured
    claims.lock_path(out).write_text("")
    assert isinstance(claims.claim(out), str)  # empty: its claimer may be writing it right now
    old = time.time() - 2 * claims.EMPTY_LOCK_SECONDS
    os.utime(claims.lock_path(out), (old, old))
    assert isinstance(claims.claim(out), claims.Claim)  # empty and old: its claimer died


def test_a_pair_another_run_is_making_is_skipped_and_said_so(tmp_path, photo, loader):
    out, report = tmp_path / "o.png", tmp_path / "r.jsonl"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(10**6)"])  # killed below
    try:
        lock = claims.lock_path(out)
        lock.write_text(json.dumps({"pid": other.pid, "host": claims.HOST, "started": time.time()}))
        result = invoke("run", photo, "-p", "fire", "-o", out, "--report", report, *TINY_32)
    finally:
        other.kill()
        other.wait()
    assert result.exit_code == 0, result.stderr
    (record,) = records(report)
    assert record["status"] == "skipped" and "another run is making it" in record["error"]
    assert f"pid {other.pid}" in record["error"] and not out.exists() and lock.exists()
    # that run was killed: its lock is stale, and the next run does the pair
    assert invoke("run", photo, "-p", "fire", "-o", out, "--report", report, *TINY_32).exit_code == 0
    assert records(report)[-1]["status"] == "ok" and out.exists() and not lock.exists()


LAUNCHER = """
import sys
sys.path.insert(0, {tests!r})
import clipstyle.cli.common as common

def load(*args, **kwargs):  # tiny random models instead of CLIP and VGG-19 (no downloads)
    from conftest import tiny_models
    return tiny_models()

common.load_models_from_options = load
import clipstyle.jobs.plan as plan
plan.load_models = load
from clipstyle.cli import main
main()
"""


def launch(tmp_path: Path, *args, **popen) -> subprocess.Popen:
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER.format(tests=str(ROOT / "tests")))
    import clipstyle

    source = Path(clipstyle.__file__).resolve().parents[1]  # the clipstyle these tests import
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(source), str(ROOT / "tests")]))
    return subprocess.Popen(
        [sys.executable, str(launcher), *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def test_two_runs_on_one_folder_at_once_share_the_work(tmp_path):
    photos = tmp_path / "photos"
    for i in range(6):
        image(photos / f"p{i}.png", (40 * i, 90, 200 - 30 * i))
    out = tmp_path / "out"
    args = [
        "run",
        photos,
        "-p",
        "fire",
        "-o",
        out,
        "--size",
        "32",
        "--steps",
        "20",
        "--crops",
        "2",
        "--crop-size",
        "16",
        "--no-templates",
        "-q",
    ]
    runs = [launch(tmp_path, *args, "--report", tmp_path / f"r{k}.jsonl") for k in (1, 2)]
    try:
        ends = [run.communicate(timeout=WAIT) for run in runs]
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
    for run, (_, stderr) in zip(runs, ends):
        assert run.returncode == 0, stderr
    both = [r for k in (1, 2) for r in records(tmp_path / f"r{k}.jsonl")]
    assert not [r for r in both if r["status"] == "failed"]
    made = sorted(Path(r["output"]).name for r in both if r["status"] == "ok")
    assert made == sorted(f"p{i}-fire.png" for i in range(6))  # every pair made, and made once
    assert sorted(p.name for p in out.iterdir()) == made  # no lock or temporary file left


# --- 5. a report that is an input or an output ---------------------------------------------------------------


def test_report_into_an_input_or_an_output_is_refused_before_any_work(tmp_path, photo, loader):
    before = photo.read_bytes()
    out = tmp_path / "o.png"
    link = tmp_path / "link.jsonl"
    link.symlink_to(photo)
    for report, what in (
        (photo, "an input image"),
        (link, "an input image"),
        (out, "an output"),
        (tmp_path / "styled" / "photo-fire.png", "an output"),
    ):
        target = tmp_path / "styled" if report.parent.name == "styled" else out
        result = invoke("run", photo, "-p", "fire", "-o", target, "--report", report, *TINY_32)
        assert result.exit_code == 1, report
        assert f"clipstyle: error: {report}: the report would be written into {what}" in result.stderr
        assert photo.read_bytes() == before and not out.exists()
        assert not (tmp_path / "styled" / "photo-fire.png").exists()
    result = invoke(
        "run",
        photo,
        "-p",
        "fire",
        "-o",
        out,
        "--save-style",
        tmp_path / "s.style",
        "--report",
        tmp_path / "s.style",
        *TINY_32,
    )
    assert result.exit_code == 1 and "into an output" in result.stderr


def test_apply_report_into_the_input_is_refused(tmp_path, photo):
    from clipstyle.method.unet import StyleNet
    from clipstyle.styles.stylefile import save_style

    style = tmp_path / "ink.style"
    save_style(style, StyleNet(), {"prompt": "ink"})
    before = photo.read_bytes()
    result = invoke("apply", style, photo, "-o", tmp_path / "a.png", "--report", photo)
    assert result.exit_code == 1 and "the report would be written into an input image" in result.stderr
    assert photo.read_bytes() == before and not (tmp_path / "a.png").exists()


# --- 10. a summary line ends every run -----------------------------------------------------------------------


SUMMARY = re.compile(r"clipstyle: interrupted: (\d+) ok, (\d+) skipped, (\d+) failed in [\d.]+ s")


def test_an_interrupted_run_ends_with_its_summary_line(tmp_path, loader, monkeypatch):
    import clipstyle.jobs.run as runner

    inputs = [image(tmp_path / f"in{i}.png", (60 * i, 50, 50)) for i in range(3)]
    real, calls = runner.stylize_many, []

    def second_is_interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "stylize_many", second_is_interrupted)
    out = tmp_path / "out"
    result = invoke("run", *inputs, "-p", "x", "-o", out, *TINY_32)  # -q: the summary is shown all the same
    assert result.exit_code == 130
    assert SUMMARY.fullmatch(result.stderr.splitlines()[-1]).groups() == ("1", "0", "0")
    assert sorted(p.name for p in out.iterdir()) == ["in0-x.png"]  # no lock or temporary file left


def test_a_real_interrupt_ends_with_the_summary_line(tmp_path):
    inputs = [image(tmp_path / f"in{i}.png", (60 * i, 50, 50)) for i in range(3)]
    run = launch(
        tmp_path,
        "run",
        *inputs,
        "-p",
        "x",
        "-o",
        tmp_path / "out",
        "--size",
        "32",
        "--steps",
        "30",
        "--crops",
        "2",
        "--crop-size",
        "16",
        "--no-templates",
    )
    try:
        for line in run.stderr:  # the first pair is done: the run is at work
            if "wrote " in line:
                break
        run.send_signal(signal.SIGINT)
        _, rest = run.communicate(timeout=WAIT)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 130, rest
    last = rest.strip().splitlines()[-1].split("\r")[-1]  # after the progress bar's erasing
    assert SUMMARY.fullmatch(last) and SUMMARY.fullmatch(last).group(1) == "1", rest
    assert "Traceback" not in rest


def test_a_signal_while_a_progress_bar_is_built_waits_until_it_is_whole(monkeypatch, capsys):
    # CI once caught Ctrl-C inside tqdm's constructor: the half-made bar printed a traceback
    # from its finaliser. The signal now waits until the bar is whole, then stops the run.
    import gc

    import tqdm

    from clipstyle import interrupts
    from clipstyle.cli.common import close_bar, progress_bar

    real_init, seen = tqdm.tqdm.__init__, []

    def signalled_half_way(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # delivered before the bar has its attributes
        seen.append("went on")
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(tqdm.tqdm, "__init__", signalled_half_way)
    with pytest.raises(KeyboardInterrupt), interrupts.raising():
        progress_bar(total=3)
    gc.collect()
    assert seen == ["went on"] and interrupts.requested()
    assert "Traceback" not in capsys.readouterr().err
    monkeypatch.setattr(tqdm.tqdm, "__init__", real_init)
    real_close = tqdm.tqdm.close

    def signalled_while_closing(self):
        if not self.disable:  # the first close, not the finaliser's
            os.kill(os.getpid(), signal.SIGINT)
        real_close(self)

    monkeypatch.setattr(tqdm.tqdm, "close", signalled_while_closing)
    with pytest.raises(KeyboardInterrupt), interrupts.raising():
        bar = progress_bar(total=3)
        close_bar(bar)
    assert bar.disable  # closed all the same, before the interrupt went on


def test_a_signal_inside_a_finaliser_is_kept_for_the_next_check(monkeypatch):
    # Raised inside a __del__, KeyboardInterrupt would be printed with a traceback and dropped
    # (finalisers run at any moment): it is remembered, and the run stops at its next check.
    import gc

    from clipstyle import interrupts

    finished, unraisable = [], []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)

    class Finalised:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            finished.append(True)

    with pytest.raises(KeyboardInterrupt), interrupts.raising():
        Finalised()
        gc.collect()
        assert finished == [True] and unraisable == [] and interrupts.requested()
        interrupts.check()


def test_a_bar_closed_after_a_handled_interrupt_does_not_raise_it_again():
    # CI caught this: the run caught Ctrl-C, then closing its bar raised the same interrupt again,
    # outside the run's handler: "clipstyle: interrupted" with no summary line.
    from clipstyle import interrupts
    from clipstyle.cli.common import close_bar, progress_bar

    with interrupts.raising():
        bar = progress_bar(total=3)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        try:
            close_bar(bar)  # the interrupt above is the run's to handle (it did): not raised here
        except KeyboardInterrupt:
            pytest.fail("closing the bar raised the handled interrupt again")
        assert bar.disable and interrupts.requested()
