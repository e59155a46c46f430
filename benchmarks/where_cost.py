"""What --where costs next to a default run: the mask's seconds over 200 steps' seconds.

Random weights (no download) of the real architectures: CLIP ViT-B/32 and
VGG-19. The mask is timed from a cold phrase cache (text tower included), on a
512 x 384 photo; the step is the median of a few default steps (512 px, 64
crops of 128 px) after one warm-up step.

    PYTHONPATH=src python benchmarks/where_cost.py --device cpu --steps 3
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from clipstyle.config import Settings
from clipstyle.device import resolve_device, synchronize
from clipstyle.method.loop import stylize_many
from clipstyle.models.loading import load_models
from clipstyle.regions import where

parser = argparse.ArgumentParser()
parser.add_argument("--device", default="auto")
parser.add_argument("--steps", type=int, default=3, help="steps timed (after one warm-up step)")
parser.add_argument("--repeats", type=int, default=3, help="masks timed")
args = parser.parse_args()

device = resolve_device(args.device)
models = load_models(device=device, random_init=True)
photo = torch.rand(1, 3, 384, 512, generator=torch.Generator().manual_seed(0))

mask_times = []
for _ in range(args.repeats):
    where._TEXT_CACHE.clear()  # the phrase is encoded once per run: count it every time
    synchronize(device)
    t0 = time.perf_counter()
    where.where_mask(models.clip, photo, "the sky")
    synchronize(device)
    mask_times.append(time.perf_counter() - t0)

steps = []
settings = Settings(steps=args.steps + 1, log_every=1)  # read back every step: each step's own time
stylize_many([photo], ["an oil painting"], [0], models=models, settings=settings,
             callback=lambda info: steps.append(info.step_seconds))
step = statistics.median(steps[1:])
mask = statistics.median(mask_times)
run = 200 * step
print(f"machine   {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {device}, "
      f"torch {torch.__version__}")
print(f"mask      {mask:.2f} s (median of {args.repeats}: {', '.join(f'{t:.2f}' for t in mask_times)})")
print(f"step      {step:.2f} s (median of {len(steps) - 1} after a warm-up step)")
print(f"run       {run:.0f} s for 200 steps")
print(f"ratio     {mask / run:.2%} of a default run")
