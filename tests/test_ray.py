"""`clipstyle run --executor ray` (issue 14) on a local Ray instance with two CPUs, shared by this module."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import conftest
from conftest import PATIENCE, TINY_32, invoke, records


@pytest.fixture(scope="module")
def cluster():
    """One local Ray for the module; its address, for a second driver to join."""
    ray = pytest.importorskip("ray")
    # Actors unpickle the tiny loader and this module's hooks: send them by value,
    # since the tests folder is not importable in Ray's worker processes.
    ray.cloudpickle.register_pickle_by_value(conftest)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture
def loader(monkeypatch):
    monkeypatch.setattr("clipstyle.jobs.plan.load_models", conftest.tiny_loader)


@pytest.fixture
def folder(tmp_path):
    """Four good images and one broken one."""
    d = conftest.photo_folder(tmp_path)
    return d


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def no_model(device="cpu"):
    return None


def test_shards_on_ray_write_the_local_bytes_once_then_a_rerun_skips(tmp_path, folder, loader, cluster):
    local, out, report = tmp_path / "local", tmp_path / "ray", tmp_path / "ray.jsonl"
    args = [folder, tmp_path / "missing.png", "-p", "ink", "-p", "mosaic", *TINY_32]
    expected = invoke("run", *args, "-o", local, "--save-style", local / "styles", "--report", tmp_path / "l.jsonl")
    assert expected.exit_code == 1  # broken.jpg and missing.png
    for k in (1, 2):
        result = invoke(
            "run",
            *args,
            "-o",
            out,
            "--save-style",
            out / "styles",
            "--report",
            report,
            "--executor",
            "ray",
            "--ray-workers",
            "1",
            "--shard",
            f"{k}/2",
        )
        assert result.exit_code in (0, 1), result.stderr
    recs = records(report)
    assert sorted(r["output"] for r in recs) == sorted(
        r["output"].replace(str(local), str(out)) for r in records(tmp_path / "l.jsonl")
    )  # each pair once
    assert len(list(out.glob("*.png"))) == 8 and len(list((out / "styles").glob("*.style"))) == 8
    assert files(out) == files(local)  # PNGs and style files, byte for byte
    local_errors = sorted(r["error"] for r in records(tmp_path / "l.jsonl") if r["status"] == "failed")
    assert sorted(r["error"] for r in recs if r["status"] == "failed") == local_errors  # bad files: as locally
    assert len(local_errors) == 4 and all(r["status"] == "ok" for r in recs if "img" in r["input"])
    again = invoke(
        "run",
        folder / "img*.png",
        "-p",
        "ink",
        "-p",
        "mosaic",
        *TINY_32,
        "-o",
        out,
        "--report",
        tmp_path / "again.jsonl",
        "--executor",
        "ray",
    )
    assert again.exit_code == 0, again.stderr
    assert [r["status"] for r in records(tmp_path / "again.jsonl")] == ["skipped"] * 8


def die_once(marker: str, models, batch, data, settings, options):
    """The stand-in job, but the first actor to get img2.png exits on the spot."""
    from clipstyle.jobs.ray_executor import instant_batch

    if any(p.input.rel == "img2.png" for p in batch):
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            pass
        else:
            os._exit(1)
    return instant_batch(models, batch, data, settings, options)


def test_a_killed_worker_is_replaced_and_every_pair_ends_once(tmp_path, folder, tiny_settings, cluster):
    from clipstyle.jobs.batch import Events as RunEvents
    from clipstyle.jobs.inputs import collect_inputs
    from clipstyle.jobs.pairs import plan_pairs
    from clipstyle.jobs.ray_executor import run_with_ray
    from clipstyle.jobs.report import Report
    from clipstyle.jobs.run import RunOptions

    class Notes(RunEvents):
        def __init__(self):
            self.notes = []

        def note(self, pair, message):
            self.notes.append(message)

    (folder / "broken.jpg").unlink()
    out, marker = tmp_path / "out", tmp_path / "died"
    pairs = plan_pairs(collect_inputs([str(folder)]), ["a", "b", "c"], out, 0)
    report, events = Report(tmp_path / "r.jsonl"), Notes()
    summary = run_with_ray(
        pairs,
        no_model,
        tiny_settings,
        RunOptions(batch=2),
        report,
        events,
        workers=2,
        job=functools.partial(die_once, str(marker)),
    )
    report.close()
    assert marker.exists() and any("worker stopped" in n for n in events.notes)  # one did die
    recs = records(tmp_path / "r.jsonl")
    assert sorted(r["output"] for r in recs) == sorted(str(p.output) for p in pairs)  # exactly one record each
    assert summary.ok == len(pairs) == 12 and {r["status"] for r in recs} == {"ok"}
    assert sorted(out.iterdir()) == sorted(p.output for p in pairs)  # one file each, no temporary files left


def test_more_workers_than_the_cluster_can_place_still_finish(tmp_path, folder, tiny_settings, cluster):
    """Four one-CPU workers on two CPUs: two never start, and must not hold work back."""
    import threading

    from clipstyle.jobs.inputs import collect_inputs
    from clipstyle.jobs.pairs import plan_pairs
    from clipstyle.jobs.ray_executor import instant_batch, run_with_ray
    from clipstyle.jobs.report import Report
    from clipstyle.jobs.run import RunOptions

    (folder / "broken.jpg").unlink()
    pairs = plan_pairs(collect_inputs([str(folder)]), ["a", "b", "c"], tmp_path / "out", 0)
    done = []
    run = threading.Thread(
        target=lambda: done.append(
            run_with_ray(pairs, no_model, tiny_settings, RunOptions(), Report(None), workers=4, job=instant_batch)
        ),
        daemon=True,
    )
    run.start()
    run.join(timeout=PATIENCE)
    assert done and done[0].ok == len(pairs) == 12


def missing_weights(device="cpu"):
    from clipstyle.errors import WeightsError

    raise WeightsError("weights file not found", "nowhere/ViT-B-32.pt")


def test_workers_whose_models_do_not_load_fail_every_pair_with_the_reason(tmp_path, folder, tiny_settings, cluster):
    from clipstyle.jobs.inputs import collect_inputs
    from clipstyle.jobs.pairs import plan_pairs
    from clipstyle.jobs.ray_executor import run_with_ray
    from clipstyle.jobs.report import Report
    from clipstyle.jobs.run import RunOptions

    pairs = plan_pairs(collect_inputs([str(folder)]), ["a", "b"], tmp_path / "out", 0)
    summary = run_with_ray(pairs, missing_weights, tiny_settings, RunOptions(), Report(None), workers=2)
    assert summary.failed == len(pairs) == 10
    assert all(
        r["error"].endswith("not processed (nowhere/ViT-B-32.pt: weights file not found)") for r in summary.records
    )
    assert not (tmp_path / "out").exists()


def test_one_worker_per_gpu_else_per_group_of_cpus():
    from clipstyle.jobs.ray_executor import default_workers

    assert default_workers({"CPU": 64.0, "GPU": 8.0}, cpus_per_worker=4) == (8, True)
    assert default_workers({"CPU": 64.0}, cpus_per_worker=4) == (16, False)
    assert default_workers({"CPU": 2.0}, cpus_per_worker=8) == (1, False)


def test_ray_missing_is_one_line_saying_how_to_install_it(tmp_path, folder, loader, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    result = invoke("run", folder, "-p", "x", "-o", tmp_path / "out", "--executor", "ray", *TINY_32)
    assert result.exit_code == 1
    assert (
        result.stderr.strip() == "clipstyle: error: Ray is not installed; install it with: pip install 'clipstyle[ray]'"
    )
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_ray_options_need_the_ray_executor(tmp_path, folder, loader):
    result = invoke("run", folder, "-p", "x", "-o", tmp_path / "o", "--ray-address", "auto", *TINY_32)
    assert result.exit_code == 2 and "--ray-address needs --executor ray" in result.stderr
    result = invoke("run", folder, "-p", "x", "-o", tmp_path / "o", "--executor", "ray", "--devices", "cpu", *TINY_32)
    assert result.exit_code == 2 and "--devices is for the local executor" in result.stderr
    result = invoke("run", folder, "-p", "x", "-o", tmp_path / "o", "--executor", "ray", *TINY_32, "--device", "cuda:1")
    assert result.exit_code == 2 and "--device cuda:1 names a card of this machine" in result.stderr
    assert not (tmp_path / "o").exists()


def test_a_cluster_address_nothing_answers_at_is_one_line(tmp_path, folder, loader):
    import socket

    pytest.importorskip("ray")
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    result = invoke(
        "run", folder, "-p", "x", "-o", tmp_path / "o", "--executor", "ray", "--ray-address", address, *TINY_32
    )
    assert result.exit_code == 1
    assert result.stderr.strip() == f"clipstyle: error: {address}: cannot reach the Ray cluster: Connection refused"
    assert not (tmp_path / "o").exists()


DRIVER = """
import functools, sys, time
import clipstyle.cli.run as cli_run
import clipstyle.jobs.ray_executor as executor

def no_model(*args, device="cpu", **kwargs):
    return None

def slow(models, batch, data, settings, options):
    time.sleep(0.4)
    return executor.instant_batch(models, batch, data, settings, options)

import clipstyle.jobs.plan as plan
plan.load_models = no_model
executor.run_with_ray = functools.partial(executor.run_with_ray, job=slow)
from clipstyle.cli import main
main(sys.argv[1:])
"""


def test_sigterm_stops_a_ray_run_cleanly_with_exit_130(tmp_path, folder, cluster):
    """A second driver joins the module's Ray by --ray-address; SIGTERM once it has written a record."""
    (folder / "broken.jpg").unlink()
    script, out, report = tmp_path / "driver.py", tmp_path / "out", tmp_path / "r.jsonl"
    script.write_text(textwrap.dedent(DRIVER))
    proc = subprocess.Popen(
        [
            sys.executable,
            str(script),
            "run",
            str(folder),
            *(f"-p{p}" for p in "abcde"),
            "-o",
            str(out),
            "--report",
            str(report),
            "--executor",
            "ray",
            "--ray-address",
            cluster,
            "--ray-workers",
            "1",
            *TINY_32,
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + PATIENCE
        while not (report.exists() and report.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=PATIENCE)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    recs = records(report)  # every line a whole record
    assert 1 <= len(recs) < 20 and all(r["status"] == "ok" for r in recs)
    assert sorted(p.name for p in out.iterdir()) == sorted(Path(r["output"]).name for r in recs)  # no partial files


# A size and a step count at which the thread count matters even with the tiny models (at 32 px, two
# steps, no operation is big enough for torch to split it over threads).
UNEQUAL = ["--size", "64", "--steps", "4", "--crops", "4"]
# The bound docs/scale.md gives for this configuration (measured: max 19, mean 2.5 levels).
BOUND_MAX, BOUND_MEAN = 64, 8.0


def test_local_and_ray_at_unequal_thread_counts_record_them_and_stay_within_the_documented_bound(
    tmp_path, folder, loader, cluster
):
    import numpy as np
    from PIL import Image

    photo = folder / "img0.png"
    local, ray_out = tmp_path / "local.png", tmp_path / "ray.png"
    args = ["run", photo, "-p", "ink", *TINY_32, *UNEQUAL]
    assert invoke(*args, "-o", local, "--report", tmp_path / "l.jsonl").exit_code == 0  # one thread (conftest)
    result = invoke(
        *args, "-o", ray_out, "--report", tmp_path / "r.jsonl", "--executor", "ray", "--ray-cpus-per-worker", "2"
    )
    assert result.exit_code == 0, result.stderr
    recorded = []
    for path, report in ((local, "l.jsonl"), (ray_out, "r.jsonl")):
        with Image.open(path) as img:
            compute = json.loads(img.text["clipstyle"])["compute"]
            recorded.append(compute["threads"])
            pixels = np.asarray(img.convert("RGB"), dtype=np.int16)
        assert records(tmp_path / report)[0]["compute"] == compute  # the report says the same
        assert compute["device"] == "cpu" and compute["torch"]
        recorded.append(pixels)
    threads_local, a, threads_ray, b = recorded
    assert (threads_local, threads_ray) == (1, 2)  # a Ray worker uses the CPUs it is given
    difference = np.abs(a - b)
    assert difference.max() <= BOUND_MAX and difference.mean() <= BOUND_MEAN, (difference.max(), difference.mean())


def claims_seen_by_the_worker(models, batch, data, settings, options):
    """The real stylizing, watched from inside the actor: which claims it takes itself, and who holds
    each pair's lock while it computes."""
    import clipstyle.jobs.batch as batch_module
    from clipstyle.jobs.claims import lock_path
    from clipstyle.jobs.ray_executor import stylize_batch

    taken = []
    real = batch_module.claim
    batch_module.claim = lambda output, *args, **kwargs: taken.append(str(output)) or real(output, *args, **kwargs)
    try:
        holders = [json.loads(lock_path(p.output).read_text())["pid"] for p in batch]
        returned = stylize_batch(models, batch, data, settings, options)
    finally:
        batch_module.claim = real
    returned.notes.append((None, json.dumps({"claimed": taken, "holders": holders})))
    return returned


def test_the_driver_claims_each_pair_until_written_and_honours_a_local_runs_lock(tmp_path, folder, cluster):
    from clipstyle.config import Settings
    from clipstyle.jobs import claims
    from clipstyle.jobs.batch import Events as RunEvents
    from clipstyle.jobs.inputs import collect_inputs
    from clipstyle.jobs.pairs import plan_pairs
    from clipstyle.jobs.ray_executor import run_with_ray
    from clipstyle.jobs.report import Report
    from clipstyle.jobs.run import RunOptions
    from clipstyle.prompts import NO_TEMPLATES

    class Notes(RunEvents):
        def __init__(self):
            self.notes = []

        def note(self, pair, message):
            self.notes.append(message)

    (folder / "broken.jpg").unlink()
    out = tmp_path / "out"
    out.mkdir()
    pairs = plan_pairs(collect_inputs([str(folder / "img0.png"), str(folder / "img1.png")]), ["a"], out, 0)
    busy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # a local run, making img1
    try:
        lock = claims.lock_path(pairs[1].output)
        lock.write_text(json.dumps({"pid": busy.pid, "host": claims.HOST, "started": time.time()}))
        events = Notes()
        tiny = Settings(steps=1, size=16, crops=1, crop_size=8, templates=NO_TEMPLATES)
        summary = run_with_ray(
            pairs,
            conftest.tiny_loader,
            tiny,
            RunOptions(),
            Report(None),
            events,
            workers=1,
            job=claims_seen_by_the_worker,
        )
        assert lock.exists() and json.loads(lock.read_text())["pid"] == busy.pid  # left alone
    finally:
        busy.kill()
        busy.wait()
    first, second = sorted(summary.records, key=lambda r: r["input"])
    assert first["status"] == "ok" and pairs[0].output.exists()
    assert second["status"] == "skipped" and "another run is making it" in second["error"]
    assert not pairs[1].output.exists()  # not computed twice
    (seen,) = [json.loads(n) for n in events.notes if n.startswith("{")]
    assert seen == {"claimed": [], "holders": [os.getpid()]}  # the driver held it; the worker took none
    assert {p.name for p in out.iterdir()} == {pairs[0].output.name, lock.name}  # no lock left by us


def test_an_address_that_accepts_but_never_answers_is_refused_before_any_folder_is_made(
    tmp_path, folder, loader, monkeypatch
):
    import socket

    pytest.importorskip("ray")
    monkeypatch.setattr("clipstyle.jobs.ray_executor.CONNECT_TIMEOUT_S", 0.5)
    with socket.socket() as server:  # accepts connections, never says a word (Ray waited over ten minutes)
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        result = invoke(
            "run",
            folder,
            "-p",
            "x",
            "-o",
            tmp_path / "o" / "deep",
            "--executor",
            "ray",
            "--ray-address",
            address,
            *TINY_32,
        )
    assert result.exit_code == 1
    assert result.stderr.strip() == f"clipstyle: error: {address}: cannot reach the Ray cluster: no answer in 0.5 s"
    assert not (tmp_path / "o").exists()
