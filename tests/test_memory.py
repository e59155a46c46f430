"""Memory: sizes that cannot fit are refused before allocating; any allocation failure is
that pair's out-of-memory failure (issue 16, item 6)."""

from __future__ import annotations

import errno

import pytest
import torch
from PIL import Image

from clipstyle.errors import is_out_of_memory
from clipstyle.method.unet import StyleNet
from clipstyle.styles.stylefile import save_style

import conftest
from conftest import TINY_32, counting_loader, invoke, records

CPU_ALLOCATOR = (
    "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried "
    "to allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)"
)


@pytest.fixture
def loads(monkeypatch):
    return counting_loader(monkeypatch, "run")


@pytest.fixture
def three(tmp_path):
    return conftest.three_photos(tmp_path)


@pytest.fixture
def eight_gb(monkeypatch):
    """The host has 8 GB. Tests using it pass --device cpu: on a GPU machine, auto would check the GPU's memory."""
    monkeypatch.setattr("clipstyle.jobs.memory.host_memory", lambda: 8_000_000_000)


@pytest.mark.parametrize(
    "exc, oom",
    [
        (RuntimeError(CPU_ALLOCATOR), True),
        (MemoryError(), True),
        (OSError(errno.ENOMEM, "Cannot allocate memory"), True),
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
        (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), True),
        (RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), True),
        (RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED"), False),
        (ValueError("bad value"), False),
        (OSError(errno.ENOSPC, "No space left on device"), False),
    ],
)
def test_allocation_failures_are_recognised_on_every_device(exc, oom):
    assert is_out_of_memory(exc) == oom


@pytest.mark.parametrize(
    "failure", [MemoryError, lambda: RuntimeError(CPU_ALLOCATOR)], ids=["MemoryError", "alloc_cpu"]
)
def test_running_out_while_preparing_an_image_fails_only_that_pair(tmp_path, three, loads, monkeypatch, failure):
    import clipstyle.images as io

    real = io.prepare_content

    def prepare(image, size):
        if image.getpixel((0, 0))[0] == 80:  # in1.png
            raise failure()
        return real(image, size)

    monkeypatch.setattr(io, "prepare_content", prepare)
    out, report = tmp_path / "out", tmp_path / "r.jsonl"
    result = invoke("run", *three, "-p", "x", "-o", out, "--report", report, *TINY_32)
    assert result.exit_code == 1 and "internal error" not in result.stderr, result.stderr
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("clipstyle: error:")]
    assert line.startswith(f"clipstyle: error: {three[1]}: out of memory preparing the image for --size 32")
    assert "lower --size" in line
    assert sorted(p.name for p in out.iterdir()) == ["in0-x.png", "in2-x.png"]
    assert [r["status"] for r in records(report)] == ["ok", "failed", "ok"]


def test_the_cpu_allocators_error_while_optimising_is_out_of_memory(tmp_path, three, loads, monkeypatch):
    import clipstyle.jobs.run as R

    real, calls = R.stylize_many, []

    def stylize_many(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError(CPU_ALLOCATOR)
        return real(*args, **kwargs)

    monkeypatch.setattr(R, "stylize_many", stylize_many)
    result = invoke("run", *three, "-p", "x", "-o", tmp_path / "out", *TINY_32)
    assert result.exit_code == 1 and "internal error" not in result.stderr, result.stderr
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("clipstyle: error:")]
    assert line.startswith(f"clipstyle: error: {three[0]}: out of memory at 32x24 px with 2 crops; lower --size")
    assert len(list((tmp_path / "out").iterdir())) == 2


def test_a_size_no_image_can_fit_is_refused_before_anything(tmp_path, three, loads, eight_gb):
    result = invoke("run", *three, "-p", "x", "-o", tmp_path / "out", *TINY_32, "--size", "64000", "--device", "cpu")
    assert result.exit_code == 1, result.stderr
    assert result.stderr.startswith(
        "clipstyle: error: --size 64000: optimising even the thinnest image "
        "(64000x3200 px) with 2 crops needs at least 819.2 GB of memory, more than the "
        "8.0 GB this machine has; lower --size"
    ), result.stderr
    assert loads == [] and not (tmp_path / "out").exists()


def test_an_image_too_large_at_its_size_fails_alone_before_allocating(tmp_path, three, loads, eight_gb, monkeypatch):
    wide = tmp_path / "wide.png"
    Image.new("RGB", (300, 15)).save(wide)  # 1:20: at 4096 px it needs 4096x208 px, which fits
    import clipstyle.images as io

    sizes = []
    monkeypatch.setattr(io, "prepare_content", lambda image, size: sizes.append(size) or torch.rand(1, 3, 16, 16))
    args = [*TINY_32, "--size", "4096", "--steps", "1", "--device", "cpu"]
    result = invoke("run", three[0], wide, "-p", "x", "-o", tmp_path / "out", *args)
    assert result.exit_code == 1
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("clipstyle: error:")]
    assert line == (
        f"clipstyle: error: {three[0]}: optimising at 4096x2728 px with 2 crops needs at least 44.7 GB "
        "of memory, more than the 8.0 GB this machine has; lower --size or --crops"
    )
    assert len(sizes) == 1  # only the image that fits was prepared


def test_apply_refuses_a_size_that_cannot_fit_before_allocating(tmp_path, three, eight_gb):
    style = tmp_path / "ink.style"
    save_style(style, StyleNet(), {"prompt": "ink"})
    result = invoke("apply", style, *three, "--size", "40000", "-o", tmp_path / "out", "-q", "--device", "cpu")
    assert result.exit_code == 1 and "internal error" not in result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("clipstyle: error:")]
    assert lines == [
        f"clipstyle: error: {p}: rendering at 40000x26667 px needs at least 42.7 GB of memory, more "
        "than the 8.0 GB this machine has; lower --size"
        for p in three
    ]
    assert not list((tmp_path / "out").glob("*"))
    up_front = invoke("apply", style, *three, "--size", "65536", "-o", tmp_path / "out", "-q", "--device", "cpu")
    assert up_front.exit_code == 1 and "--size 65536: rendering even the thinnest image" in up_front.stderr


def test_batch_auto_fills_a_share_of_the_gpus_free_memory_up_to_the_cap():
    from clipstyle.config import AUTO_BATCH_MAX, AUTO_BATCH_SHARE, Settings
    from clipstyle.jobs.memory import auto_batch, run_bytes

    s = Settings()  # 512 px, 64 crops
    cuda = torch.device("cuda")
    per_pair = run_bytes(512, 512, 64)
    assert auto_batch(s, cuda, free=int(5 * per_pair / AUTO_BATCH_SHARE) + 1) == 5
    assert auto_batch(s, cuda, free=int(5 * per_pair / AUTO_BATCH_SHARE) - 1000) == 4
    assert auto_batch(s, cuda, free=10**15) == AUTO_BATCH_MAX
    assert auto_batch(s, cuda, free=1000) == 1  # a pair that may not fit still runs, one at a time
    # fewer crops encoded at once: more pairs in the same memory
    chunked = s.replace(crop_batch=8)
    assert auto_batch(chunked, cuda, free=int(5 * per_pair / AUTO_BATCH_SHARE)) > 5
    assert auto_batch(s, torch.device("cpu"), free=10**15) == 1  # a CPU gains little from batches


def test_batch_auto_reads_the_free_memory_of_the_card(monkeypatch):
    from clipstyle.config import AUTO_BATCH_SHARE, Settings
    from clipstyle.jobs import memory
    from clipstyle.jobs.memory import run_bytes

    per_pair = run_bytes(512, 512, 64)
    card, unused = int(3 * per_pair / AUTO_BATCH_SHARE) + 10, int(per_pair / AUTO_BATCH_SHARE) + 10
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (card, 0))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: unused + 7)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 7)
    # free on the card, plus what the allocator holds unused: 3 + 1 pairs' worth at the share
    assert memory.free_memory("cuda") == card + unused
    assert memory.auto_batch(Settings(), torch.device("cuda")) == 4
    assert memory.free_memory("cpu") is None


def test_run_batch_auto_on_the_cpu_is_one_pair_per_batch_and_reported(tmp_path, photo, loads):
    out = tmp_path / "out"
    report = tmp_path / "r.jsonl"
    loud = [a for a in TINY_32 if a != "-q"]  # the summary line is what reports the choice
    result = invoke("run", photo, "-p", "fire", "-p", "ice", "-o", out, *loud, "--batch", "auto", "--report", report)
    assert result.exit_code == 0, result.output
    assert [r["batch"] for r in records(report)] == [1, 1]
    assert "--batch auto: 1 pairs per batch" in result.output


def test_run_batch_refuses_other_words_and_auto_across_devices(photo, tmp_path):
    bad = invoke("run", str(photo), "-p", "fire", "-o", str(tmp_path / "o"), "--batch", "many")
    assert bad.exit_code == 2 and "neither a whole number" in bad.output
    zero = invoke("run", str(photo), "-p", "fire", "-o", str(tmp_path / "o"), "--batch", "0")
    assert zero.exit_code == 2
    across = invoke(
        "run", str(photo), "-p", "fire", "-o", str(tmp_path / "o"), "--batch", "auto", "--devices", "cpu,cpu"
    )
    assert across.exit_code != 0 and "--batch auto needs one device" in across.output
