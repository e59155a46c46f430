"""One way to plan and run a job (clipstyle.jobs.plan): what `run`, `serve` and scripts submit."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from PIL import Image

from clipstyle.config import Settings
from clipstyle.errors import ClipstyleError
from clipstyle.jobs.plan import Executor, ModelSpec, RunPlan, execute, plan_run
from clipstyle.jobs.report import Report
from clipstyle.jobs.run import RunOptions

from conftest import three_photos, tiny_loader

TINY = Settings(size=32, steps=2, crops=2, crop_size=16, templates=("{}",))


@pytest.fixture
def loads(monkeypatch):
    """Tiny models behind every executor's loader; the list records each load."""
    calls = []

    def load(spec, device="auto", progress=True):
        calls.append((spec, str(device)))
        return tiny_loader(device=device)

    monkeypatch.setattr("clipstyle.jobs.plan.load_models", load)
    return calls


def test_a_plan_pairs_every_image_with_every_prompt_and_checks_before_anything_is_written(tmp_path):
    photos = three_photos(tmp_path)
    plan = plan_run([str(p) for p in photos], ["ink", "fire", "ink"], output=tmp_path / "out", settings=TINY)
    assert len(plan.pairs) == 6  # a repeated prompt is one
    assert {p.output.parent for p in plan.pairs} == {tmp_path / "out"}
    assert len({p.seed for p in plan.pairs}) == 6
    assert not (tmp_path / "out").exists()  # checked writable, nothing made: the folder comes with its first file
    with pytest.raises(ClipstyleError, match="prompt is empty"):
        plan_run([str(photos[0])], ["  "])
    with pytest.raises(ClipstyleError, match="no file matches"):
        plan_run([str(tmp_path / "*.webp")], ["ink"])
    with pytest.raises(ClipstyleError):  # the report would overwrite an input
        plan_run([str(photos[0])], ["ink"], report=photos[0])


def test_execute_runs_the_plan_once_and_a_rerun_skips_it(tmp_path, loads):
    photos = three_photos(tmp_path)
    plan = plan_run(
        [str(photos[0])], ["ink"], output=tmp_path / "out", settings=TINY, executor=Executor("local", "cpu")
    )
    first = execute(plan, Report(None))
    assert (first.ok, first.skipped, first.failed) == (1, 0, 0)
    assert Image.open(plan.pairs[0].output).size == (32, 24)
    assert [device for _, device in loads] == ["cpu"] and isinstance(loads[0][0], ModelSpec)
    again = execute(plan, Report(None))
    assert (again.ok, again.skipped) == (0, 1) and len(loads) == 1  # done: nothing loaded


def test_loaded_models_are_used_as_they_are(tmp_path, loads):
    photos = three_photos(tmp_path)
    pairs = plan_run([str(photos[1])], ["ink"], output=tmp_path / "x.png", settings=TINY).pairs
    summary = execute(RunPlan(pairs, TINY, RunOptions(), models=tiny_loader()), Report(None))
    assert summary.ok == 1 and loads == []


def test_a_model_spec_travels_to_workers_and_an_executor_is_checked():
    spec = ModelSpec(clip_weights=Path("ViT-B-32.pt"))
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert spec.info()["clip_weights"] == "ViT-B-32.pt"
    with pytest.raises(ClipstyleError, match="executor"):
        Executor("cloud")
    with pytest.raises(ClipstyleError, match="at least one device"):
        Executor("devices")
    assert Executor("devices", devices=("cpu", "cpu")).local_devices() == ["cpu", "cpu"]
    assert Executor("ray").local_devices() == []
