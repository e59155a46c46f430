"""Precision: autocast for the frozen encoders only, and bf16 training that follows fp32's."""

from __future__ import annotations

import pytest
import torch

from clipstyle.device import autocast_dtype, use_channels_last
from clipstyle.stylize import stylize_many

from conftest import tiny_models

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models are many small ops: one thread avoids waiting for a second,
    # busy core at each of them (ten times faster on a loaded 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_auto_is_fp32_on_the_cpu_and_explicit_choices_are_kept():
    assert autocast_dtype("auto", CPU) is None
    assert autocast_dtype("fp32", CPU) is None
    assert autocast_dtype("bf16", CPU) is torch.bfloat16
    assert autocast_dtype("fp16", CPU) is torch.float16
    assert autocast_dtype("fp32", torch.device("cuda")) is None


def test_channels_last_auto_decision():
    assert use_channels_last("auto", CPU, None)
    assert not use_channels_last("contiguous", CPU, None)
    assert use_channels_last("channels_last", torch.device("mps"), None)
    cuda = torch.device("cuda")
    assert use_channels_last("auto", cuda, torch.bfloat16) and not use_channels_last("auto", cuda, None)


def _run(models, settings, precision, callback=None):
    content = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    return stylize_many([content], ["fire"], [5], models=models, settings=settings.replace(precision=precision),
                        callback=callback)[0]


def test_autocast_covers_clip_and_vgg_only(tiny_settings):
    models = tiny_models()
    seen: dict[str, set] = {"clip": set(), "vgg": set(), "unet": set()}
    encode = models.clip.encode_image
    vgg_forward = models.vgg.forward

    def spy_clip(x):
        out = encode(x)
        seen["clip"].add(out.dtype)
        return out

    def spy_vgg(x):
        out = vgg_forward(x)
        seen["vgg"].update(f.dtype for f in out.values())
        return out

    models.clip.encode_image = spy_clip
    models.vgg.forward = spy_vgg
    outputs = []
    result = _run(models, tiny_settings, "bf16", callback=lambda info: outputs.append(info.output))
    assert seen["clip"] == {torch.bfloat16} and seen["vgg"] == {torch.bfloat16}
    # the U-Net, its optimiser state and its output stay fp32
    assert {o.dtype for o in outputs} == {torch.float32}
    assert all(p.dtype == torch.float32 for p in result.network.parameters())
    assert result.precision == "bf16" and result.tensor.dtype == torch.float32


def test_bf16_loss_curves_stay_close_to_fp32(tiny_settings):
    # Same pair, same seed, same crops: only the encoders' precision differs.
    # bf16 keeps 8 bits of mantissa, so per-step losses agree to a few percent
    # while the optimisation follows the same path.
    models = tiny_models()
    settings = tiny_settings.replace(steps=8, log_every=1, crops=4)
    curves = {}
    for precision in ("fp32", "bf16"):
        steps = []
        _run(models, settings, precision, callback=lambda info: steps.append(info.losses))
        curves[precision] = steps
    assert len(curves["fp32"]) == len(curves["bf16"]) == 8
    for a, b in zip(curves["fp32"], curves["bf16"]):
        assert b["total"] == pytest.approx(a["total"], rel=0.05)
        assert b["content"] == pytest.approx(a["content"], rel=0.05, abs=1e-4)
        assert b["tv"] == pytest.approx(a["tv"], rel=0.05)
    # and the run actually optimises: the total loss falls in both
    for precision, steps in curves.items():
        assert steps[-1]["total"] < steps[0]["total"], precision
