"""The speed work keeps the maths: fast paths against plain ones, and the bench itself."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from clipstyle.evaluation import bench as B

from checkpoints import checkpoints, hub_cache  # noqa: F401  (a fixture)
from conftest import DEVICE, invoke

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.device
def test_run_bench_reports_step_floor_ratio_baseline_and_batch(shared_models, tiny_settings):
    settings = tiny_settings.replace(size=32, crops=3, crop_size=16, steps=50)
    r = B.run_bench(shared_models, settings, batch=2, warmup=1, repeats=2, baseline=True)
    assert r.device == str(shared_models.device) and r.processor and r.threads == 1
    if DEVICE.type == "cpu":  # auto: fp32, and channels-last VGG
        assert r.precision == "fp32" and r.memory_format == "channels_last"
    elif DEVICE.type == "cuda":  # auto: bf16 (fp16 without it) autocast, and channels-last VGG with it
        assert r.precision in ("bf16", "fp16") and r.memory_format == "channels_last"
    assert r.size == (32, 32) and r.crops == 3 and r.batch == 2 and r.steps == 50
    assert len(r.step_runs) == len(r.floor_runs) == len(r.baseline_runs) == 2
    assert r.seconds_per_step > 0 and r.floor_seconds > 0
    assert r.ratio == pytest.approx(r.seconds_per_step / r.floor_seconds)
    assert r.speedup == pytest.approx(r.baseline_seconds / r.seconds_per_step)
    assert r.images_per_minute == pytest.approx(60 * 2 / (r.seconds_per_step * 50))
    assert r.batch1 is not None and r.batch1["seconds_per_step"] > 0
    assert r.peak_memory_kind == ("device" if DEVICE.type == "cuda" else "process") and r.peak_memory_bytes > 0
    data = json.loads(json.dumps(r.to_dict()))
    assert data["ratio"] == pytest.approx(r.ratio)
    # operators per step (clipstyle.method.counting): the accelerator's path never reads device values
    assert data["ops"] == r.ops and r.ops["calls"] > r.ops["launches"] > 0
    if DEVICE.type == "cpu":  # the CPU's path reads the rejected count of each pair; a GPU's does not
        assert r.ops["host_reads"] == 2 and r.ops_accelerator["host_reads"] == 0
        assert r.ops_accelerator["launches"] < r.ops["launches"]
    else:
        assert r.ops["host_reads"] == 0 and r.ops_accelerator is None


@pytest.mark.device
def test_floor_uses_a_contiguous_vgg_and_needs_no_weight_gradients(shared_models):
    shared_models.vgg.use_channels_last(True)
    floor = B.Floor(shared_models, 3, (1, 3, 32, 32))
    assert not floor.vgg.channels_last and floor.vgg.features[0].weight.is_contiguous()
    floor.clip_pass()
    floor.vgg_pass()
    assert all(p.grad is None for p in shared_models.clip.parameters())
    assert all(p.grad is None for p in floor.vgg.parameters())


def tiny_bench(crops: int) -> list[str]:
    """bench options for one quick timed step at 32 px on the CPU, as JSON."""
    return [
        "--size",
        "32",
        "--crops",
        str(crops),
        "--crop-size",
        "16",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--json",
    ]


def test_bench_command_prints_json(shared_models, monkeypatch):
    monkeypatch.setattr(B, "bench_models", lambda device, clip_model="ViT-B-32": shared_models)
    args = ["bench", *tiny_bench(crops=2)]
    result = invoke(*args, catch_exceptions=True)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["crops"] == 2 and data["size"] == [32, 32] and data["ratio"] > 0
    assert set(data["ops"]) == {"calls", "launches", "host_reads"}
    text = invoke(*args[:-1], catch_exceptions=True)
    assert text.exit_code == 0 and "x floor" in text.output
    assert "launching kernels" in text.output and "0 host reads on a GPU's path" in text.output


def test_bench_compile_takes_a_mode_and_defaults_to_torchs_default(shared_models, monkeypatch):
    monkeypatch.setattr(B, "bench_models", lambda device, clip_model="ViT-B-32": shared_models)
    modes = []
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None: modes.append(mode) or fn)
    args = ["bench", *tiny_bench(crops=2)]
    for given, expected in ([["--compile", "reduce-overhead"], "reduce-overhead"], [["--compile"], "default"]):
        modes.clear()
        result = invoke(*args, *given, catch_exceptions=True)
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["compile"] == expected and set(modes) == {expected}
    bad = invoke(*args, "--compile", "fast", catch_exceptions=True)
    assert bad.exit_code == 2 and "fast" in bad.output


def test_bench_command_refuses_half_a_pair_of_weight_files(tmp_path):
    weights = tmp_path / "clip.pt"
    weights.write_bytes(b"")
    result = invoke("bench", "--clip-weights", weights, catch_exceptions=True)
    assert result.exit_code == 2 and "go together" in result.output


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_script_is_valid_bash():
    script = ROOT / "benchmarks" / "gpu.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0


def test_bench_cached_refuses_to_download_and_names_what_is_missing(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    result = invoke("bench", "--cached", "--device", "cpu", catch_exceptions=True)
    assert result.exit_code == 1
    assert "CLIP ViT-B-32/openai and VGG-19 not in the cache" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_bench_cached_times_loading_from_warm_caches(checkpoints, monkeypatch, tmp_path):  # noqa: F811
    import huggingface_hub.constants
    import open_clip

    repo = open_clip.get_pretrained_cfg("ViT-B-32", "openai")["hf_hub"].strip("/")
    hub_cache(tmp_path / "hub", repo, "open_clip_pytorch_model.bin", checkpoints.clip)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    shutil.copyfile(checkpoints.vgg, tmp_path / "torch" / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    args = ["bench", "--cached", *tiny_bench(crops=1)]
    result = invoke(*args, catch_exceptions=True)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["load_from"] == "caches" and data["load_seconds"] > 0 and data["import_seconds"] >= 0


@pytest.mark.device
def test_run_bench_times_forced_rejection_before_and_after_the_two_pass_path(shared_models, tiny_settings):
    from clipstyle.cli.bench import format_result

    settings = tiny_settings.replace(size=32, crops=4, crop_size=16)
    r = B.run_bench(shared_models, settings, warmup=1, repeats=2, force_reject=(0.0, 0.75))
    assert r.rejected_runs == [0.0, 0.0]  # random tiny CLIP: nothing passes the paper's threshold
    low, high = r.forced
    for f in r.forced:
        assert len(f["before_runs"]) == len(f["after_runs"]) == len(f["floor_runs"]) == 2
        assert f["rejected_per_step"] == [f["rate"]] * 4  # before, after, before, after
        assert f["after_over_floor"] > 0 and f["before_over_floor"] > 0 and f["after_over_before"] > 0
    assert low["two_pass_steps"] == 0 and high["two_pass_steps"] == 2
    text = format_result(r)
    assert "forced 0.75" in text and "two-pass in 2 of 2 steps" in text


def test_bench_command_refuses_a_bad_forced_rejection_rate():
    for bad in ("0.5,x", "1.5"):
        result = invoke("bench", "--force-reject", bad, "--device", "cpu", catch_exceptions=True)
        assert result.exit_code == 2 and "--force-reject" in result.output


def test_gpu_profile_counts_overlapping_kernels_once():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_profile", ROOT / "benchmarks" / "gpu_profile.py")
    profile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profile)
    # two streams overlapping (0-10, 5-12), one kernel inside another (20-30, 22-25), a gap, one alone
    assert profile.merged_length([(20, 30), (0, 10), (5, 12), (22, 25), (40, 41)]) == 12 + 10 + 1
    assert profile.merged_length([]) == 0


def test_bench_batch_auto_and_the_graph_path_on_the_cpu(shared_models, monkeypatch):
    monkeypatch.setattr(B, "bench_models", lambda device, clip_model="ViT-B-32": shared_models)
    result = invoke("bench", *tiny_bench(crops=2), "--batch", "auto", "--cuda-graph", catch_exceptions=True)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output.splitlines()[-1])
    assert data["batch"] == 1 and data["batch_auto"] is True  # a CPU: one pair
    assert data["cuda_graph"] is True and data["ops"]["host_reads"] == 0  # the graph path never reads
    bad = invoke("bench", *tiny_bench(crops=2), "--batch", "lots", catch_exceptions=True)
    assert bad.exit_code == 2
