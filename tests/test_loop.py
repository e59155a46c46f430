"""The optimisation loop on tiny CLIP and VGG stand-ins (random weights, real classes).

Every test runs on CLIPSTYLE_TEST_DEVICE (marker ``device``); inputs are made on
the CPU and the loop moves them, results come back on the CPU."""

from __future__ import annotations

import time

import pytest
import torch

from clipstyle.method import loop as S
from clipstyle.method.loop import LOSS_NAMES, _PairState, make_network, stylize_many
from clipstyle.method.stylize import stylize

from conftest import DEVICE

pytestmark = pytest.mark.device


def content(seed: int, height: int = 24, width: int = 32) -> torch.Tensor:
    return torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def fast():
    from clipstyle.config import Settings
    from clipstyle.prompts import NO_TEMPLATES

    # fp32 on every device (auto is bf16 on CUDA): these tests pin batching and
    # chunking to rounding; how bf16 follows fp32 is tests/test_precision.py's.
    return Settings(steps=2, size=32, crops=2, crop_size=16, templates=NO_TEMPLATES, log_every=2, precision="fp32")


PAIRS = ([content(0), content(1, 32, 24)], ["fire", "ice"], [7, 8])  # two shapes: VGG runs per shape group


class RecordingAdam(torch.optim.Adam):
    """Adam that keeps the gradient of its first step, all parameters flattened."""

    made: list[RecordingAdam] = []

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.first_grad = None
        RecordingAdam.made.append(self)

    def step(self, closure=None):
        if self.first_grad is None:
            self.first_grad = torch.cat([p.grad.flatten() for g in self.param_groups for p in g["params"]])
        return super().step(closure)


@pytest.fixture(scope="module")
def batched(shared_models, fast):
    """Two pairs optimised together, each pair alone, and both again with crops encoded in chunks.

    Besides the results, the networks built (by seed) and each network's
    first gradient: several steps of Adam amplify rounding (it scales tiny
    gradients of either sign up to full steps), so results are compared
    loosely and the first gradients tightly.
    """
    made = []
    real_net, real_adam = S.make_network, torch.optim.Adam

    def spy(seed, device):
        made.append(seed)
        return real_net(seed, device)

    S.make_network, torch.optim.Adam = spy, RecordingAdam
    RecordingAdam.made = []
    try:
        together = stylize_many(*PAIRS, models=shared_models, settings=fast)
        alone = [stylize_many([c], [p], [s], models=shared_models, settings=fast)[0] for c, p, s in zip(*PAIRS)]
        # 2 crops per pair in chunks of 2 rows: one chunk holds rows of both pairs
        chunked = stylize_many(*PAIRS, models=shared_models, settings=fast.replace(crop_batch=2))
    finally:
        S.make_network, torch.optim.Adam = real_net, real_adam
    grads = [opt.first_grad for opt in RecordingAdam.made]
    return {
        "together": together,
        "alone": alone,
        "chunked": chunked,
        "made": made,
        "grads": {"together": grads[0:2], "alone": grads[2:4], "chunked": grads[4:6]},
    }


def assert_same_gradient(a: torch.Tensor, b: torch.Tensor) -> None:
    scale = a.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(a, b, atol=1e-4 * scale, rtol=1e-3)


def test_runs_exactly_steps_steps_and_reports_losses_every_log_every(shared_models, fast):
    settings = fast.replace(steps=3, log_every=2)
    infos = []
    (result,) = stylize_many(
        [content(0)], ["fire"], [1], models=shared_models, settings=settings, callback=infos.append
    )
    assert [i.step for i in infos] == [1, 2, 3]
    assert all(i.steps == 3 and i.pair == 0 for i in infos)
    # losses are read back every log_every steps and at the last step only
    assert [i.step for i in infos if i.losses is not None] == [2, 3]
    assert set(infos[-1].losses) == set(LOSS_NAMES)
    assert all(torch.isfinite(torch.tensor(list(infos[-1].losses.values()))))
    assert infos[-1].output.shape == (1, 3, 24, 32)
    assert result.error is None and result.steps == 3 and result.size == (32, 24)
    assert result.losses == infos[-1].losses
    assert result.tensor.shape == (1, 3, 24, 32) and result.image.size == (32, 24)
    assert infos[-1].output.device.type == DEVICE.type  # the callback's output stays on the device
    torch.testing.assert_close(result.tensor, infos[-1].output.cpu())
    s = result.losses
    total = (
        settings.lambda_patch * s["patch"]
        + settings.lambda_dir * s["dir"]
        + settings.lambda_content * s["content"]
        + settings.lambda_tv * s["tv"]
    )
    assert s["total"] == pytest.approx(total, rel=1e-4)


def test_lr_is_halved_at_the_middle_of_the_run(shared_models, fast, monkeypatch):
    seen: list[float] = []

    class SpyAdam(torch.optim.Adam):
        def step(self, closure=None):
            seen.append(self.param_groups[0]["lr"])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "Adam", SpyAdam)
    lr = 1e-3
    stylize_many([content(0)], ["fire"], [1], models=shared_models, settings=fast.replace(steps=5, lr=lr, crops=1))
    # the paper: halved at step 100 of 200; the last step's image is the output,
    # so its update (never seen) is not made
    assert seen == [lr, lr, lr / 2, lr / 2]


def test_make_network_depends_only_on_the_seed():
    a, b, c = make_network(3, DEVICE), make_network(3, DEVICE), make_network(4, str(DEVICE))
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.state_dict().values(), c.state_dict().values()))
    # and it neither reads nor advances the global random state (the CPU's, nor the device's)
    torch.manual_seed(123)
    expected = torch.rand(3), torch.rand(3, device=DEVICE)
    torch.manual_seed(123)
    make_network(5, DEVICE)
    assert torch.equal(torch.rand(3), expected[0])
    assert torch.equal(torch.rand(3, device=DEVICE), expected[1])


def test_every_pair_gets_a_fresh_network(batched):
    # one network per pair, from the pair's seed, in every call
    assert batched["made"] == [7, 8, 7, 8, 7, 8]
    together = batched["together"]
    assert together[0].network is not together[1].network


def test_pairs_batched_together_equal_each_pair_alone(batched):
    for i, (together, alone) in enumerate(zip(batched["together"], batched["alone"])):
        assert_same_gradient(batched["grads"]["together"][i], batched["grads"]["alone"][i])
        assert together.size == alone.size
        torch.testing.assert_close(together.tensor, alone.tensor, atol=0.02, rtol=0)
        a = torch.tensor(list(together.image.tobytes()), dtype=torch.int16)
        b = torch.tensor(list(alone.image.tobytes()), dtype=torch.int16)
        assert (a - b).abs().float().mean() < 0.5  # the same 8-bit image up to rounding
        for name in LOSS_NAMES:
            assert together.losses[name] == pytest.approx(alone.losses[name], rel=1e-2, abs=1e-5)


def test_encoding_crops_in_chunks_gives_the_same_result(batched):
    for i, (whole, chunked) in enumerate(zip(batched["together"], batched["chunked"])):
        assert_same_gradient(batched["grads"]["together"][i], batched["grads"]["chunked"][i])
        torch.testing.assert_close(whole.tensor, chunked.tensor, atol=0.02, rtol=0)
        for name in LOSS_NAMES:
            assert whole.losses[name] == pytest.approx(chunked.losses[name], rel=1e-2, abs=1e-5)


def test_the_loss_gradient_reaches_every_weight_of_the_network(batched):
    before = make_network(7, DEVICE).state_dict()
    after = batched["together"][0].network.state_dict()
    unchanged = [k for k in before if k.endswith("weight") and torch.equal(before[k], after[k])]
    assert unchanged == []


def test_the_returned_network_is_the_one_that_made_the_returned_image(batched):
    # the image is the last step's output; a saved style must reproduce it, so the
    # network must not have taken an Adam step after making it
    for result, (image, _, _) in zip(batched["together"], zip(*PAIRS)):
        with torch.no_grad():
            again = result.network(image.to(DEVICE)).cpu()
        torch.testing.assert_close(again, result.tensor, atol=1e-6, rtol=0)


def test_stylize_keeps_the_aspect_ratio_and_refuses_an_empty_prompt(shared_models, fast, photo):
    from clipstyle.errors import ClipstyleError

    result = stylize(photo, "fire", models=shared_models, settings=fast.replace(steps=1, crops=1), seed=1)
    assert result.image.size == (32, 24)  # 48x32 photo, longest side 32, multiples of 8
    with pytest.raises(ClipstyleError, match="empty"):
        stylize(photo, "  ", models=shared_models, settings=fast)


def test_crops_drawn_up_front_are_the_crops_each_step_would_draw(shared_models, tiny_settings):
    from clipstyle.method.augment import random_crop_grids

    settings = tiny_settings.replace(steps=3, crops=5)
    content = torch.rand(1, 3, 24, 32)
    pair = _PairState(0, content, "fire", 9, shared_models, shared_models.vgg, settings, None)
    generator = torch.Generator().manual_seed(9)
    for step in range(3):
        # the same draws (CPU generator) turned into grids on the loop's device
        expected = random_crop_grids(24, 32, 5, settings.crop_size, 32, settings.distortion, generator, DEVICE)
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
        (r,) = stylize_many(
            [content], ["fire"], [4], models=shared_models, settings=tiny_settings.replace(memory_format=fmt, steps=1)
        )
        out[fmt] = r
    torch.testing.assert_close(out["channels_last"].tensor, out["contiguous"].tensor, atol=1e-4, rtol=0)
    for name, value in out["contiguous"].losses.items():
        assert out["channels_last"].losses[name] == pytest.approx(value, rel=1e-4, abs=1e-6)


def test_step_seconds_leave_out_the_callbacks_time(shared_models, tiny_settings):
    pause = 0.05
    infos = []

    def slow_callback(info):
        infos.append(info)
        time.sleep(pause)  # a progress bar or a snapshot that takes its time

    stylize_many(
        [torch.rand(1, 3, 32, 32)], ["fire"], [1], models=shared_models, settings=tiny_settings, callback=slow_callback
    )
    assert [i.step for i in infos] == list(range(1, tiny_settings.steps + 1))
    assert all(i.step_seconds > 0 for i in infos)
    # seconds since the start include the callbacks of every step before the last;
    # the steps' own times must leave them out
    callbacks = pause * (len(infos) - 1)
    assert sum(i.step_seconds for i in infos) <= infos[-1].seconds - callbacks + 1e-3


def test_seconds_per_step_are_timed_over_the_stretches_between_loss_reads():
    from clipstyle.method.loop import _seconds_per_step

    # log_every 3: on a GPU the host runs ahead for two steps and the read waits
    # for all three; the first stretch is slow (warm-up). Per step: 1.1 s.
    times = [5.0, 5.0, 5.0, 0.1, 0.1, 3.1, 0.1, 0.1, 3.1, 0.2, 0.2, 2.9]
    assert _seconds_per_step(times, 3) == pytest.approx(1.1)
    assert _seconds_per_step([2.0, 4.0], 10) == pytest.approx(3.0)  # fewer steps than log_every: their mean
    assert _seconds_per_step([], 10) == 0.0
