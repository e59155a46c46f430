"""How much a run at one CPU thread count differs from one at another: the figures in docs/scale.md
("Reproducibility: threads and machines").

    python benchmarks/threads.py --steps 10 [--threads 2,1] [--clip-weights F --vgg-weights F] [--size 512]

The same photo, prompt, seed and models, optimised once per thread count in one process (the paper's
settings, with --steps and --size as given). Prints, for each step, the largest and the mean difference
of the 8-bit outputs (levels of 255) and the share of values that differ. Without weight files the real
architectures are built with random weights (nothing downloaded); the figures in docs/scale.md used the
test suite's random-weight checkpoints (tests/checkpoints.py writes them).
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from clipstyle import Settings, stylize
from clipstyle.images import to_pil
from clipstyle.models.loading import load_models

PHOTO = Path(__file__).resolve().parents[1] / "examples" / "images" / "astronaut.jpg"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", default="2,1")
    parser.add_argument("--clip-weights", type=Path)
    parser.add_argument("--vgg-weights", type=Path)
    parser.add_argument("--prompt", default="starry night by Vincent van Gogh")
    args = parser.parse_args()
    weights = {"clip_weights": args.clip_weights, "vgg_weights": args.vgg_weights}
    random_init = args.clip_weights is None or args.vgg_weights is None
    models = load_models(device="cpu", random_init=random_init, **({} if random_init else weights))
    settings = Settings(steps=args.steps, size=args.size)
    frames = {}
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        steps, start = [], time.perf_counter()
        stylize(
            PHOTO,
            args.prompt,
            models=models,
            settings=settings,
            seed=0,
            callback=lambda info: steps.append(np.asarray(to_pil(info.output.cpu()), dtype=np.int16)),
        )
        frames[threads] = steps
        print(f"{threads} threads: {time.perf_counter() - start:.0f} s")
    first, second = list(frames.values())[:2]
    print("step  max  mean    differing")
    for step, (a, b) in enumerate(zip(first, second), 1):
        d = np.abs(a - b)
        print(f"{step:4d} {d.max():4d} {d.mean():7.4f} {100 * (d > 0).mean():6.2f} %")


if __name__ == "__main__":
    main()
