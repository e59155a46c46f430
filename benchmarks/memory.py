"""Peak memory of one optimisation on the CPU, above the loaded models: the figures behind clipstyle/jobs/memory.py.

    python benchmarks/memory.py SIZE CROPS     # one process per measurement (the peak is per process)

Random weights, the real architectures (CLIP ViT-B/32, VGG-19), a square image of SIZE px,
two steps, fp32. Prints the peak resident memory above what the models hold, in MB and per pixel.
"""

import resource
import sys

import torch

from clipstyle.config import Settings
from clipstyle.method.loop import stylize_many
from clipstyle.models.loading import load_models


def resident() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def main(size: int, crops: int) -> None:
    models = load_models(device="cpu", random_init=True)
    before = max(resident(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    settings = Settings(steps=2, size=size, crops=crops, crop_size=min(128, size // 2))
    stylize_many([torch.rand(1, 3, size, size)], ["ink"], [0], models=models, settings=settings)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    print(f"size {size} crops {crops}: peak {peak / 1e6:.0f} MB above the models, {peak / size**2:.0f} bytes per pixel")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
