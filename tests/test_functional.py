"""The whole method on a hand-made encoder pair whose answers are known.

The CLIP stand-in embeds an image as its colour statistics and a text by its
colour word, so "red" points at "redder" in both spaces. Run through the real
loop, the prompt "red" must make the image redder while a VGG content term
keeps its structure. The same test run with the loss deliberately broken
(a flipped sign, a reversed text direction, a detached embedding, a missing
normalisation) must fail: the test has teeth. The encoders run on
CLIPSTYLE_TEST_DEVICE (marker ``device``); the pictures stay on the CPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clipstyle.config import Settings
from clipstyle.method import losses as L
from clipstyle.method.loop import stylize_many
from clipstyle.models.encoders import Models, VggEncoder
from clipstyle.prompts import NO_TEMPLATES

from conftest import DEVICE, tiny_vgg

pytestmark = pytest.mark.device


class ColourClip(nn.Module):
    """A ClipEncoder-compatible stand-in with a 4-d embedding.

    Image: (mean R, mean G, mean B) minus their mean, then a constant. Text: the
    colour word's direction in the same space and the same constant. The
    constant plays the part of what all images share in CLIP space and gives
    embeddings a norm of about 10, as CLIP's have: an embedding left
    unnormalised is then visibly wrong.
    """

    image_size = (16, 16)
    context_length = 77
    shared = 10.0
    words = {"red": (1.0, -0.5, -0.5), "green": (-0.5, 1.0, -0.5), "blue": (-0.5, -0.5, 1.0), "photo": (0.0, 0.0, 0.0)}

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.zeros(1, 3, 1, 1), persistent=False)  # the device, as ClipEncoder

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        return F.interpolate(images, size=self.image_size, mode="bilinear", align_corners=False, antialias=True)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        rgb = self.resize(images).mean(dim=(2, 3))  # (B, 3)
        return torch.cat([rgb - rgb.mean(dim=1, keepdim=True), torch.full_like(rgb[:, :1], self.shared)], dim=1)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        rows = []
        for text in texts:
            word = next(w for w in self.words if w in text.lower())
            rows.append(torch.tensor([*self.words[word], self.shared]))
        return torch.stack(rows).to(self.mean.device)

    def token_count(self, text: str) -> int:
        return len(text.split()) + 2


def content_vgg() -> VggEncoder:
    """conftest's narrow VGG-19 trunk with He-initialised weights (features that
    neither vanish nor explode), read at relu1_2 and relu2_2: at 24 pixels,
    relu4_2 and relu5_2 are 3x3 and 1x1 maps that say little about structure."""
    vgg = tiny_vgg(0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in vgg.features:
            if isinstance(layer, nn.Conv2d):
                fan_in = layer.in_channels * 9
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * (2 / fan_in) ** 0.5)
                layer.bias.zero_()
    return VggEncoder(vgg.features, {"relu1_2": 3, "relu2_2": 8})


def scene(size: int = 24) -> torch.Tensor:
    """A cool-coloured picture with structure: gradients, a square, a bright band. (1, 3, size, size)"""
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    image = torch.stack([0.25 + 0.2 * xs, 0.35 + 0.3 * ys, 0.6 - 0.2 * xs])
    image[:, size // 4 : size * 5 // 8, size // 3 : size * 2 // 3] = torch.tensor([0.15, 0.6, 0.7]).view(3, 1, 1)
    image[:, size * 3 // 4 : size * 7 // 8, :] = 0.9
    return image.unsqueeze(0)


# The paper's weights, threshold and Adam; 50 steps instead of 200, so the
# learning rate is 10x the paper's: the network starts from random weights and
# must learn to reproduce the picture in a quarter of the steps.
SETTINGS = Settings(steps=50, size=24, crops=4, crop_size=16, lr=5e-3, templates=NO_TEMPLATES, log_every=50)


def stylized(prompt: str) -> torch.Tensor:
    models = Models(ColourClip().to(DEVICE), content_vgg().to(DEVICE))
    (result,) = stylize_many([scene()], [prompt], [0], models=models, settings=SETTINGS)
    assert result.error is None
    return result.tensor


def redness(images: torch.Tensor) -> float:
    """Mean red minus the mean of green and blue."""
    return float(images[:, 0].mean() - images[:, 1:].mean())


def structure(a: torch.Tensor, b: torch.Tensor) -> float:
    """Correlation of the two luminance maps (NaN for a flat image)."""
    la, lb = a.mean(dim=1).flatten(), b.mean(dim=1).flatten()
    la, lb = la - la.mean(), lb - lb.mean()
    return float((la * lb).sum() / (la.norm() * lb.norm()))


@pytest.fixture(scope="module")
def control() -> torch.Tensor:
    """The same run with the neutral text as prompt: text direction 0, no CLIP
    gradient, only content and TV. What the network makes of the picture anyway."""
    return stylized(SETTINGS.source)


def judge(out: torch.Tensor, control: torch.Tensor) -> dict:
    content = scene()
    return {
        "redder than the picture": redness(out) - redness(content) > 0.05,
        "redder than without the prompt": redness(out) - redness(control) > 0.08,
        "structure holds": structure(out, content) > 0.75,  # NaN compares False
    }


def test_red_makes_the_picture_redder_and_keeps_its_structure(control):
    out = stylized("red")
    verdict = judge(out, control)
    assert all(verdict.values()), (verdict, redness(out), redness(control), structure(out, scene()))
    # the control alone is not redder: the change comes from the prompt
    assert not judge(control, control)["redder than the picture"]


def _flipped_sign(real):
    return lambda image_emb, source_emb, text_dir: 2 - real(image_emb, source_emb, text_dir)  # 1 + cos


def _reversed_direction(real):
    return lambda style, source: real(source, style)


def _detached_image(real):
    # no gradient reaches the output through CLIP (the graph is kept, so the loop still runs)
    return lambda image_emb, source_emb, text_dir: real(image_emb.detach(), source_emb, text_dir) + 0 * image_emb.sum()


def _unnormalised_image(real):
    def loss(image_emb, source_emb, text_dir):
        direction = F.normalize(image_emb.float() - source_emb, dim=-1)
        return 1 - F.cosine_similarity(direction, text_dir.expand_as(direction), dim=-1)

    return loss


@pytest.mark.parametrize(
    "name,breakage,fails",
    [
        ("directional_loss", _flipped_sign, "redder than the picture"),  # it turns away from red
        ("text_direction", _reversed_direction, "redder than the picture"),
        ("directional_loss", _detached_image, "redder than without the prompt"),  # nothing but the control
        # maximises the projection on red instead of aligning the change: it saturates and the picture is lost
        ("directional_loss", _unnormalised_image, "structure holds"),
    ],
    ids=["flipped-sign", "reversed-text-direction", "detached-image-embedding", "unnormalised-image-embedding"],
)
def test_a_broken_loss_fails_the_same_criteria(control, monkeypatch, name, breakage, fails):
    monkeypatch.setattr(L, name, breakage(getattr(L, name)))
    out = stylized("red")
    verdict = judge(out, control)
    assert not verdict[fails], verdict
