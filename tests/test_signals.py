"""Ctrl-C and SIGTERM sent to a real ``clipstyle run`` process at several moments of its
start-up (issue 16, item 8): it ends promptly, exit code 130, no traceback, a summary line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import WAIT

SRC = str(Path(__file__).resolve().parents[1] / "src")

# The real command, its model loading replaced by a slow stand-in that marks when it starts:
# every moment up to there is start-up (importing torch and the rest, checking, planning).
CHILD = """
import pathlib, sys, time
import clipstyle.cli.run as command

mark = pathlib.Path(sys.argv[1])

def slow_loader(*args, **kwargs):
    mark.touch()
    time.sleep(10**6)  # far longer than any wait below: ending at all means the signal stopped it

import clipstyle.jobs.plan as plan
plan.load_models = slow_loader
from clipstyle.cli import main
sys.argv = ["clipstyle", "run", sys.argv[2], "-p", "ink", "-o", sys.argv[3], "--size", "16", "--steps", "1"]
main()
"""

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc (Linux)")


def _torch_is_loading(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/maps") as fh:
            return "libtorch" in fh.read()
    except OSError:
        return False


def _wait(condition) -> None:
    end = time.monotonic() + WAIT if WAIT else None
    while not condition():
        assert end is None or time.monotonic() < end, "the moment never came"
        time.sleep(0.005)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_during_start_up_ends_the_run_at_once(tmp_path, signum):
    image = tmp_path / "in.png"
    Image.new("RGB", (24, 16), (30, 90, 200)).save(image)
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    moments = {  # name -> when to send the signal, once the process runs
        "while torch loads": lambda p, mark: _torch_is_loading(p.pid),
        "just after": lambda p, mark: _torch_is_loading(p.pid) and time.sleep(0.05) is None,
        "while the models load": lambda p, mark: mark.exists(),
    }
    children = {}
    for name, moment in moments.items():  # all at once: the machine's cores share the imports
        mark, out = tmp_path / f"{len(children)}.loading", tmp_path / f"out{len(children)}"
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(mark), str(image), str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        children[name] = (proc, moment, mark, out)
    try:
        for name, (proc, moment, mark, out) in children.items():
            _wait(lambda: moment(proc, mark) or proc.poll() is not None)
            assert proc.poll() is None, f"{name}: ended before the signal: {proc.stderr.read()}"
            proc.send_signal(signum)
            _, stderr = proc.communicate(timeout=WAIT)  # else the stand-in loader sleeps on
            assert proc.returncode == 130, (name, proc.returncode, stderr)
            assert "clipstyle: interrupted" in stderr and "Traceback" not in stderr, (name, stderr)
            assert "internal error" not in stderr, (name, stderr)
            if name != "while the models load":  # start-up proper: stopped there, nothing done, and it says so
                assert not mark.exists(), f"{name}: went on to load the models after the signal"
                assert stderr.splitlines()[-1].startswith("0 ok, 0 skipped, 0 failed in "), (name, stderr)
            assert not out.exists() or not any(out.iterdir()), name
    finally:
        for proc, *_ in children.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
