"""--devices workers whose parent is killed with SIGKILL stop, leaving no file (issue 16, item 9)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import PATIENCE

TESTS, SRC = Path(__file__).resolve().parent, Path(__file__).resolve().parents[1] / "src"

PARENT = """
import os, pathlib, sys

sys.path.insert(0, {tests!r})
import conftest

def loader(device="cpu", **kwargs):
    models = conftest.tiny_models(device=device)  # the worker's device, not CLIPSTYLE_TEST_DEVICE
    pathlib.Path({marks!r}, str(os.getpid())).touch()  # this worker is about to optimise
    return models

if __name__ == "__main__":
    from clipstyle.config import Settings
    from clipstyle.jobs.inputs import collect_inputs
    from clipstyle.jobs.pairs import plan_pairs
    from clipstyle.prompts import NO_TEMPLATES
    from clipstyle.jobs.report import Report
    from clipstyle.jobs.run import RunOptions
    from clipstyle.jobs.devices import run_on_devices

    pairs = plan_pairs(collect_inputs([{inputs!r}]), ["ink"], pathlib.Path({out!r}), 0)
    endless = Settings(steps=100_000, size=16, crops=1, crop_size=8, templates=NO_TEMPLATES)
    run_on_devices(pairs, ["cpu"], loader, endless, RunOptions(), Report(None))
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has stopped
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux)")
def test_workers_stop_when_their_parent_is_killed(tmp_path):
    inputs, marks, out = tmp_path / "in", tmp_path / "marks", tmp_path / "out"
    inputs.mkdir()
    marks.mkdir()
    for i in range(2):
        Image.new("RGB", (16, 16), (100 * i, 50, 50)).save(inputs / f"{i}.png")
    script = tmp_path / "parent.py"
    script.write_text(PARENT.format(tests=str(TESTS), marks=str(marks), inputs=str(inputs), out=str(out)))
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    parent = subprocess.Popen([sys.executable, str(script)], env=env, stderr=subprocess.PIPE)
    workers: list[int] = []
    try:
        end = time.monotonic() + PATIENCE
        while not workers:
            assert parent.poll() is None, parent.stderr.read().decode()
            assert time.monotonic() < end, "no worker started"
            workers = [int(p.name) for p in marks.iterdir()]
            time.sleep(0.05)
        time.sleep(0.5)  # optimising now
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        end = time.monotonic() + PATIENCE
        while any(_alive(pid) for pid in workers) and time.monotonic() < end:
            time.sleep(0.05)
        assert not any(_alive(pid) for pid in workers), "the worker outlived its parent"
        assert not out.exists() or list(out.iterdir()) == []  # no image, no temporary file
    finally:
        parent.kill()
        parent.wait()
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_worker_makes_its_card_the_current_one_before_loading(monkeypatch):
    # Otherwise what uses the current card (cuBLAS handles, a context) lands on cuda:0.
    import queue

    import torch

    from clipstyle.errors import ClipstyleError
    from clipstyle.jobs import devices as W

    order = []
    monkeypatch.setattr(W, "_stop_with", lambda parent: None)  # in-process: no parent-death signal
    monkeypatch.setattr(W.signal, "signal", lambda *args: None)
    monkeypatch.setattr(torch.cuda, "set_device", lambda card: order.append(("current", str(card))))

    def loader(device):
        order.append(("load", device))
        raise ClipstyleError("no models here")

    results = queue.Queue()
    W._worker(0, "cuda:1", loader, None, None, queue.Queue(), results, os.getppid())
    assert order == [("current", "cuda:1"), ("load", "cuda:1")]
    assert results.get_nowait() == ("fatal", 0, "cuda:1: no models here")
    order.clear()
    W._worker(0, "cpu", loader, None, None, queue.Queue(), queue.Queue(), os.getppid())
    assert order == [("load", "cpu")]


def test_workers_share_the_threads_a_local_run_would_use_and_set_them_before_loading(monkeypatch):
    import queue

    import torch

    from clipstyle.errors import ClipstyleError
    from clipstyle.jobs import devices as W

    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)  # a local run here would use 8
    assert [W.worker_threads(n) for n in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]
    order = []
    monkeypatch.setattr(W, "_stop_with", lambda parent: None)  # in-process: no parent-death signal
    monkeypatch.setattr(W.signal, "signal", lambda *args: None)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: order.append(("threads", n)))

    def loader(device):
        order.append(("load", device))
        raise ClipstyleError("no models here")

    W._worker(0, "cpu", loader, None, None, queue.Queue(), queue.Queue(), os.getppid(), None, 4)
    assert order == [("threads", 4), ("load", "cpu")]
