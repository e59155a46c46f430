"""Precision: autocast for the frozen encoders only, and bf16 training that follows fp32's."""

from __future__ import annotations

import pytest
import torch

from clipstyle.device import autocast_dtype, use_channels_last, wide_dtype
from clipstyle.method.loop import stylize_many

from conftest import DEVICE, tiny_models

CPU = torch.device("cpu")


def test_auto_is_fp32_on_the_cpu_and_explicit_choices_are_kept():
    assert autocast_dtype("auto", CPU) is None
    assert autocast_dtype("fp32", CPU) is None
    assert autocast_dtype("bf16", CPU) is torch.bfloat16
    assert autocast_dtype("fp16", CPU) is torch.float16
    assert autocast_dtype("fp32", torch.device("cuda")) is None


@pytest.mark.parametrize(
    "capability,dtype", [((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)]
)
def test_auto_on_cuda_is_bf16_only_where_the_card_computes_it(monkeypatch, capability, dtype):
    # Turing and Volta emulate bf16 (torch.cuda.is_bf16_supported() says yes): fp16 runs natively there.
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    assert autocast_dtype("auto", torch.device("cuda:1")) is dtype
    assert asked == [torch.device("cuda:1")]  # the card asked for, not the current one


def test_sums_are_float64_except_on_mps_which_has_none():
    assert wide_dtype(CPU) is torch.float64 and wide_dtype(torch.device("cuda")) is torch.float64
    assert wide_dtype(torch.device("mps")) is torch.float32


def test_channels_last_auto_decision():
    assert use_channels_last("auto", CPU, None)
    assert not use_channels_last("contiguous", CPU, None)
    assert use_channels_last("channels_last", torch.device("mps"), None)
    cuda = torch.device("cuda")
    assert use_channels_last("auto", cuda, torch.bfloat16) and not use_channels_last("auto", cuda, None)


def _run(models, settings, precision, callback=None):
    content = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    return stylize_many(
        [content], ["fire"], [5], models=models, settings=settings.replace(precision=precision), callback=callback
    )[0]


@pytest.mark.device
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


@pytest.mark.device
@pytest.mark.device
def test_text_embeddings_are_fp32_whatever_autocast_the_caller_runs():
    # They are cached per Models and shared by runs of every precision: a bf16
    # run first must not hand a later fp32 run its rounded embeddings.
    from clipstyle.method.text import text_embedding

    plain = text_embedding(tiny_models(), "fire", ("a {}",))
    models = tiny_models()
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        rounded_first = text_embedding(models, "fire", ("a {}",))
    assert rounded_first.dtype == torch.float32
    torch.testing.assert_close(rounded_first, plain, atol=0, rtol=0)


def test_bf16_loss_curves_stay_close_to_fp32(tiny_settings):
    # Same pair, same seed, same crops: only the encoders' precision differs.
    models = tiny_models()
    settings = tiny_settings.replace(steps=8, log_every=1, crops=4)
    curves = {}
    for precision in ("fp32", "bf16"):
        steps = []
        _run(models, settings, precision, callback=lambda info: steps.append(info.losses))
        curves[precision] = steps
    assert len(curves["fp32"]) == len(curves["bf16"]) == 8
    terms = ("content", "tv", "patch", "dir")
    # The first step scores the same image: bf16 keeps 8 bits of mantissa, so
    # every term agrees to about a percent.
    first32, first16 = curves["fp32"][0], curves["bf16"][0]
    for name in ("total", *terms):
        assert first16[name] == pytest.approx(first32[name], rel=0.02), name
    # Adam scales each gradient entry to a full step, so rounding sends the two
    # runs along slightly different paths: the total stays within 5 %, each
    # term within 15 % (the content term drifts most: it is a small share here).
    for a, b in zip(curves["fp32"], curves["bf16"]):
        assert b["total"] == pytest.approx(a["total"], rel=0.05)
        for name in terms:
            assert b[name] == pytest.approx(a[name], rel=0.15), name
    # and the run actually optimises: the total loss falls in both
    for precision, steps in curves.items():
        assert steps[-1]["total"] < steps[0]["total"], precision


@pytest.mark.device
@pytest.mark.parametrize("which", ["clip", "vgg"])
def test_bf16_gradients_point_where_fp32_gradients_point(which):
    # What the optimisation follows: the gradient reaching the U-Net's output.
    from clipstyle.method import losses as L

    models = tiny_models()
    g = torch.Generator().manual_seed(0)
    content = torch.rand(1, 3, 32, 32, generator=g)
    output = (content + 0.05 * torch.randn(1, 3, 32, 32, generator=g)).clamp(0, 1).to(DEVICE)
    content = content.to(DEVICE)
    with torch.no_grad():
        target = models.vgg(content)
        source = torch.nn.functional.normalize(models.clip.encode_image(content), dim=-1)
        direction = torch.nn.functional.normalize(torch.randn(1, source.shape[-1], generator=g), dim=-1).to(DEVICE)

    def gradient(precision):
        x = output.clone().requires_grad_()
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            if which == "vgg":
                feats = models.vgg(x)
            else:
                emb = models.clip.encode_image(x)
        if which == "vgg":
            loss = L.content_loss({k: v.float() for k, v in feats.items()}, target).sum()
        else:
            loss = L.directional_loss(emb.float(), source, direction).sum()
        loss.backward()
        return x.grad.flatten()

    fp32, bf16 = gradient("fp32"), gradient("bf16")
    # The content gradient is 2 (f - t): bf16's rounding of the features f is a
    # larger share of f - t when the output is near the content, so it points
    # less exactly than CLIP's (measured over seeds and distances: cosine
    # 0.93-0.99 for VGG, 0.99-1.0 for CLIP; docs/performance.md).
    assert torch.nn.functional.cosine_similarity(fp32, bf16, dim=0) > (0.98 if which == "clip" else 0.9)
    assert (bf16.norm() / fp32.norm()).item() == pytest.approx(1.0, rel=0.1)


def test_encoder_copies_in_precision_are_made_once_and_compute_what_autocast_computes():
    """bf16 copies of CLIP's image tower and VGG-19: made once per encoder, dtype and device;
    autocast's weights stored in bf16, the rest fp32; under autocast, the same outputs."""
    from clipstyle.method import loop as S

    models = tiny_models(device=CPU)
    bf16 = torch.bfloat16
    clip, vgg = S._in_precision(models.clip, bf16, CPU), S._in_precision(models.vgg, bf16, CPU)
    assert S._in_precision(models.clip, bf16, CPU) is clip and S._in_precision(models.vgg, bf16, CPU) is vgg
    assert S._in_precision(models.clip, None, CPU) is models.clip
    visual = clip.model.visual
    assert visual.conv1.weight.dtype == bf16 and visual.proj.dtype == bf16
    block = visual.transformer.resblocks[0]
    assert block.attn.in_proj_weight.dtype == bf16 and block.mlp.c_fc.weight.dtype == bf16
    assert block.ln_1.weight.dtype == torch.float32 and visual.ln_post.weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in models.clip.parameters())  # the shared models are untouched
    assert clip.model.transformer is models.clip.model.transformer  # the text tower is shared, not copied
    assert all(p.dtype == bf16 for p in vgg.features.parameters())
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)).requires_grad_()
    with torch.autocast("cpu", dtype=bf16):
        assert torch.equal(clip.encode_image(x), models.clip.encode_image(x))
        ours, theirs = vgg(x), models.vgg(x)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_bf16_step_casts_no_frozen_weight_and_trains_the_unet_in_fp32(tiny_settings):
    """Inside a step no weight of the frozen encoders is cast (each was, every step, before
    the copies); the U-Net, its gradients and Adam stay fp32."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from clipstyle.method import loop as S

    models = tiny_models(device=CPU)
    bf16 = torch.bfloat16
    encoders = [models.clip, models.vgg, S._vgg_for(models, True)]
    encoders += [S._in_precision(e, bf16, CPU) for e in encoders]
    weights = {p.data_ptr() for e in encoders for p in e.parameters()}

    class Casts(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in weights:
                Casts.count += 1
            return func(*args, **(kwargs or {}))

    content = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    result = stylize_many(
        [content], ["fire"], [5], models=models, settings=tiny_settings.replace(precision="bf16"), watch=Casts()
    )[0]
    assert result.precision == "bf16" and result.error is None
    assert Casts.count == 0
    assert all(p.dtype == torch.float32 for p in result.network.parameters())
