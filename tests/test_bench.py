"""The speed work keeps the maths: fast paths against plain ones, and the bench itself."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from clipstyle import bench as B
from clipstyle.encoders import vit_fast_path_ok, vit_image_embedding
from clipstyle.stylize import _Pair, stylize_many

from checkpoints import checkpoints, hub_cache  # noqa: F401  (a fixture)
from conftest import tiny_clip, tiny_models, tiny_vgg

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shared_models():
    return tiny_models()


def _embedding_and_input_grad(encode, x0):
    x = x0.clone().requires_grad_()
    e = encode(x)
    (e * torch.linspace(-1, 1, e.shape[1])).sum().backward()
    return e.detach(), x.grad


@pytest.mark.parametrize("image_size,patch", [(32, 8), (48, 16)])
def test_fast_vit_path_equals_open_clips_forward_and_input_gradient(image_size, patch):
    import open_clip
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    from clipstyle.encoders import ClipEncoder

    torch.manual_seed(0)
    model = CLIP(embed_dim=16, quick_gelu=True,
                 vision_cfg=CLIPVisionCfg(layers=3, width=32, head_width=8, patch_size=patch, image_size=image_size),
                 text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
    clip = ClipEncoder(model, open_clip.SimpleTokenizer(), image_size)
    assert vit_fast_path_ok(clip.model.visual)
    x0 = torch.rand(5, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    clip.fast = False
    plain = _embedding_and_input_grad(clip.encode_image, x0)
    clip.fast = True
    fast = _embedding_and_input_grad(clip.encode_image, x0)
    torch.testing.assert_close(fast[0], plain[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fast[1], plain[1], atol=1e-6, rtol=1e-4)
    # and directly against open_clip's VisionTransformer
    normalised = (x0 - clip.mean) / clip.std
    torch.testing.assert_close(vit_image_embedding(clip.model.visual, normalised),
                               clip.model.visual(normalised), atol=1e-5, rtol=1e-4)


def test_models_the_fast_path_does_not_cover_take_open_clips_forward():
    clip = tiny_clip()
    visual = clip.model.visual
    assert vit_fast_path_ok(visual)
    visual.pool_type = "avg"  # mean of the patch tokens: the last block must run for all of them
    assert not vit_fast_path_ok(visual)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(clip.encode_image(x), clip.model.encode_image((x - clip.mean) / clip.std))
    assert not vit_fast_path_ok(nn.Identity())


def test_channels_last_vgg_gives_the_same_features():
    vgg = tiny_vgg()
    x = torch.rand(2, 3, 40, 24)
    plain = vgg(x)
    vgg.use_channels_last(True)
    nhwc = vgg(x)
    assert nhwc["relu5_2"].is_contiguous(memory_format=torch.channels_last)
    for name in plain:
        torch.testing.assert_close(nhwc[name], plain[name], atol=1e-5, rtol=1e-4)
    vgg.use_channels_last(False)
    assert vgg.features[0].weight.is_contiguous()


def test_unet_instance_norm_is_torchs_instance_norm():
    from clipstyle.unet import InstanceNorm

    x = torch.randn(2, 16, 12, 20)
    torch.testing.assert_close(InstanceNorm(16)(x), nn.InstanceNorm2d(16)(x), atol=1e-5, rtol=1e-5)
    nhwc = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(InstanceNorm(16)(nhwc), nn.InstanceNorm2d(16)(x), atol=1e-5, rtol=1e-5)


def test_crops_drawn_up_front_are_the_crops_each_step_would_draw(shared_models, tiny_settings):
    from clipstyle.augment import random_crop_grids

    settings = tiny_settings.replace(steps=3, crops=5)
    content = torch.rand(1, 3, 24, 32)
    pair = _Pair(0, content, "fire", 9, shared_models, settings, None)
    generator = torch.Generator().manual_seed(9)
    for step in range(3):
        expected = random_crop_grids(24, 32, 5, settings.crop_size, 32, settings.distortion, generator)
        got = pair.crops(step, 32)
        torch.testing.assert_close(got.grid, expected.grid)
        assert torch.equal(got.mask, expected.mask)


def test_memory_format_does_not_change_the_result(shared_models, tiny_settings):
    # One step: Adam's first updates are nearly sign steps, which turn rounding
    # differences into visible ones within a few steps (on these tiny random
    # models an input change of 1e-6 moves the output by 0.02 after 4 steps),
    # so only the first step can be compared to rounding.
    content = torch.rand(1, 3, 24, 32, generator=torch.Generator().manual_seed(2))
    out = {}
    for fmt in ("contiguous", "channels_last"):
        (r,) = stylize_many([content], ["fire"], [4], models=shared_models,
                            settings=tiny_settings.replace(memory_format=fmt, steps=1))
        out[fmt] = r
    torch.testing.assert_close(out["channels_last"].tensor, out["contiguous"].tensor, atol=1e-4, rtol=0)
    for name, value in out["contiguous"].losses.items():
        assert out["channels_last"].losses[name] == pytest.approx(value, rel=1e-4, abs=1e-6)
    shared_models.vgg.use_channels_last(False)


def test_step_seconds_leave_out_the_callbacks_time(shared_models, tiny_settings):
    infos = []
    stylize_many([torch.rand(1, 3, 32, 32)], ["fire"], [1], models=shared_models, settings=tiny_settings,
                 callback=infos.append)
    assert [i.step for i in infos] == list(range(1, tiny_settings.steps + 1))
    assert all(i.step_seconds > 0 for i in infos)
    # seconds since the start include every step; the steps alone cannot exceed them
    assert sum(i.step_seconds for i in infos) <= infos[-1].seconds + 1e-9


def test_run_bench_reports_step_floor_ratio_baseline_and_batch(shared_models, tiny_settings):
    settings = tiny_settings.replace(size=32, crops=3, crop_size=16, steps=50)
    r = B.run_bench(shared_models, settings, batch=2, warmup=1, repeats=2, baseline=True)
    assert r.device == "cpu" and r.processor and r.threads == 1
    assert r.precision == "fp32" and r.memory_format == "channels_last"
    assert r.size == (32, 32) and r.crops == 3 and r.batch == 2 and r.steps == 50
    assert len(r.step_runs) == len(r.floor_runs) == len(r.baseline_runs) == 2
    assert r.seconds_per_step > 0 and r.floor_seconds > 0
    assert r.ratio == pytest.approx(r.seconds_per_step / r.floor_seconds)
    assert r.speedup == pytest.approx(r.baseline_seconds / r.seconds_per_step)
    assert r.images_per_minute == pytest.approx(60 * 2 / (r.seconds_per_step * 50))
    assert r.batch1 is not None and r.batch1["seconds_per_step"] > 0
    assert r.peak_memory_kind == "process" and r.peak_memory_bytes > 0
    data = json.loads(json.dumps(r.to_dict()))
    assert data["ratio"] == pytest.approx(r.ratio)
    shared_models.vgg.use_channels_last(False)


def test_floor_uses_a_contiguous_vgg_and_needs_no_weight_gradients(shared_models):
    shared_models.vgg.use_channels_last(True)
    floor = B.Floor(shared_models, 3, (1, 3, 32, 32))
    assert not floor.vgg.channels_last and floor.vgg.features[0].weight.is_contiguous()
    floor.clip_pass()
    floor.vgg_pass()
    assert all(p.grad is None for p in shared_models.clip.parameters())
    assert all(p.grad is None for p in floor.vgg.parameters())
    shared_models.vgg.use_channels_last(False)


def test_bench_command_prints_json(shared_models, monkeypatch):
    from click.testing import CliRunner

    from clipstyle.cli import cli

    monkeypatch.setattr(B, "bench_models", lambda device, clip_model="ViT-B-32": shared_models)
    args = ["bench", "--size", "32", "--crops", "2", "--crop-size", "16", "--repeats", "1", "--warmup", "0",
            "--device", "cpu", "--threads", "1", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["crops"] == 2 and data["size"] == [32, 32] and data["ratio"] > 0
    text = CliRunner().invoke(cli, args[:-1])
    assert text.exit_code == 0 and "x floor" in text.output
    shared_models.vgg.use_channels_last(False)


def test_bench_command_refuses_half_a_pair_of_weight_files(tmp_path):
    from click.testing import CliRunner

    from clipstyle.cli import cli

    weights = tmp_path / "clip.pt"
    weights.write_bytes(b"")
    result = CliRunner().invoke(cli, ["bench", "--clip-weights", str(weights)])
    assert result.exit_code == 2 and "go together" in result.output


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_script_is_valid_bash():
    script = ROOT / "benchmarks" / "gpu.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0


def test_bench_cached_refuses_to_download_and_names_what_is_missing(monkeypatch, tmp_path):
    import huggingface_hub.constants
    from click.testing import CliRunner

    from clipstyle.cli import cli

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    result = CliRunner().invoke(cli, ["bench", "--cached", "--device", "cpu"])
    assert result.exit_code == 1
    assert "CLIP ViT-B-32/openai and VGG-19 not in the cache" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_bench_cached_times_loading_from_warm_caches(checkpoints, monkeypatch, tmp_path):  # noqa: F811
    import huggingface_hub.constants
    import open_clip
    from click.testing import CliRunner

    from clipstyle.cli import cli

    repo = open_clip.get_pretrained_cfg("ViT-B-32", "openai")["hf_hub"].strip("/")
    hub_cache(tmp_path / "hub", repo, "open_clip_pytorch_model.bin", checkpoints.clip)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    shutil.copyfile(checkpoints.vgg, tmp_path / "torch" / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    args = ["bench", "--cached", "--size", "32", "--crops", "1", "--crop-size", "16", "--repeats", "1",
            "--warmup", "0", "--device", "cpu", "--threads", "1", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["load_from"] == "caches" and data["load_seconds"] > 0 and data["import_seconds"] >= 0


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
    shared_models.vgg.use_channels_last(False)


def test_bench_command_refuses_a_bad_forced_rejection_rate():
    from clipstyle.cli.bench import bench

    for bad in ("0.5,x", "1.5"):
        result = CliRunner().invoke(bench, ["--force-reject", bad, "--device", "cpu"])
        assert result.exit_code == 2 and "--force-reject" in result.output
