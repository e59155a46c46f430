"""How close the encoders' reduced precisions stay to fp32: the cosine of the loss gradient at the image.

    python benchmarks/precision.py [--device cuda] [--size 512] [--crops 64]

One step's loss (global and patch directional CLIP terms, VGG-19 content term,
the paper's weights) on the real architectures with random weights, its
gradient with respect to the output image computed with the encoders in fp32,
bf16 and fp16 autocast; prints the cosine of each to fp32 (1 is identical).
This is what picks ``--precision auto`` on a device (docs/performance.md).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from clipstyle.config import Settings
from clipstyle.device import autocast
from clipstyle.evaluation.bench import bench_images, bench_models
from clipstyle.method import losses as L
from clipstyle.method.augment import random_crop_grids, sample_crops
from clipstyle.method.text import text_embedding


def gradient(models, content, output, grids, text_dir, dtype, s: Settings) -> torch.Tensor:
    device = content.device
    x = output.clone().requires_grad_()
    with torch.no_grad(), autocast(device, dtype):
        source = F.normalize(models.clip.encode_image(content).float(), dim=-1)[0]
        target = {k: v.float() for k, v in models.vgg(content).items()}
    with autocast(device, dtype):
        emb = models.clip.encode_image(torch.cat([models.clip.resize(x), sample_crops(x, grids)]))
        feats = models.vgg(x)
    d = L.directional_loss(emb.float(), source, text_dir)
    loss = (s.lambda_dir * d[0] + s.lambda_patch * L.reject_below(d[1:], s.threshold).mean()
            + s.lambda_content * L.content_loss(feats, target).sum() + s.lambda_tv * L.total_variation(x).sum())
    loss.backward()
    return x.grad.flatten().float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--crops", type=int, default=64)
    args = parser.parse_args()
    device = torch.device(args.device)
    s = Settings()
    models = bench_models(device)
    content = bench_images(args.size)[0].to(device)
    output = (content * 0.8 + 0.1 * torch.rand_like(content)).clamp(0, 1)  # an output some way from the content
    grids = random_crop_grids(args.size, args.size, args.crops, s.crop_size, models.clip.image_size[0],
                              s.distortion, torch.Generator().manual_seed(0), device)
    text_dir = L.text_direction(text_embedding(models, "fire", ("{}",)), text_embedding(models, s.source, ("{}",)))
    reference = gradient(models, content, output, grids, text_dir, None, s)
    print(f"{args.size} px, {args.crops} crops, {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        g = gradient(models, content, output, grids, text_dir, dtype, s)
        cosine = F.cosine_similarity(g, reference, dim=0).item()
        print(f"{name}: gradient cosine to fp32 {cosine:.5f}, relative norm {(g.norm() / reference.norm()).item():.4f}")


if __name__ == "__main__":
    main()
