"""Weight files written by the tests themselves, once per session.

Random weights in the real architectures and the real file formats: an
open_clip ViT-B-32 (QuickGELU) state dict in fp16 (the precision OpenAI
ships), the same weights as an OpenAI-style TorchScript ``.pt`` archive, and
torchvision vgg19 state dicts. Nothing is downloaded.

Import the fixture into a test module (``from checkpoints import checkpoints``).
A fixture imported into several modules is registered once per module, so the
files are built once by a module-level cache and removed at the end of the
session.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

CLIP_ARCH = "ViT-B-32-quickgelu"  # what load_clip builds for ViT-B-32 with the openai tag


@dataclass(frozen=True)
class Checkpoints:
    root: Path
    clip: Path  # open_clip state dict, fp16
    clip_openai_pt: Path  # the same tensors in OpenAI's TorchScript layout
    vgg: Path  # torchvision's full vgg19 state dict: "features.N.*" and "classifier.N.*"
    vgg_trunk: Path  # the trunk alone, "N.*" keys, fp16

    def clip_state(self) -> dict[str, torch.Tensor]:
        return torch.load(self.clip, map_location="cpu", weights_only=True)

    def vgg_state(self) -> dict[str, torch.Tensor]:
        return torch.load(self.vgg, map_location="cpu", weights_only=True)


class OpenAIClipLayout(nn.Module):
    """open_clip's CLIP towers under OpenAI's attribute names, plus the three
    scalars OpenAI's archives carry (input_resolution, context_length, vocab_size).

    open_clip's CLIP without a custom text tower already uses OpenAI's names;
    this wrapper only adds the scalars and gives the archive a module to trace.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.visual = model.visual
        self.transformer = model.transformer
        self.token_embedding = model.token_embedding
        self.positional_embedding = model.positional_embedding
        self.ln_final = model.ln_final
        self.text_projection = model.text_projection
        self.logit_scale = model.logit_scale
        self.register_buffer("attn_mask", model.attn_mask.clone())
        self.register_buffer("input_resolution", torch.tensor(model.visual.image_size[0]))
        self.register_buffer("context_length", torch.tensor(model.context_length))
        self.register_buffer("vocab_size", torch.tensor(model.vocab_size))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image)


def _write_clip(root: Path) -> tuple[Path, Path]:
    import warnings

    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model(CLIP_ARCH, pretrained=None).eval()
    path = root / "vit-b-32-random.pt"
    torch.save({k: v.half() for k, v in model.state_dict().items()}, path)

    pt = root / "ViT-B-32.pt"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notices
        traced = torch.jit.trace(OpenAIClipLayout(model), torch.zeros(1, 3, 224, 224), check_trace=False)
        torch.jit.save(traced.half(), str(pt))
    return path, pt


def _write_vgg(root: Path) -> tuple[Path, Path]:
    import torchvision

    with torch.device("meta"):  # shapes only: no 548 MB of random numbers
        shapes = {k: v.shape for k, v in torchvision.models.vgg19().state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in shapes.items():
        if key.startswith("features.") and key.endswith(".weight"):
            fan_in = shape[1] * shape[2] * shape[3]  # He init: features neither vanish nor explode
            state[key] = torch.randn(shape, generator=generator) * (2 / fan_in) ** 0.5
        elif key.startswith("features."):
            state[key] = torch.randn(shape, generator=generator) * 0.1
        else:
            # the classifier is never used: right shapes, one stored value each (stride 0)
            state[key] = torch.zeros(1).expand(shape)
    full, trunk = root / "vgg19-random.pth", root / "vgg19-trunk.pth"
    torch.save(state, full)
    torch.save({k[len("features.") :]: v.half() for k, v in state.items() if k.startswith("features.")}, trunk)
    return full, trunk


def hub_cache(root, repo: str, filename: str, source) -> None:
    """A Hugging Face hub cache holding one file of ``repo`` at its main revision."""
    folder = root / f"models--{repo.replace('/', '--')}"
    revision = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(revision)
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    shutil.copyfile(source, snapshot / filename)


_CACHE: dict[str, Checkpoints] = {}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> Checkpoints:
    if "files" not in _CACHE:
        root = tmp_path_factory.mktemp("checkpoints")
        clip, pt = _write_clip(root)
        vgg, trunk = _write_vgg(root)
        _CACHE["files"] = Checkpoints(root, clip, pt, vgg, trunk)
    yield _CACHE["files"]
    files = _CACHE.pop("files", None)
    if files is not None:
        shutil.rmtree(files.root, ignore_errors=True)  # about 700 MB
