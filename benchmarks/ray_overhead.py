"""How many pairs a minute the driver of `clipstyle run --executor ray` handles.

The actors run a stand-in for the stylizer that returns a fixed PNG at once
(clipstyle.jobs.ray_executor.instant_batch), so what is timed is the driver and Ray:
reading each input, sending it, receiving the PNG, writing it atomically, the
report record. Inputs are 512-px JPEGs, outputs a 512-px PNG of about the size
a real one has; five prompts per image, as in the planning table of docs/scale.md.
The stand-in actors reserve no CPU (as GPU actors, whose CPU use is small), so
more of them than the instance has CPUs can be placed.

    python benchmarks/ray_overhead.py                      # 2,000 pairs with 1, 2, 4, 8 and 16 actors
    python benchmarks/ray_overhead.py --pairs 5000 --workers 2 --batch 4
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path


def make_inputs(folder: Path, count: int, side: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:side, 0:side]
    for i in range(count):
        base = np.stack([x * 255 // side, y * 255 // side, np.full_like(x, (i * 37) % 256)], -1)
        noisy = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"photo{i:05d}.jpg", quality=90)


def output_png(side: int) -> bytes:
    """A PNG of the size a stylized 512-px output has (smooth colour plus texture)."""
    import numpy as np
    from PIL import Image

    from clipstyle.images import png_bytes

    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:side, 0:side]
    base = np.stack([x * 255 // side, y * 255 // side, (x + y) * 127 // side], -1)
    texture = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
    return png_bytes(Image.fromarray(texture), {"prompt": "stand-in"})


def no_model(device="cpu"):
    return None


class Clock:
    """Timestamps of finished pairs: the steady rate excludes starting the actors."""

    def __init__(self):
        from clipstyle.jobs.batch import Events as RunEvents

        self.times: list[float] = []
        self.events = type("Events", (RunEvents,), {"finished": lambda _, p, r: self.times.append(
            time.perf_counter())})()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--workers", default="1,2,4,8,16", help="comma-separated actor counts to time")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    args = parser.parse_args()

    import ray

    from clipstyle.config import Settings
    from clipstyle.jobs.inputs import collect_inputs
    from clipstyle.jobs.pairs import plan_pairs
    from clipstyle.jobs.ray_executor import instant_batch, run_with_ray
    from clipstyle.jobs.report import Report
    from clipstyle.jobs.run import RunOptions

    root = Path(tempfile.mkdtemp(prefix="ray-overhead-"))
    try:
        photos = root / "photos"
        photos.mkdir()
        images = -(-args.pairs // args.prompts)
        make_inputs(photos, images, args.side)
        png = output_png(args.side)
        prompts = [f"style {i}" for i in range(args.prompts)]
        in_kb = sum(p.stat().st_size for p in photos.iterdir()) / images / 1024
        load = os.getloadavg()[0]
        print(f"{platform.node()}: {os.cpu_count()} cores (load average {load:.1f} at the start), Ray {ray.__version__}, local instance with "
              f"{args.cpus} CPUs; {args.pairs} pairs ({images} JPEGs of {in_kb:.0f} KB x {args.prompts} prompts), "
              f"output PNG {len(png) / 1024:.0f} KB, batch {args.batch}")
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
        job = functools.partial(instant_batch, png=png)
        print(f"{'actors':>6}  {'total s':>8}  {'pairs/min':>9}  {'steady pairs/min':>16}  "
              f"{'driver CPU ms/pair':>18}")
        for workers in (int(w) for w in args.workers.split(",")):
            out = root / f"out{workers}"
            pairs = plan_pairs(collect_inputs([str(photos)]), prompts, out, 0)[:args.pairs]
            report, clock = Report(out / "report.jsonl"), Clock()
            start, cpu = time.perf_counter(), time.process_time()
            summary = run_with_ray(pairs, no_model, Settings(), RunOptions(batch=args.batch), report, clock.events,
                                   workers=workers, cpus_per_worker=0, job=job)
            total, cpu = time.perf_counter() - start, time.process_time() - cpu
            report.close()
            assert summary.ok == len(pairs), summary
            t = clock.times
            steady = (len(t) - 1) / (t[-1] - t[0]) * 60 if len(t) > 1 else float("nan")
            print(f"{workers:>6}  {total:>8.1f}  {len(pairs) / total * 60:>9.0f}  {steady:>16.0f}  "
                  f"{cpu / len(pairs) * 1000:>18.2f}", flush=True)
            shutil.rmtree(out)
        ray.shutdown()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
