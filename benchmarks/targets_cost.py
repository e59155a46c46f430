"""What style images, blends and --avoid cost per step next to a plain text run.

Random weights (no download) of the real architectures: CLIP ViT-B/32 and
VGG-19. Each variant runs ``--steps`` timed steps after one warm-up step, with
the losses read back every step (so each step's own time is known); the
variants are interleaved over ``--repeats`` rounds and each is summarised by
the median step over all rounds, which evens out a machine shared with other
work. The style image's one-off cost (its crop embedding, and the content's
crops that a style-image direction starts from) is timed apart, from a cold
cache. Threshold rejection is forced to one path (single pass, 50 % of the
crops rejected) so every variant does the same CLIP work per step.

    PYTHONPATH=src python benchmarks/targets_cost.py --device cpu --preset draft --steps 4 --repeats 3
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from clipstyle.config import settings_for
from clipstyle.device import resolve_device, synchronize
from clipstyle.method import targets as T
from clipstyle.method.loop import stylize_many
from clipstyle.method.rejection import Rejection
from clipstyle.method.targets import StyleImage, Target, Targets
from clipstyle.models.loading import load_models

parser = argparse.ArgumentParser()
parser.add_argument("--device", default="auto")
parser.add_argument("--preset", default="draft", help="paper or draft")
parser.add_argument("--steps", type=int, default=4, help="steps timed per run (after one warm-up step)")
parser.add_argument("--repeats", type=int, default=3, help="rounds over all variants")
parser.add_argument("--term-only", action="store_true", help="time the avoid term alone (no model, seconds)")
args = parser.parse_args()


def avoid_term_seconds(rows: int, phrases: int, dim: int = 512, calls: int = 2000) -> float:
    """The avoid term as the loop runs it for one pair's rows, forward and backward into the
    embeddings: the median of ``calls`` timed calls. Robust on a busy machine where whole steps
    vary by more than the term costs."""
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(rows, dim, generator=g).requires_grad_()
    src = torch.nn.functional.normalize(torch.randn(dim, generator=g), dim=-1)
    dirs = torch.nn.functional.normalize(torch.randn(phrases, dim, generator=g), dim=-1)
    weight = torch.full((rows,), 9000.0 / rows)
    rejected = torch.arange(rows) % 2 == 0
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        part = 0.5 * T.avoid_penalty(emb, src, dirs)
        part = torch.where(rejected, torch.zeros_like(part), part)
        (part * weight).sum().backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


if args.term_only:
    for rows, phrases in ((17, 1), (17, 3), (65, 1), (65, 3)):
        print(f"avoid term, {rows} rows, {phrases} phrase(s): {avoid_term_seconds(rows, phrases) * 1e3:.3f} ms")
    raise SystemExit

device = resolve_device(args.device)
models = load_models(device=device, random_init=True)
settings = settings_for(args.preset, steps=args.steps + 1, log_every=1)
g = torch.Generator().manual_seed(0)
photo = torch.rand(1, 3, 384, 512, generator=g)
style = StyleImage.from_image(torch.rand(1, 3, 300, 400, generator=g), "style.png")
size = settings.size
photo = torch.nn.functional.interpolate(photo, size=(size * 3 // 4 // 8 * 8, size), mode="bilinear")

variants = {
    "plain text": None,
    "--avoid (1 phrase)": Targets.of("an oil painting").with_avoid(["written text, letters, watermark"]),
    "--avoid (3 phrases)": Targets.of("an oil painting").with_avoid(["written text", "letters", "watermark"]),
    "style image": Targets((Target(image=style),)),
    "blend text + image": Targets((Target("an oil painting", weight=0.7), Target(image=style, weight=0.3))),
}
rejection = Rejection(force=0.5, path="single")


def one_off() -> float:
    """The style image's embedding and the content's crops, from a cold cache."""
    T._IMAGE_EMBEDDINGS.clear()
    synchronize(device)
    t0 = time.perf_counter()
    T.target_direction(models, Targets((Target(image=style),)), settings, photo.to(device))
    synchronize(device)
    return time.perf_counter() - t0


steps: dict[str, list[float]] = {name: [] for name in variants}
embeds = []
for _ in range(args.repeats):
    embeds.append(one_off())
    for name, target in variants.items():
        times: list[float] = []
        stylize_many(
            [photo],
            ["an oil painting"],
            [0],
            models=models,
            settings=settings,
            callback=lambda info, times=times: times.append(info.step_seconds),
            rejection=rejection,
            targets=[target],
        )
        steps[name] += times[1:]

base = statistics.median(steps["plain text"])
print(
    f"machine   {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {device}, "
    f"torch {torch.__version__}"
)
print(
    f"settings  {args.preset}: {photo.shape[-1]}x{photo.shape[-2]}, {settings.crops} crops of {settings.crop_size} px"
)
print(f"one-off   style image + content crops: {statistics.median(embeds):.3f} s (median of {len(embeds)})")
for name, values in steps.items():
    m = statistics.median(values)
    q = statistics.quantiles(values, n=4)
    print(
        f"{name:22s} {m:.4f} s/step (median of {len(values)}, quartiles {q[0]:.2f}-{q[2]:.2f})"
        f"  {m / base - 1:+.1%} vs plain text"
    )
term = avoid_term_seconds(settings.crops + 1, 1)
print(f"avoid term alone, {settings.crops + 1} rows, 1 phrase: {term * 1e3:.3f} ms = {term / base:.3%} of a plain step")
