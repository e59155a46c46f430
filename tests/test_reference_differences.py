"""The decisions about the remaining differences from the reference code
(README, "Where clipstyle differs"; measured in docs/reference-differences.md)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

from clipstyle.method.loop import stylize_many

from conftest import DEVICE, invoke, tiny_clip, tiny_models


@pytest.mark.device
def test_clip_view_is_bicubic_without_antialiasing_as_in_the_reference():
    clip = tiny_clip().to(DEVICE)  # 32 x 32 input
    clip.fast = False  # open_clip's own forward: only the resize is under test
    images = torch.rand(2, 3, 96, 80, generator=torch.Generator().manual_seed(0)).to(DEVICE)  # a downscale, squashed
    reference = F.interpolate(images, size=(32, 32), mode="bicubic", align_corners=False)
    assert torch.equal(clip.resize(images), reference)
    antialiased = F.interpolate(images, size=(32, 32), mode="bicubic", align_corners=False, antialias=True)
    assert (reference - antialiased).abs().max() > 0.05  # the two kernels differ: the check can fail
    with torch.no_grad():
        expected = clip.model.encode_image((reference - clip.mean) / clip.std)
        torch.testing.assert_close(clip.encode_image(images), expected)


@pytest.mark.device
def test_the_output_has_seen_steps_minus_one_adam_updates(tiny_settings):
    updates: list[tuple[torch.optim.Optimizer, float]] = []

    def record(optimizer, args, kwargs):
        updates.append((optimizer, optimizer.param_groups[0]["lr"]))

    steps, lr = 9, 1e-3
    handle = register_optimizer_step_post_hook(record)
    try:
        (result,) = stylize_many(
            [torch.rand(1, 3, 32, 32)],
            ["fire"],
            [0],
            models=tiny_models(),
            settings=tiny_settings.replace(steps=steps, lr=lr),
        )
    finally:
        handle.remove()
    assert result.error is None
    # README: 200 steps are 199 updates, 100 at the rate and 99 at half (here 9 -> 4 + 4);
    # the update after the last image is not made.
    assert [rate for _, rate in updates] == [lr] * (steps // 2) + [lr / 2] * (steps - steps // 2 - 1)
    (optimizer,) = {opt for opt, _ in updates}
    assert {int(state["step"]) for state in optimizer.state.values()} == {steps - 1}


def test_random_init_models_use_the_activation_of_the_tags_weights():
    from open_clip.transformer import QuickGELU

    from clipstyle.models.loading import load_models

    models = load_models(device="cpu", random_init=True)  # ViT-B-32, tag openai: trained with QuickGELU
    model = models.clip.model
    blocks = [*model.visual.transformer.resblocks, *model.transformer.resblocks]
    assert len(blocks) == 24
    assert all(isinstance(block.mlp.gelu, QuickGELU) for block in blocks)
    assert models.info["clip_pretrained"] == "random"


def test_run_help_says_the_papers_figures_use_contrast():
    result = invoke("run", "--help")
    text = " ".join(result.output.split())  # click wraps the help
    contrast = text[text.index("--contrast") :]
    assert "The paper's figures use it" in contrast[:300]
