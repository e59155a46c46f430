"""The public API as a library user meets it: names that import in a fresh interpreter, the
README's Library example run as written, models loaded once, one way to pass settings."""

from __future__ import annotations

import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoints import checkpoints, hub_cache  # noqa: F401  (a fixture)
from conftest import DEVICE, WAIT

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = [
    "stylize",
    "stylize_many",
    "load_models",
    "Settings",
    "load_style",
    "save_style",
    "render",
    "StepInfo",
    "StylizeResult",
    "Models",
    "StyleNet",
    "Style",
    "open_image",
    "save_png",
    "to_tensor",
    "to_pil",
    "ClipstyleError",
    "settings_for",
    "PRESETS",
    "Target",
    "StyleImage",
]


def test_public_names_are_the_objects_in_a_fresh_interpreter():
    code = (
        "import sys, inspect, clipstyle\n"
        f"names = {PUBLIC!r}\n"
        "assert set(names) <= set(dir(clipstyle)), set(names) - set(dir(clipstyle))\n"
        "assert 'torch' not in sys.modules\n"  # import clipstyle alone stays light
        "from clipstyle import stylize, stylize_many, load_models, Settings, render, load_style\n"
        "for f in (stylize, stylize_many, load_models, render, load_style):\n"
        "    assert inspect.isfunction(f), f\n"
        "assert inspect.isclass(Settings)\n"
        "import clipstyle.styles.rendering, clipstyle.method.loop\n"  # importing the modules shadows nothing
        "from clipstyle import render, stylize\n"
        "assert inspect.isfunction(render) and inspect.isfunction(stylize)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=WAIT)
    assert done.returncode == 0, done.stderr


def readme_library_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Library\n", 1)[1]
    lines = []
    for line in section.splitlines()[1:]:
        if line.startswith("    ") or (not line.strip() and lines):
            lines.append(line[4:])
        elif lines:
            break
    return "\n".join(lines).strip() + "\n"


@pytest.mark.slow
def test_readme_library_example_runs_as_written(checkpoints, tmp_path):  # noqa: F811
    """With the weights already in the caches (random weights of the real architectures), so nothing
    is downloaded: what a user who ran `clipstyle run` once has."""
    import open_clip

    code = readme_library_example()
    assert "stylize(" in code and "render(" in code
    repo = open_clip.get_pretrained_cfg("ViT-B-32", "openai")["hf_hub"].strip("/")
    hub_cache(tmp_path / "hub", repo, "open_clip_pytorch_model.bin", checkpoints.clip)
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    shutil.copyfile(checkpoints.vgg, tmp_path / "torch" / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth")
    shutil.copyfile(ROOT / "examples" / "images" / "chelsea.jpg", tmp_path / "photo.jpg")
    shutil.copyfile(ROOT / "examples" / "images" / "coffee.jpg", tmp_path / "painting.jpg")
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "TORCH_HOME": str(tmp_path / "torch"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "2",
    }
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=WAIT
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["1/4", "2/4", "3/4", "4/4"]
    assert "'total'" in lines[-1] and "None" not in done.stdout  # the losses, read at the last step
    from PIL import Image

    photo = Image.open(tmp_path / "photo.jpg")
    styled, full = Image.open(tmp_path / "styled.png"), Image.open(tmp_path / "styled-full.png")
    assert max(styled.size) == 128 and full.size == photo.size
    assert Image.open(tmp_path / "blended.png").size == styled.size


@pytest.mark.device
def test_stylize_loads_the_default_models_once(monkeypatch, tiny_settings):
    from clipstyle.method import stylize as entry
    from clipstyle.models import loading

    from conftest import tiny_models

    calls = []

    def load_models(device):
        calls.append(device)
        return tiny_models(device=device)

    monkeypatch.setattr(loading, "load_models", load_models)
    loading.default_models.cache_clear()
    try:
        image = torch.rand(1, 3, 32, 32)
        first = entry.stylize(image, "fire", settings=tiny_settings, device=str(DEVICE))
        second = entry.stylize(image, "ice", settings=tiny_settings, device=str(DEVICE))
    finally:
        loading.default_models.cache_clear()
    assert len(calls) == 1
    assert first.image is not None and second.image is not None


@pytest.mark.device
def test_a_device_that_disagrees_with_the_models_is_an_error(models, tiny_settings, monkeypatch):
    from clipstyle.errors import ClipstyleError
    from clipstyle.method import stylize as entry

    monkeypatch.setattr(entry, "resolve_device", lambda name: torch.device(name))  # as if CUDA were here
    with pytest.raises(ClipstyleError, match="differs from the models' device"):
        entry.stylize(torch.rand(1, 3, 32, 32), "fire", models=models, settings=tiny_settings, device="cuda:1")
    result = entry.stylize(
        torch.rand(1, 3, 32, 32), "fire", models=models, settings=tiny_settings, device=str(DEVICE)
    )  # the models' own device is fine
    assert result.image is not None


def test_settings_are_passed_one_way():
    from clipstyle import stylize

    parameters = inspect.signature(stylize).parameters
    assert "settings" in parameters
    assert not any(p.kind == p.VAR_KEYWORD for p in parameters.values())


@pytest.mark.device
def test_stylize_many_leaves_the_shared_models_as_they_were(models, tiny_settings):
    from clipstyle import stylize_many

    before = {k: v.clone() for k, v in models.vgg.state_dict().items()}
    layout = models.vgg.channels_last
    stylize_many(
        [torch.rand(1, 3, 32, 32)],
        ["fire"],
        [0],
        models=models,
        settings=tiny_settings.replace(memory_format="channels_last"),
    )
    assert models.vgg.channels_last == layout
    assert models.vgg.features[0].weight.is_contiguous()
    assert all(torch.equal(before[k], v) for k, v in models.vgg.state_dict().items())
    assert set(vars(models)) == {"clip", "vgg", "info", "text_cache"}


def test_readme_names_only_public_names():
    code = readme_library_example()
    imported = ",".join(re.findall(r"from clipstyle import (.+)", code))
    import clipstyle

    assert {n.strip() for n in imported.split(",")} <= set(clipstyle.__all__)
