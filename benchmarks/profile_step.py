"""Where a CPU step's time goes: each part of a clipstyle step timed alone, against the compute floor.

    python benchmarks/profile_step.py --size 256 --crops 16 --repeats 5
    python benchmarks/profile_step.py --size 512 --crops 64 --repeats 3

Real architectures with random weights (nothing downloaded). The parts and the
floor passes alternate in one process and each part is reported as the median
of its per-repeat ratio to the floor pass of the same repeat, which holds up
under load from other processes better than seconds. Also printed: alpha, the
cost of a no-grad CLIP forward of a row relative to its forward and backward
(clipstyle.method.rejection.NO_GRAD_COST).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from clipstyle.config import Settings
from clipstyle.evaluation.bench import Floor, bench_images, bench_models
from clipstyle.method import losses as L
from clipstyle.method.augment import sample_crops
from clipstyle.method.loop import _adam, _PairState
from clipstyle.prompts import NO_TEMPLATES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--crops", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="0: PyTorch's default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    size, crops = args.size, args.crops
    device = torch.device("cpu")
    models = bench_models(device)
    models.vgg.use_channels_last(True)  # as the loop does on the CPU
    settings = Settings(size=size, crops=crops, steps=2, templates=NO_TEMPLATES)
    pair = _PairState(0, bench_images(size)[0], "an oil painting", 0, models, models.vgg, settings, None)
    clip = models.clip
    floor = Floor(models, crops + 1, (1, 3, size, size))
    out = pair.net(pair.content).detach()
    rows = torch.rand(crops + 1, 3, *clip.image_size, generator=torch.Generator().manual_seed(2))

    def unet() -> None:  # forward, backward with weight gradients
        y = pair.net(pair.content)
        y.backward(torch.ones_like(y))
        pair.net.zero_grad(set_to_none=True)

    def crops_and_resize() -> None:  # the whole image at 224 and every crop, forwards and backwards
        leaf = out.clone().requires_grad_()
        x = torch.cat([clip.resize(leaf), sample_crops(leaf, pair.crops(0, clip.image_size[0]))])
        x.backward(torch.ones_like(x))

    def clip_pass() -> None:  # the loop's CLIP pass (fast path) and directional losses
        x = rows.clone().requires_grad_()
        L.directional_loss(clip.encode_image(x), pair.source_emb, pair.text_dir).sum().backward()

    def clip_no_grad() -> None:  # the two-pass path's first pass, over the crops
        with torch.no_grad():
            clip.encode_image(rows[1:])

    def vgg() -> None:  # content and total variation losses, forwards and backwards
        x = out.clone().requires_grad_()
        (L.content_loss(models.vgg(x), pair.content_feats) + L.total_variation(x)).sum().backward()

    for p in pair.net.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    adam = _adam(pair.net.parameters(), 1e-9, device).step

    parts = {"U-Net forward+backward": unet, "crops and resize": crops_and_resize,
             "CLIP forward+backward": clip_pass, "CLIP no-grad (crops)": clip_no_grad,
             "VGG, content, TV": vgg, "Adam (fused)": adam,
             "floor: CLIP": floor.clip_pass, "floor: VGG": floor.vgg_pass}
    for f in parts.values():
        f()
    runs: dict[str, list[float]] = {k: [] for k in parts}
    for _ in range(args.repeats):
        for name, f in parts.items():
            start = time.perf_counter()
            f()
            runs[name].append(time.perf_counter() - start)
    floors = [a + b for a, b in zip(runs["floor: CLIP"], runs["floor: VGG"])]
    print(f"{size} px, {crops} crops, {torch.get_num_threads()} threads, {args.repeats} alternating repeats")
    for name, times in runs.items():
        share = statistics.median(t / f for t, f in zip(times, floors))
        print(f"  {name:24s} {statistics.median(times):8.3f} s  {share:6.3f} x floor")
    alpha = statistics.median(a / crops / (b / (crops + 1))
                              for a, b in zip(runs["CLIP no-grad (crops)"], runs["CLIP forward+backward"]))
    print(f"  alpha (no-grad row / forward+backward row): {alpha:.3f}")


if __name__ == "__main__":
    main()
