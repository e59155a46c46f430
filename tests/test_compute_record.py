"""What decides a result's last bits besides its settings is recorded beside them (issue 26, item 1):
the device, the torch build, and the CPU thread count (or the GPU's name), in the PNG and the report."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from clipstyle.device import compute_info

import conftest
from conftest import TINY_32, invoke, records


@pytest.fixture
def loader(monkeypatch):
    monkeypatch.setattr("clipstyle.jobs.plan.load_models", conftest.tiny_loader)


def recorded(path) -> dict:
    with Image.open(path) as img:
        return json.loads(img.text["clipstyle"])


def test_run_and_apply_record_the_thread_count_they_ran_with(tmp_path, loader):
    photo = conftest.photo_folder(tmp_path) / "img0.png"
    torch.set_num_threads(2)  # conftest sets 1 again for the next test
    out, style, report = tmp_path / "o.png", tmp_path / "o.style", tmp_path / "r.jsonl"
    result = invoke("run", photo, "-p", "ink", "-o", out, "--save-style", style, "--report", report, *TINY_32)
    assert result.exit_code == 0, result.stderr
    expected = {"device": "cpu", "torch": torch.__version__, "threads": 2}
    assert recorded(out)["compute"] == expected == records(report)[0]["compute"]
    assert "settings" in recorded(out)  # beside the settings
    torch.set_num_threads(1)
    applied = tmp_path / "a.png"
    result = invoke("apply", style, photo, "-o", applied, "--report", tmp_path / "a.jsonl", "-q")
    assert result.exit_code == 0, result.stderr
    assert recorded(applied)["compute"] == {**expected, "threads": 1} == records(tmp_path / "a.jsonl")[0]["compute"]


def test_a_rerun_with_another_thread_count_still_skips_what_is_done(tmp_path, loader):
    photo = conftest.photo_folder(tmp_path) / "img0.png"
    out, report = tmp_path / "o.png", tmp_path / "r.jsonl"
    assert invoke("run", photo, "-p", "ink", "-o", out, *TINY_32).exit_code == 0
    torch.set_num_threads(2)
    assert invoke("run", photo, "-p", "ink", "-o", out, "--report", report, *TINY_32).exit_code == 0
    assert records(report)[0]["status"] == "skipped"  # the same settings: its last bits may differ, not its look


def test_a_gpu_is_named_rather_than_counted_in_threads(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Some Card 80GB")
    assert compute_info(torch.device("cuda:1")) == {
        "device": "cuda",
        "torch": torch.__version__,
        "name": "Some Card 80GB",
    }
    assert compute_info(torch.device("mps")) == {"device": "mps", "torch": torch.__version__}
