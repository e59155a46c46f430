"""Where a GPU step's time goes: the host's time, the device's busy time and the kernels of real steps.

    python benchmarks/gpu_profile.py                       # CUDA, paper defaults (512 px, 64 crops)
    python benchmarks/gpu_profile.py --batch 8 --json p.json
    python benchmarks/gpu_profile.py --device cpu --size 64 --crops 2   # a quick check of the script

Runs the loop itself (clipstyle.method.loop.stylize_many, random weights of the
real architectures, nothing downloaded) under torch.profiler: warm-up steps
first, then --steps recorded steps. Per recorded step:

- host ms: how long the Python loop took to issue the step (the profiler's
  step marks; the loop waits for the device only when it reads the losses,
  which it does once, at the end);
- span ms: the device's timeline of the recorded steps, first kernel start
  to last kernel end, per step;
- busy ms: the time inside kernels (overlaps merged), per step; busy well
  under span means the device waits for the host, which CUDA graphs remove;
  busy near span means arithmetic;
- kernels: kernels (memory copies and sets included) launched per step.

Then the kernels that take the most device time. On the CPU there are no
kernels: it prints the host time and the operators that take the most time.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, schedule

from clipstyle.config import Settings
from clipstyle.evaluation.bench import bench_images, bench_models
from clipstyle.method.loop import stylize_many
from clipstyle.prompts import NO_TEMPLATES


def merged_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by (start, end) intervals, overlaps counted once."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=Settings.size)
    parser.add_argument("--crops", type=int, default=Settings.crops)
    parser.add_argument("--crop-size", type=int, default=Settings.crop_size)
    parser.add_argument("--precision", default=Settings.precision)
    parser.add_argument("--batch", type=int, default=1, help="pairs optimised together")
    parser.add_argument("--cuda-graph", action="store_true", help="the graph path: steps replayed as CUDA graphs")
    parser.add_argument("--warmup", type=int, default=3, help="steps before the recorded ones")
    parser.add_argument("--steps", type=int, default=5, help="steps recorded")
    parser.add_argument("--top", type=int, default=12, help="kernels (operators on the CPU) listed")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    models = bench_models(device)
    # The profiler's own warm-up step and one trailing step (which reads the losses) are not recorded.
    total_steps = args.warmup + 1 + args.steps + 1
    settings = Settings(
        size=args.size,
        crops=args.crops,
        crop_size=args.crop_size,
        precision=args.precision,
        steps=total_steps,
        log_every=total_steps,
        templates=NO_TEMPLATES,
        cuda_graph=args.cuda_graph,
    )
    contents = bench_images(args.size, args.batch)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    plan = schedule(skip_first=args.warmup, wait=0, warmup=1, active=args.steps, repeat=1)
    ticks = {"n": 0}

    with profile(activities=activities, schedule=plan) as prof:

        def tick(info) -> None:  # once per step: every pair reports each step
            ticks["n"] += 1
            if ticks["n"] % args.batch == 0:
                if cuda and ticks["n"] // args.batch == args.warmup + 1:
                    # the recorded steps start with an idle device: no kernel of an earlier step in them
                    torch.cuda.synchronize(device)
                prof.step()

        stylize_many(
            contents, ["an oil painting"] * args.batch, list(range(args.batch)), models=models,
            settings=settings, callback=tick,
        )

    events = prof.events()
    # The host's step marks (the profiler also copies them onto the device's timeline).
    steps = [e for e in events if e.name.startswith("ProfilerStep") and e.device_type == DeviceType.CPU]
    host = [e.time_range.elapsed_us() / 1000 for e in steps]
    result = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "size": args.size,
        "crops": args.crops,
        "precision": args.precision,
        "batch": args.batch,
        "steps_recorded": len(steps),
        "host_ms_per_step": statistics.median(host) if host else None,
    }
    if cuda:
        # The device cannot run ahead of the host, so the recorded kernels as a
        # whole, divided by the steps, are the steps' device time.
        kernels = [
            (k.time_range.start, k.time_range.end)
            for k in events
            if k.device_type == DeviceType.CUDA and not getattr(k, "is_user_annotation", False)
            and not k.name.startswith("ProfilerStep")
        ]
        n = max(len(steps), 1)
        if kernels:
            result.update(
                span_ms_per_step=(max(b for _, b in kernels) - min(a for a, _ in kernels)) / 1000 / n,
                busy_ms_per_step=merged_length(kernels) / 1000 / n,
                kernels_per_step=len(kernels) / n,
            )
        table = prof.key_averages()

        def time_of(e) -> float:
            return getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0)

        ranked = sorted(
            (e for e in table if e.device_type == DeviceType.CUDA and not e.key.startswith("ProfilerStep")),
            key=time_of,
            reverse=True,
        )
        result["top"] = [
            {"name": e.key[:90], "ms_per_step": time_of(e) / 1000 / n, "calls": e.count} for e in ranked[: args.top]
        ]
    else:
        table = prof.key_averages()
        ops = (e for e in table if not e.key.startswith("ProfilerStep"))
        ranked = sorted(ops, key=lambda e: e.self_cpu_time_total, reverse=True)
        result["top"] = [
            {"name": e.key[:90], "ms_per_step": e.self_cpu_time_total / 1000 / max(len(steps), 1), "calls": e.count}
            for e in ranked[: args.top]
        ]

    print(f"{result['device']}, torch {result['torch']}: {args.size} px, {args.crops} crops, "
          f"precision {args.precision}, batch {args.batch}, {len(steps)} steps recorded")
    for key in ("host_ms_per_step", "span_ms_per_step", "busy_ms_per_step", "kernels_per_step"):
        if result.get(key) is not None:
            print(f"  {key.replace('_', ' '):20s} {result[key]:9.2f}")
    print("  most time (ms per step, calls in all recorded steps):")
    for row in result["top"]:
        print(f"    {row['ms_per_step']:8.3f}  {row['calls']:6d}  {row['name']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
