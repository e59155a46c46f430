"""--compile: torch.compile's mode reaches every compiled network, and CUDA graphs' output reuse loses nothing."""

from __future__ import annotations

import pytest
import torch

from clipstyle.config import Settings
from clipstyle.errors import ClipstyleError
from clipstyle.method.loop import stylize_many

from conftest import tiny_models


def test_compile_takes_a_mode_and_keeps_true_and_false():
    assert Settings().compile == ""
    assert Settings(compile=True).compile == "default"
    assert Settings(compile=False).compile == ""
    assert Settings(compile="reduce-overhead").compile == "reduce-overhead"
    with pytest.raises(ClipstyleError, match="compile must be off or one of default, reduce-overhead"):
        Settings(compile="fast")


def _content():
    return torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))


class _IntoBuffer(torch.autograd.Function):
    """Copies into a buffer and returns a view of it, with the gradient passed through."""

    @staticmethod
    def forward(ctx, out, buffer):
        buffer.copy_(out)
        return buffer.view_as(buffer)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class FakeGraphs:
    """torch.compile as CUDA graphs behave for the loop: every call of a
    compiled function returns the same output memory, overwritten at the next
    call (the next replay). Records each compile's mode and each marked step."""

    def __init__(self):
        self.modes: list[str] = []
        self.steps = 0

    def compile(self, fn, mode=None):
        self.modes.append(mode)
        buffers: dict = {}

        def replay(x):
            out = fn(x)
            if not torch.is_tensor(out):  # VGG's feature dict: plain calls are enough
                return out
            if out.shape not in buffers:
                buffers[out.shape] = torch.empty_like(out)
            return _IntoBuffer.apply(out, buffers[out.shape])

        return replay

    def mark_step(self):
        self.steps += 1


@pytest.mark.device
def test_reduce_overhead_passes_its_mode_marks_every_step_and_keeps_each_steps_output(tiny_settings, monkeypatch):
    fake = FakeGraphs()
    monkeypatch.setattr(torch, "compile", fake.compile)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", fake.mark_step)
    settings = tiny_settings.replace(steps=3, log_every=1)
    models = tiny_models()
    plain_outputs, graph_outputs = [], []
    plain = stylize_many([_content()], ["fire"], [5], models=models, settings=settings, callback=plain_outputs.append)
    graphs = stylize_many(
        [_content()],
        ["fire"],
        [5],
        models=models,
        settings=settings.replace(compile="reduce-overhead"),
        callback=graph_outputs.append,
    )
    # the U-Net, CLIP's image tower and VGG-19, all in the mode asked for
    assert fake.modes == ["reduce-overhead"] * 3
    assert fake.steps == settings.steps
    # Every step's image is still that step's when the run ends, not the last
    # replay's: the loop copied it out of the reused memory.
    assert len(graph_outputs) == len(plain_outputs) == 3
    for a, b in zip(plain_outputs, graph_outputs):
        torch.testing.assert_close(b.output, a.output)
    torch.testing.assert_close(graphs[0].tensor, plain[0].tensor)


def test_the_default_mode_marks_no_graph_steps(tiny_settings, monkeypatch):
    fake = FakeGraphs()
    monkeypatch.setattr(torch, "compile", fake.compile)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", fake.mark_step)
    stylize_many([_content()], ["fire"], [5], models=tiny_models(), settings=tiny_settings.replace(compile=True))
    assert fake.modes == ["default"] * 3 and fake.steps == 0


@pytest.mark.slow
@pytest.mark.device
def test_reduce_overhead_compiles_and_follows_the_plain_run(tiny_settings):
    # The real torch.compile (inductor; CUDA graphs on a GPU): minutes of
    # compilation on a 2-core CPU for these tiny networks.
    settings = tiny_settings.replace(steps=2)
    models = tiny_models()
    plain = stylize_many([_content()], ["fire"], [5], models=models, settings=settings)[0]
    compiled = stylize_many(
        [_content()], ["fire"], [5], models=models, settings=settings.replace(compile="reduce-overhead")
    )[0]
    assert compiled.tensor.device == plain.tensor.device
    # Inductor fuses and reorders the arithmetic, so the two runs round differently.
    torch.testing.assert_close(compiled.tensor, plain.tensor, atol=2e-2, rtol=0)
