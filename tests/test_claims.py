"""Claims and locks under attack (issue 26): lock paths that are not lock files, locks nobody can
read, from other hosts, from reused pids, temporary files left by SIGKILL, and a run killed with
SIGKILL at a random moment followed by a rerun: nothing partial, nothing lost, nothing done twice."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from clipstyle.jobs import claims

import conftest
from conftest import PATIENCE, TINY_32, invoke, records

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def loader(monkeypatch):
    monkeypatch.setattr("clipstyle.jobs.plan.load_models", conftest.tiny_loader)


def photos(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (24, 16), (50 * i, 120, 200 - 40 * i)).save(folder / f"p{i}.png")
    return folder


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(out: Path, **holder) -> Path:
    lock = claims.lock_path(out)
    lock.write_text(json.dumps(holder))
    return lock


def age(path: Path, seconds: float) -> None:
    old = time.time() - seconds
    os.utime(path, (old, old), follow_symlinks=False)


def claim_in_time(out: Path):
    """claims.claim(out), failing the test instead of hanging (a FIFO opened for reading blocks)."""
    got: list = []
    worker = threading.Thread(target=lambda: got.append(_outcome(out)), daemon=True)
    worker.start()
    worker.join(PATIENCE)
    assert got, "claiming hung"
    return got[0]


def _outcome(out: Path):
    try:
        return claims.claim(out)
    except claims.LockError as exc:
        return exc


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_lock_path_that_is_a_directory_fifo_or_link_is_never_opened_and_says_so(tmp_path):
    out = tmp_path / "o.png"
    lock = claims.lock_path(out)
    for make, kind in (
        (lambda: lock.mkdir(), "a directory"),
        (lambda: os.mkfifo(lock), "a FIFO"),
        (lambda: lock.symlink_to(tmp_path / "elsewhere"), "a symbolic link"),
    ):
        make()
        age(lock, 10 * claims.LOST_AFTER_SECONDS)  # old as well: still not taken over
        outcome = claim_in_time(out)
        assert isinstance(outcome, claims.LockError), (kind, outcome)
        expected = f"{lock}: the lock file is {kind}, which clipstyle never makes; remove it to run this pair"
        assert str(outcome) == expected
        assert os.path.lexists(lock)  # left as it was
        lock.rmdir() if kind == "a directory" else lock.unlink()


def test_a_pair_whose_lock_is_a_directory_fails_with_one_line_and_a_rerun_without_it_runs(tmp_path, loader):
    folder = photos(tmp_path / "in", 2)
    out, report = tmp_path / "out", tmp_path / "r.jsonl"
    out.mkdir()
    claims.lock_path(out / "p0-ink.png").mkdir()
    result = invoke("run", folder, "-p", "ink", "-o", out, "--report", report, *TINY_32)
    assert result.exit_code == 1  # not a silent skip with exit 0
    by_input = {Path(r["input"]).name: r for r in records(report)}
    assert by_input["p0.png"]["status"] == "failed" and "is a directory" in by_input["p0.png"]["error"]
    assert by_input["p1.png"]["status"] == "ok"
    claims.lock_path(out / "p0-ink.png").rmdir()
    again = invoke("run", folder, "-p", "ink", "-o", out, "--report", report, *TINY_32)
    assert again.exit_code == 0 and [r["status"] for r in records(report)[2:]] == ["ok", "skipped"]


def test_a_lock_from_another_host_is_honoured_while_renewed_and_taken_over_when_not(tmp_path):
    out = tmp_path / "o.png"
    lock = write_lock(out, pid=dead_pid(), host="elsewhere", started=time.time())
    assert isinstance(claims.claim(out), str)  # its process cannot be asked from here
    age(lock, claims.LOST_AFTER_SECONDS - 60)
    assert isinstance(claims.claim(out), str)  # renewed not long ago
    age(lock, claims.LOST_AFTER_SECONDS + 60)
    taken = claims.claim(out)  # not renewed for that long: that run is gone
    assert isinstance(taken, claims.Claim) and json.loads(lock.read_text())["host"] == claims.HOST
    taken.release()


def test_a_held_claim_is_renewed_so_other_hosts_keep_honouring_it(tmp_path):
    out = tmp_path / "o.png"
    held = claims.claim(out)
    lock = claims.lock_path(out)
    age(lock, claims.LOST_AFTER_SECONDS + 60)
    claims.renew()  # what the claims thread does every REFRESH_SECONDS
    assert time.time() - lock.stat().st_mtime < claims.LOST_AFTER_SECONDS / 2
    held.release()
    assert not lock.exists()


def test_a_lock_this_user_cannot_read_is_honoured_until_it_is_no_longer_renewed(tmp_path, monkeypatch):
    out, made = tmp_path / "o.png", time.time()
    lock = write_lock(out, pid=os.getpid(), host=claims.HOST, started=made)
    read_text = Path.read_text

    def unreadable(self, *args, **kwargs):  # another user's lock under umask 077 (root reads everything)
        if self.name.endswith(".lock"):
            raise PermissionError(13, "Permission denied")
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", unreadable)
    age(lock, 2 * claims.EMPTY_LOCK_SECONDS)  # older than an empty lock may be: still honoured
    assert isinstance(claims.claim(out), str)
    age(lock, claims.LOST_AFTER_SECONDS + 60)  # not renewed for that long: its run is gone
    taken = claims.claim(out)
    assert isinstance(taken, claims.Claim)
    monkeypatch.setattr(Path, "read_text", read_text)
    assert json.loads(lock.read_text()) != {"pid": os.getpid(), "host": claims.HOST, "started": made}
    taken.release()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux)")
def test_a_lock_whose_pid_now_belongs_to_a_newer_process_is_stale(tmp_path):
    out = tmp_path / "o.png"
    made = time.time() - 30  # the lock's run started half a minute ago, and died
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        write_lock(out, pid=other.pid, host=claims.HOST, started=made)  # its pid, reused by a newer process
        taken = claims.claim(out)
        assert isinstance(taken, claims.Claim)
        taken.release()
        write_lock(out, pid=other.pid, host=claims.HOST, started=time.time())  # made by that process: live
        assert isinstance(claims.claim(out), str)
    finally:
        other.kill()
        other.wait()


def test_claiming_removes_what_a_killed_writer_left_of_the_jobs_files_only(tmp_path):
    out, style = tmp_path / "o.png", tmp_path / "styles" / "o.style"
    style.parent.mkdir()
    left = [tmp_path / f".o.png.{dead_pid()}-0.tmp", style.parent / ".o.style.77-3.tmp"]
    others = [tmp_path / ".other.png.12-0.tmp", tmp_path / ".o.png.lock.tmp", tmp_path / "o.png.1-1.tmp"]
    for path in left + others:
        path.write_bytes(b"partial")
    held = claims.claim(out, also=(style,))
    assert isinstance(held, claims.Claim)
    assert not any(p.exists() for p in left) and all(p.exists() for p in others)
    held.release()


def test_releasing_leaves_a_lock_another_run_took_over(tmp_path):
    out = tmp_path / "o.png"
    held = claims.claim(out)
    lock = claims.lock_path(out)
    lock.unlink()  # judged stale elsewhere (say, this process was stopped for long) and replaced
    write_lock(out, pid=os.getppid(), host=claims.HOST, started=time.time())
    held.release()
    assert lock.exists() and json.loads(lock.read_text())["pid"] == os.getppid()


LAUNCHER = """
import sys
sys.path.insert(0, {tests!r})
import clipstyle.jobs.plan as plan
import conftest
plan.load_models = conftest.tiny_loader  # tiny random models (no downloads)
from clipstyle.cli import main
main()
"""


def test_a_run_killed_at_a_random_moment_then_rerun_leaves_each_output_once_and_whole(tmp_path, loader):
    folder, out = photos(tmp_path / "in", 3), tmp_path / "out"
    args = ["run", folder, "-p", "ink", "-p", "fire", "-o", out, *TINY_32, "--steps", "8"]
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER.format(tests=str(ROOT / "tests")))
    import clipstyle

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(clipstyle.__file__).resolve().parents[1]))
    moment = random.Random().uniform(0.0, 1.5)
    proc = subprocess.Popen([sys.executable, str(launcher), *map(str, args)], env=env, stderr=subprocess.PIPE)
    try:
        end = time.monotonic() + PATIENCE
        while not (out.exists() and any(out.iterdir())):  # the first lock: it is computing now
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < end, "the run did not start"
            time.sleep(0.01)
        time.sleep(moment)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    made = {p.name for p in out.glob("*.png")}
    again = invoke("run", *args[1:], "--report", tmp_path / "r.jsonl")
    assert again.exit_code == 0, (moment, again.stderr)
    recs = records(tmp_path / "r.jsonl")
    expected = {f"p{i}-{p}.png" for i in range(3) for p in ("ink", "fire")}
    assert {Path(r["output"]).name for r in recs} == expected  # nothing lost
    done_now = {Path(r["output"]).name for r in recs if r["status"] == "ok"}
    assert done_now == expected - made, moment  # nothing done twice: what the killed run wrote is kept
    assert {p.name for p in out.iterdir()} == expected, moment  # no lock, no temporary file left
    for path in out.iterdir():
        with Image.open(path) as img:
            img.load()  # whole
