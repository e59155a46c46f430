"""The installed ``clipstyle`` command, run as a user runs it, on real
architectures with random weights written by the tests (no downloads)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from PIL import Image

from checkpoints import checkpoints  # noqa: F401  (a fixture)
from conftest import WAIT, records


def clipstyle_script() -> str:
    beside = Path(sys.executable).parent / "clipstyle"
    if beside.exists():
        return str(beside)
    found = shutil.which("clipstyle")
    assert found, "the clipstyle console script is not installed"
    return found


def offline_env(tmp_path: Path) -> dict[str, str]:
    """The environment with every model cache in an empty folder and the hubs offline."""
    env = dict(os.environ)
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "TORCH_HOME": str(tmp_path / "torch"),
            "HF_HOME": str(tmp_path / "hf"),
            "XDG_CACHE_HOME": str(tmp_path / "cache"),
        }
    )
    env.pop("HF_HUB_CACHE", None)
    return env


def test_run_writes_a_repeatable_png_with_metadata_and_a_report(checkpoints, photo, tmp_path):  # noqa: F811
    outputs = [tmp_path / "first.png", tmp_path / "second.png"]
    reports = [tmp_path / "first.jsonl", tmp_path / "second.jsonl"]
    env = offline_env(tmp_path)
    # The two runs go side by side, one thread each: on a small machine that is
    # faster than one after the other, and loading overlaps.
    env["OMP_NUM_THREADS"] = "1"
    runs = [
        subprocess.Popen(
            # --no-templates: encoding the 79 templates would cost more than the two steps
            [
                clipstyle_script(),
                "run",
                "-p",
                "starry night",
                str(photo),
                "-o",
                str(out),
                "--clip-weights",
                str(checkpoints.clip),
                "--vgg-weights",
                str(checkpoints.vgg),
                "--size",
                "64",
                "--crops",
                "2",
                "--crop-size",
                "32",
                "--steps",
                "2",
                "--seed",
                "3",
                "--no-templates",
                "--report",
                str(report),
                "--device",
                "cpu",
                "-q",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for out, report in zip(outputs, reports)
    ]
    try:
        errors = [run.communicate(timeout=WAIT)[1] for run in runs]
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
    for run, stderr in zip(runs, errors):
        assert run.returncode == 0, stderr
        assert "Traceback" not in stderr
        assert "QuickGELU" not in stderr  # no activation mismatch for OpenAI's weights

    first, second = outputs
    image = Image.open(first)
    image.load()
    assert image.format == "PNG" and image.mode == "RGB"
    assert image.size == (64, 40)  # the 48x32 photo, longest side 64, sides multiples of 8
    assert abs(image.size[0] / image.size[1] - 48 / 32) < 0.15
    assert image.text["prompt"] == "starry night"
    assert any(low < high for low, high in image.getextrema())  # a picture, not a flat fill
    for out, report in zip(outputs, reports):
        (record,) = records(report)
        assert record["status"] == "ok" and record["error"] is None
        assert record["output"] == str(out)
        assert record["prompt"] == "starry night" and record["steps"] == 2
    # the same seed gives the same file, byte for byte
    assert first.read_bytes() == second.read_bytes()


def imported_modules(*args: str) -> set[str]:
    """Modules that ``python -m clipstyle ARGS`` imports (from -X importtime)."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "clipstyle", *args], capture_output=True, text=True, timeout=WAIT
    )
    assert proc.returncode == 0, proc.stderr
    assert "Usage:" in proc.stdout
    return {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}


def test_help_imports_no_torch():
    for args in (["--help"], ["run", "--help"]):
        modules = imported_modules(*args)
        assert "clipstyle.cli" in modules  # the listing is real
        assert not {m for m in modules if m == "torch" or m.startswith("torch.")}, args
    proc = subprocess.run([clipstyle_script(), "--help"], capture_output=True, text=True, timeout=WAIT)
    assert proc.returncode == 0 and "run" in proc.stdout
