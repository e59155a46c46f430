"""Shared fixtures: tiny stand-ins for CLIP and VGG-19 built from random weights
through the same classes as the real ones, so tests need no downloads.

``CLIPSTYLE_TEST_DEVICE=cuda pytest -m device`` runs the tests marked ``device``
(the loop, precision, batches, out of memory, styles and tiles, scores) with
the tiny models on that device; unset, everything runs on the CPU."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

DEVICE = torch.device(os.environ.get("CLIPSTYLE_TEST_DEVICE") or "cpu")

# How long a test waits for something that can hang (a child process, a signal's effect, a
# server): never a measure of speed, only a guard so that a hung test ends. One hour by
# default, far beyond what the slowest wait needs on a loaded 2-core machine;
# CLIPSTYLE_TEST_WAIT=SECONDS changes it, CLIPSTYLE_TEST_WAIT=0 waits without a bound.
WAIT: float | None = float(os.environ.get("CLIPSTYLE_TEST_WAIT") or 3600) or None
# The same bound for loops that poll until something happens (a deadline needs a number).
PATIENCE: float = WAIT if WAIT is not None else 1e6


def pytest_configure(config):
    """A test device that is not there stops the run: passing on the CPU instead would prove nothing."""
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"CLIPSTYLE_TEST_DEVICE={DEVICE}: CUDA is not available here")
    if DEVICE.type == "mps" and not torch.backends.mps.is_available():
        raise pytest.UsageError(f"CLIPSTYLE_TEST_DEVICE={DEVICE}: Apple MPS is not available here")
    if DEVICE.type == "cuda":
        # cuDNN's default TF32 convolutions keep 10 mantissa bits: the tests pin
        # equal maths (fast paths, batches, chunks) to fp32 rounding.
        torch.backends.cudnn.allow_tf32 = False


def pytest_report_header(config):
    return f"clipstyle test device: {DEVICE} (CLIPSTYLE_TEST_DEVICE)"


# Tiny models are many small ops: one thread avoids waiting for a second, busy
# core at each of them (several times faster on a loaded 2-core machine).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts with one thread, whatever the one before set (bench --threads)."""
    torch.set_num_threads(1)
    yield


def tiny_clip(seed: int = 0, image_size: int = 32):
    import open_clip
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    from clipstyle.models.encoders import ClipEncoder

    torch.manual_seed(seed)
    model = CLIP(
        embed_dim=16,
        vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=image_size),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
        quick_gelu=True,
    )
    return ClipEncoder(model, open_clip.SimpleTokenizer(), image_size)


def tiny_vgg(seed: int = 0):
    from clipstyle.models.encoders import VggEncoder, vgg19_features

    torch.manual_seed(seed)
    features = vgg19_features(width_divisor=16)
    # He initialisation: with PyTorch's default one, activations shrink about
    # 1.7-fold per convolution and relu5_2 is ~1e-5, so the content loss would
    # test nothing; here they keep their scale, as in the real network.
    with torch.no_grad():
        for layer in features:
            if isinstance(layer, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                layer.bias.normal_(0, 0.01)
    return VggEncoder(features)


def tiny_models(seed: int = 0, device: torch.device | str = DEVICE):
    """Tiny models on the test device (CLIPSTYLE_TEST_DEVICE, the CPU by default)."""
    from clipstyle.models.encoders import Models

    return Models(
        tiny_clip(seed).to(device),
        tiny_vgg(seed).to(device),
        {"clip_model": "tiny", "clip_pretrained": "random", "clip_weights": None, "vgg_weights": "random"},
    )


@pytest.fixture
def models():
    """Tiny models of this test's own (for tests that change them)."""
    return tiny_models()


@pytest.fixture(scope="session")
def shared_models():
    """Tiny models shared by every test that only uses them (the loop never changes them)."""
    return tiny_models()


@pytest.fixture
def tiny_settings():
    from clipstyle.config import Settings
    from clipstyle.prompts import NO_TEMPLATES

    return Settings(steps=4, size=32, crops=4, crop_size=16, templates=NO_TEMPLATES, log_every=2)


@pytest.fixture
def photo(tmp_path):
    """A small structured RGB photo (gradients and a square) written as JPEG."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (48, 32))
    px = img.load()
    for y in range(32):
        for x in range(48):
            px[x, y] = (x * 5, y * 7, 128)
    ImageDraw.Draw(img).rectangle([10, 8, 24, 20], fill=(240, 240, 30))
    path = tmp_path / "photo.jpg"
    img.save(path, quality=95)
    return path


def three_photos(tmp_path) -> list:
    """Three small PNGs of different colours, in0.png .. in2.png."""
    from PIL import Image

    paths = []
    for i in range(3):
        p = tmp_path / f"in{i}.png"
        Image.new("RGB", (24, 16), (80 * i, 50, 50)).save(p)
        paths.append(p)
    return paths


def photo_folder(tmp_path):
    """A folder of four good images of different sizes and one broken JPEG."""
    from PIL import Image

    d = tmp_path / "photos"
    d.mkdir()
    for i, size in enumerate([(40, 30), (30, 40), (32, 32), (50, 20)]):
        Image.new("RGB", size, (60 * i, 100, 200 - 40 * i)).save(d / f"img{i}.png")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    return d


def tiny_loader(*args, device="cpu", **kwargs):
    """A picklable stand-in for the CLI's model loader (worker processes import it), on the device asked for."""
    from clipstyle.device import resolve_device

    return tiny_models(device=resolve_device(device))


# The least a CLI run takes: the command tests pass these after their own options.
TINY_16 = ["--size", "16", "--steps", "1", "--crops", "1", "--crop-size", "8", "--no-templates", "-q"]
"""One step on a 16-pixel picture with one 8-pixel crop, quiet."""
TINY_32 = ["--size", "32", "--steps", "2", "--crops", "2", "--crop-size", "16", "--no-templates", "-q"]
"""Two steps on a 32-pixel picture with two 16-pixel crops, quiet."""


def records(path) -> list[dict]:
    """The records of a JSON-lines report (``--report``), one a line."""
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def invoke(*args, catch_exceptions: bool = False):
    """``clipstyle ARGS...`` through click's CliRunner (arguments may be paths)."""
    from click.testing import CliRunner

    from clipstyle.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=catch_exceptions)


def counting_loader(monkeypatch, command: str = "run") -> list:
    """Tiny models behind ``command``'s model loader; the returned list records each load."""
    calls = []

    def load(*args, device="auto", **kwargs):
        from clipstyle.device import resolve_device

        calls.append(args)
        return tiny_models(device=resolve_device(device))

    target = (
        "clipstyle.jobs.plan.load_models" if command == "run" else f"clipstyle.cli.{command}.load_models_from_options"
    )
    monkeypatch.setattr(target, load)
    return calls


@pytest.fixture
def queue(tmp_path):
    """A web app's job queue over the tiny models, its folder in tmp_path (tests/test_serve*.py)."""
    from clipstyle.serve.jobs import JobQueue

    return JobQueue(tiny_models(), tmp_path / "served", preview_seconds=0)


@pytest.fixture
def server(queue):
    """The web app serving ``queue`` on 127.0.0.1 (a free port): its base URL; stopped afterwards."""
    from serve_support import running

    with running(queue) as base:
        yield base
