"""What a step asks of the host (clipstyle.method.counting) and the graph path (--cuda-graph), on the CPU.

The accelerator's code path (``host_reads=False``, and the graph path, which
never reads) runs on the CPU here: the same operators as on a GPU, counted
and guarded by a TorchDispatchMode. Recording a CUDA graph needs a card; its
fallback is tested with the recording stubbed to fail.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from clipstyle.config import Settings
from clipstyle.errors import ClipstyleError
from clipstyle.method import loop as S
from clipstyle.method.counting import HostReadError, HostReadGuard, OpCounter, OpCounts
from clipstyle.method.loop import stylize_many
from clipstyle.method.rejection import Rejection
from clipstyle.prompts import NO_TEMPLATES

from conftest import DEVICE, TINY_32, counting_loader, invoke

# Upper bounds of one steady step of the accelerator's path (tiny models: one
# ViT block; one pair, 4 crops), measured 930 calls and 510 launches on
# 2026-12-05: lower them when a change removes operators, never raise them
# without saying why in docs/performance.md ("Operators per step").
MAX_CALLS = 940
MAX_LAUNCHES = 515


def photo(seed: int, height: int = 32, width: int = 32) -> torch.Tensor:
    return torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def settings():
    return Settings(steps=5, size=32, crops=4, crop_size=16, templates=NO_TEMPLATES, log_every=2, precision="fp32")


def run(models, settings, n_pairs=1, **kwargs):
    contents = [photo(i, 32, 24 + 8 * i) for i in range(n_pairs)]
    return stylize_many(
        contents, ["fire", "ice"][:n_pairs], [3, 4][:n_pairs], models=models, settings=settings, **kwargs
    )


def test_the_counter_tells_views_kernels_and_host_reads_apart():
    x = torch.rand(4, 3)
    counter = OpCounter()
    with counter:
        x.view(12)
        x.t()
        x.detach()
    with counter:
        y = x + 1
        y.sum()
    with counter:
        float(x[0, 0])
        x[x > 0.5]
        torch.nonzero(x)
        torch.repeat_interleave(torch.tensor([1, 2]))
    views, kernels, reads = counter.steps
    assert views.launches == 0 and views.host_reads == 0 and views.calls >= 3
    assert kernels.launches == kernels.calls == 2 and kernels.host_reads == 0
    assert reads.host_reads == 4


def test_accelerator_step_operators_are_pinned(shared_models, settings):
    counter = OpCounter()
    run(shared_models, settings, host_reads=False, watch=counter)
    assert len(counter.steps) == settings.steps
    steady = counter.steps[1:-1]  # the first makes Adam's state; the last skips Adam
    for counts in steady:
        assert counts.calls <= MAX_CALLS and counts.launches <= MAX_LAUNCHES
        assert counts.host_reads == 0
        assert 0 < counts.launches < counts.calls
    # the graph path's step function, run eagerly here, dispatches the same operators
    graph = OpCounter()
    with pytest.warns(RuntimeWarning, match="CUDA graphs need a CUDA device"):
        run(shared_models, settings.replace(cuda_graph=True), watch=graph)
    for counts in graph.steps[1:-1]:
        assert counts.calls <= MAX_CALLS + 6 and counts.host_reads == 0  # + the step counter and learning rate


@pytest.mark.parametrize(
    "how",
    [
        {"host_reads": False},
        {"host_reads": False, "rejection": Rejection(path="single", force=0.5)},
        {"cuda_graph": True},
    ],
    ids=["accelerator", "forced-rejection", "graph-path"],
)
def test_no_host_read_inside_a_step_of_the_accelerator_path(shared_models, settings, how):
    """The guard fails at any host read inside a step; the loss reads every log_every steps are outside it."""
    how = dict(how)
    s = settings.replace(cuda_graph=how.pop("cuda_graph", False))
    seen = []
    guard = HostReadGuard()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # graph path on the CPU: runs eagerly
        results = run(shared_models, s, n_pairs=2, watch=guard, callback=seen.append, **how)
    assert all(r.error is None for r in results)
    assert len(guard.steps) == s.steps and all(c.host_reads == 0 for c in guard.steps)
    reads = [i.step for i in seen if i.losses is not None and i.pair == 0]
    assert reads == [2, 4, 5]  # read every log_every steps and at the last, outside the steps


def test_the_guard_sees_the_cpu_paths_own_read(shared_models, settings):
    """On the CPU the loop reads the rejected count at every step (it chooses the next step's
    path): the guard must catch it, or it would catch nothing."""
    with pytest.raises(HostReadError, match="_local_scalar_dense"):
        run(shared_models, settings, watch=HostReadGuard())


def test_graph_path_run_eagerly_equals_the_loop_byte_for_byte(shared_models, settings):
    s = settings.replace(steps=6)  # the learning rate halves at step 3
    plain = run(shared_models, s, n_pairs=2)
    with pytest.warns(RuntimeWarning) as caught:
        graph = run(shared_models, s.replace(cuda_graph=True), n_pairs=2)
    assert len(caught) == 1
    for a, b in zip(plain, graph):
        assert torch.equal(a.tensor, b.tensor)
        assert a.losses == b.losses and torch.equal(a.tensor, b.tensor)
        assert a.rejected_fraction == b.rejected_fraction
        for (name, p), q in zip(a.network.state_dict().items(), b.network.state_dict().values()):
            assert torch.equal(p, q), name


def test_a_failed_recording_falls_back_with_one_warning(shared_models, settings, monkeypatch):
    """Recording stubbed to fail, as on a card or with an operator that cannot be recorded:
    one warning, and the run goes on eagerly with the same results."""
    plain = run(shared_models, settings, n_pairs=2)
    attempts = []

    def refuse(function, device, pool=None):
        attempts.append(device)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(S, "_can_capture", lambda device: True)
    monkeypatch.setattr(S, "_capture", refuse)
    with pytest.warns(RuntimeWarning) as caught:
        graph = run(shared_models, settings.replace(cuda_graph=True), n_pairs=2)
    assert len(caught) == 1 and "could not record the step as a CUDA graph" in str(caught[0].message)
    assert len(attempts) == 1  # tried once, after the warm-up steps
    for a, b in zip(plain, graph):
        assert a.error is None and b.error is None
        assert a.losses == b.losses and torch.equal(a.tensor, b.tensor)


def test_cuda_graph_setting_is_checked_and_recorded_only_when_on():
    with pytest.raises(ClipstyleError, match="--cuda-graph and --compile"):
        Settings(cuda_graph=True, compile="default")
    assert "cuda_graph" not in Settings().to_dict()  # off: outputs made before it existed stay as they were
    assert Settings(cuda_graph=True).to_dict()["cuda_graph"] is True


def test_run_cuda_graph_on_the_cpu_warns_once_in_our_format(tmp_path, photo, monkeypatch):
    counting_loader(monkeypatch, "run")
    result = invoke("run", photo, "-p", "fire", "-p", "ice", "-o", tmp_path / "out", *TINY_32, "--cuda-graph")
    assert result.exit_code == 0, result.output
    warned = [line for line in result.output.splitlines() if "CUDA graphs need a CUDA device" in line]
    assert len(warned) == 1 and warned[0].startswith("clipstyle: warning: ")
    assert len(list((tmp_path / "out").glob("*.png"))) == 2


def test_op_counts_are_json_ready():
    assert OpCounts(3, 2, 1).to_dict() == {"calls": 3, "launches": 2, "host_reads": 1}


@pytest.mark.device
@pytest.mark.skipif(DEVICE.type != "cuda", reason="records CUDA graphs: needs a card (benchmarks/gpu.sh runs it)")
def test_on_cuda_the_graph_path_records_and_follows_the_eager_loop(shared_models, settings):
    s = settings.replace(steps=6)
    eager = run(shared_models, s, n_pairs=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a recording that fails warns: here that fails the test
        graph = run(shared_models, s.replace(cuda_graph=True), n_pairs=2)
        again = run(shared_models, s.replace(cuda_graph=True), n_pairs=2)
    for a, b, c in zip(eager, graph, again):
        assert torch.equal(b.tensor, c.tensor)  # seeds repeat the run exactly on the same card
        assert torch.allclose(a.tensor, b.tensor, atol=1e-4)  # rounding: the learning rate is a float32 there
        assert b.losses == pytest.approx(a.losses, rel=1e-3)


def test_a_set_takes_the_eager_path_with_one_warning(shared_models, settings, monkeypatch):
    """A set draws each step's content on the host: recording it would freeze the first one."""
    recorded = []
    monkeypatch.setattr(S, "_can_capture", lambda device: True)
    monkeypatch.setattr(S, "_capture", lambda function, device, pool=None: recorded.append(device))
    frames = [photo(i) for i in range(3)]
    plain = stylize_many([frames], ["fire"], [3], models=shared_models, settings=settings)[0]
    with pytest.warns(RuntimeWarning) as caught:
        graph = stylize_many([frames], ["fire"], [3], models=shared_models, settings=settings.replace(cuda_graph=True))
    assert len(caught) == 1 and "set of images" in str(caught[0].message)
    assert recorded == []
    assert plain.losses == graph[0].losses and torch.equal(plain.tensor, graph[0].tensor)
