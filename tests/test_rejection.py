"""The two-pass CLIP path (clipstyle.method.rejection): the single pass's gradient, for less work."""

from __future__ import annotations

import pytest
import torch

from clipstyle.method import rejection as R
from clipstyle.method.loop import stylize_many
from clipstyle.method.rejection import Rejection

from conftest import DEVICE, records, tiny_models


def content(seed: int, height: int = 24, width: int = 32) -> torch.Tensor:
    return torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def shared_models():
    return tiny_models()


@pytest.fixture(scope="module")
def fast():
    from clipstyle.config import Settings
    from clipstyle.prompts import NO_TEMPLATES

    # fp32 on every device (auto is bf16 on CUDA): the two paths are pinned to
    # rounding; how bf16 follows fp32 is tests/test_precision.py's.
    return Settings(steps=2, size=32, crops=6, crop_size=16, templates=NO_TEMPLATES, log_every=1, precision="fp32")


PAIRS = ([content(0), content(1, 32, 24)], ["fire", "ice"], [7, 8])


def first_gradients(models, settings, rejection, monkeypatch, pairs=PAIRS):
    """Each pair's first U-Net gradient (all parameters flattened), the results and every StepInfo."""
    grads = []

    class Recording(torch.optim.Adam):
        def step(self, closure=None):
            if len(grads) < len(pairs[0]):
                grads.append(torch.cat([p.grad.flatten() for g in self.param_groups for p in g["params"]]))
            return super().step(closure)

    infos = []
    with monkeypatch.context() as m:
        m.setattr(torch.optim, "Adam", Recording)
        results = stylize_many(*pairs, models=models, settings=settings, callback=infos.append, rejection=rejection)
    assert all(r.error is None for r in results)
    return grads, results, infos


def assert_same_gradient(a: torch.Tensor, b: torch.Tensor) -> None:
    scale = a.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(a, b, atol=1e-5 * scale, rtol=1e-4)


# The tiny random CLIP scores patches between about 0.8 and 1 (1 - cos): a
# threshold of 0.96 rejects some of them and keeps others; 0 rejects none.
@pytest.mark.device
@pytest.mark.parametrize("threshold,crop_batch", [(0.96, 0), (0.96, 5), (0.0, 0)])
def test_two_passes_give_the_single_pass_gradient(shared_models, fast, monkeypatch, threshold, crop_batch):
    settings = fast.replace(threshold=threshold, crop_batch=crop_batch)
    single, res_single, infos_single = first_gradients(shared_models, settings, Rejection("single"), monkeypatch)
    two, res_two, infos_two = first_gradients(shared_models, settings, Rejection("two"), monkeypatch)
    assert not any(i.two_pass for i in infos_single) and all(i.two_pass for i in infos_two)
    first_rejected = [i.rejected for i in infos_single if i.step == 1]
    if threshold == 0.0:
        assert first_rejected == [0.0, 0.0]
    else:  # some patches rejected and some kept
        assert 0.0 < sum(first_rejected) < len(first_rejected)
    assert [i.rejected for i in infos_two] == pytest.approx([i.rejected for i in infos_single])
    for a, b in zip(single, two):
        assert_same_gradient(a, b)
    for a, b in zip(res_single, res_two):
        assert a.losses == pytest.approx(b.losses, rel=1e-4)
        assert a.rejected_fraction == pytest.approx(b.rejected_fraction)


@pytest.mark.device
def test_forced_rejection_is_the_same_on_both_paths_and_counts_the_first_crops(shared_models, fast, monkeypatch):
    rates = {}
    for path in ("single", "two"):
        grads, results, infos = first_gradients(shared_models, fast, Rejection(path, force=0.5), monkeypatch)
        rates[path] = grads
        assert {i.rejected for i in infos} == {0.5}  # 3 of 6 crops, every step, both pairs
        assert all(r.rejected_fraction == 0.5 for r in results)
    for a, b in zip(rates["single"], rates["two"]):
        assert_same_gradient(a, b)
    mask = Rejection(force=0.5).rejected(torch.zeros(5), torch.tensor([-1, 0, 1, 2, 3]), 4, 0.7)
    assert mask.tolist() == [False, True, True, False, False]


@pytest.mark.device
def test_the_whole_image_row_is_never_rejected(shared_models, fast, monkeypatch):
    """Every patch rejected (threshold above any loss, or forced): the global term still pulls."""
    for rejection, threshold in (
        (Rejection("single"), 1.999),
        (Rejection("two"), 1.999),
        (Rejection("two", force=1.0), fast.threshold),
    ):
        grads, results, infos = first_gradients(
            shared_models, fast.replace(threshold=threshold), rejection, monkeypatch
        )
        assert {i.rejected for i in infos} == {1.0}
        for g, r in zip(grads, results):
            assert r.losses["patch"] == 0.0 and r.losses["dir"] > 0.0
            assert g.abs().max() > 0
    mask = Rejection().rejected(torch.zeros(2), torch.tensor([-1, 0]), 1, 0.7)
    assert mask.tolist() == [False, True]


@pytest.mark.device
def test_auto_is_byte_identical_to_the_single_pass_when_it_keeps_it(shared_models, fast):
    """Nothing rejected: auto never takes the two-pass path, and the result is the same to the bit."""
    # On CUDA the backward passes of grid_sample (the crops) and of the bicubic
    # resize add with atomics, in no fixed order: the bits may differ there.
    settings = fast.replace(steps=3)
    single = stylize_many(*PAIRS, models=shared_models, settings=settings, rejection=Rejection("single"))
    infos = []
    auto = stylize_many(*PAIRS, models=shared_models, settings=settings, callback=infos.append)
    assert not any(i.two_pass for i in infos)
    for a, b in zip(single, auto):
        assert torch.equal(a.tensor, b.tensor) and a.losses == b.losses


@pytest.mark.device
def test_auto_takes_the_two_pass_path_from_the_rejected_fraction_of_the_step_before(shared_models, fast):
    settings = fast.replace(steps=4)
    # the cost model was measured on CPUs: elsewhere auto keeps the single pass (PathChooser)
    mostly_rejected = [False, True, True, True] if DEVICE.type == "cpu" else [False] * 4
    for rate, expected in ((0.0, [False] * 4), (0.3, [False] * 4), (0.9, mostly_rejected)):
        infos = []
        stylize_many(
            *PAIRS, models=shared_models, settings=settings, callback=infos.append, rejection=Rejection(force=rate)
        )
        assert [i.two_pass for i in infos if i.pair == 0] == expected


def test_the_cost_model_breaks_even_at_the_no_grad_cost_and_counts_chunks():
    # 64 crops + 1 whole image in one chunk: two-pass pays once more than NO_GRAD_COST of the crops is rejected
    assert not R.two_pass_cheaper(0.0, 64, 1, 0)
    assert not R.two_pass_cheaper(R.NO_GRAD_COST - 0.05, 64, 1, 0)
    assert R.two_pass_cheaper(R.NO_GRAD_COST + 0.05, 64, 1, 0)
    assert R.two_pass_cheaper(0.9, 64, 1, 0)
    # chunks add a fixed cost each: 9 rows in chunks of 1 cost more than in one chunk
    assert R.rows_cost(9, 1) > R.rows_cost(9, 0) == R.rows_cost(9, 9)
    assert R.rows_cost(0, 4) == 0.0


def test_auto_keeps_the_single_pass_where_the_cost_was_not_measured():
    chooser = R.PathChooser(Rejection(), torch.device("meta"), 0)
    chooser.observe(60, 64)
    assert not chooser.two_pass(1, 1, 64)
    cpu = R.PathChooser(Rejection(), torch.device("cpu"), 0)
    assert not cpu.two_pass(0, 1, 64)  # nothing known yet
    cpu.observe(60, 64)
    assert cpu.two_pass(1, 1, 64)


def test_rejection_refuses_unknown_paths_and_rates():
    with pytest.raises(ValueError):
        Rejection("fast")
    with pytest.raises(ValueError):
        Rejection(force=1.5)
    assert Rejection(("single", "auto")).path_at(3) == "auto"


def test_run_report_records_the_mean_rejected_fraction(tmp_path, photo, monkeypatch):

    import conftest

    conftest.counting_loader(monkeypatch)
    report = tmp_path / "r.jsonl"
    result = conftest.invoke(
        "run",
        "-p",
        "fire",
        str(photo),
        "-o",
        str(tmp_path / "o.png"),
        "--report",
        str(report),
        "--size",
        "32",
        "--steps",
        "2",
        "--crops",
        "4",
        "--crop-size",
        "16",
        "--no-templates",
        "--threshold",
        "1.999",
        "-q",
    )
    assert result.exit_code == 0, result.output
    (record,) = records(report)
    assert record["rejected_fraction"] == 1.0
