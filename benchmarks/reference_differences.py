"""Measure the remaining differences from the reference code (docs/reference-differences.md).

    python benchmarks/reference_differences.py [--image examples/images/astronaut.jpg] [--steps 200]

Random weights in the real architectures (CLIP ViT-B-32 with QuickGELU, VGG-19):
nothing is downloaded. Prints one line per figure.

1. Resize to CLIP's input: bicubic with antialiasing against the reference's
   bicubic without, at 128 and 512 px: embedding difference and the cosine
   between the global directional loss's gradients at the output's pixels
   (per pixel, and after 8x8 average pooling).
2. Updates: the output after steps - 1 Adam updates (clipstyle) against one
   update more at half the rate (the size of the reference's extra update).
3. --contrast: how far the reference's post-processing moves that output.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from clipstyle.config import Settings
from clipstyle.images import enhance_contrast, prepare_content
from clipstyle.method import losses as L
from clipstyle.method.loop import stylize_many
from clipstyle.method.text import text_embedding
from clipstyle.models.loading import load_models
from clipstyle.prompts import NO_TEMPLATES


def global_loss_gradient(models, content, output, text_dir, antialias: bool):
    """The global directional loss's gradient at the output's pixels, and both embeddings."""
    clip = models.clip
    clip.antialias = antialias
    with torch.no_grad():
        source = F.normalize(clip.encode_image(content), dim=-1)
    leaf = output.clone().requires_grad_()
    emb = clip.encode_image(leaf)
    L.directional_loss(emb, source, text_dir[None]).sum().backward()
    return leaf.grad, source[0], F.normalize(emb.detach(), dim=-1)[0]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def resize_figures(models, image: str, sizes=(128, 512)) -> None:
    style = text_embedding(models, "starry night", NO_TEMPLATES)
    source = text_embedding(models, "a Photo", NO_TEMPLATES)
    text_dir = L.text_direction(style, source)
    for size in sizes:
        content = prepare_content(image, size)
        noise = torch.randn(content.shape, generator=torch.Generator().manual_seed(0))
        output = (content + 0.05 * noise).clamp(0, 1)  # a stand-in for a textured output
        g_ref, src_ref, out_ref = global_loss_gradient(models, content, output, text_dir, antialias=False)
        g_aa, src_aa, out_aa = global_loss_gradient(models, content, output, text_dir, antialias=True)
        pooled = cosine(F.avg_pool2d(g_ref, 8), F.avg_pool2d(g_aa, 8))
        print(f"resize {tuple(content.shape[-2:])}: normalised embeddings' difference, L2 (largest component): "
              f"content {(src_ref - src_aa).norm():.1e} ({(src_ref - src_aa).abs().max():.1e}), "
              f"output {(out_ref - out_aa).norm():.1e} ({(out_ref - out_aa).abs().max():.1e}); "
              f"gradient cosine per pixel {cosine(g_ref, g_aa):.3f}, 8x8-pooled {pooled:.3f}")
    models.clip.antialias = False


def update_figures(models, image: str, settings: Settings) -> None:
    # Run one step more and keep the last two images: the first is the output
    # of a --steps run (steps - 1 updates; the crops and the learning-rate
    # schedule up to it are the same), the second has seen one update more, at
    # half the rate (the reference's extra update is at a quarter).
    steps = settings.steps
    outputs = {}

    def keep(info):
        if info.step >= steps:
            outputs[info.step] = info.output.float().cpu()

    stylize_many([prepare_content(image, settings.size)], ["starry night"], [0], models=models,
                 settings=settings.replace(steps=steps + 1), callback=keep)
    ours, more = outputs[steps], outputs[steps + 1]
    diff = (ours - more).abs() * 255
    print(f"updates: {steps} steps at {settings.size} px ({steps - 1} updates) vs one update more at half the rate: "
          f"mean |difference| {diff.mean():.3f}/255, 99th percentile {diff.quantile(0.99):.2f}/255, "
          f"max {diff.max():.2f}/255")
    contrast = (enhance_contrast(ours) - ours).abs() * 255
    print(f"contrast: --contrast moves that output by {contrast.mean():.1f}/255 on average")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default="examples/images/astronaut.jpg")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--size", type=int, default=128, help="training size for the update figure")
    parser.add_argument("--crops", type=int, default=8)
    parser.add_argument("--crop-size", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    models = load_models(device="cpu", random_init=True)
    resize_figures(models, args.image)
    settings = Settings(steps=args.steps, size=args.size, crops=args.crops, crop_size=args.crop_size,
                        log_every=args.steps)
    update_figures(models, args.image, settings)


if __name__ == "__main__":
    main()
