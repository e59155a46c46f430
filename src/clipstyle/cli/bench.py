"""``clipstyle bench``: time optimisation steps against the compute floor."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from clipstyle.cli.common import BatchSize, UserError, debug_option, device_option, library_warnings, stop_on_sigterm
from clipstyle.config import (
    CLIP_MODEL,
    CLIP_PRETRAINED,
    COMPILE_MODES,
    MEMORY_FORMATS,
    PRECISIONS,
    PRESETS,
    Settings,
    settings_for,
)

D = Settings()


def _gb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 1e9:.2f} GB"


def _spread(runs: list[float]) -> str:
    return f"{min(runs):.3f}-{max(runs):.3f}" if runs else ""


def _ops(counts: dict) -> str:
    return f"{counts['calls']} calls, {counts['launches']} launching kernels, {counts['host_reads']} host reads"


def format_result(r) -> str:
    """The human-readable table of a BenchResult."""
    w, h = r.size
    lines = [
        ("device", f"{r.device} ({r.processor}, {r.threads} threads, torch {r.torch_version})"),
        (
            "precision",
            f"{r.precision}, {r.memory_format}, compile {r.compile or 'off'}"
            + (", CUDA graph" if r.cuda_graph else ""),
        ),
        (
            "settings",
            f"{w}x{h}, {r.crops} crops of {r.crop_size} px, crop batch {r.crop_batch or 'all'}, batch {r.batch}"
            + (" (auto)" if r.batch_auto else ""),
        ),
        (
            "step",
            f"{r.seconds_per_step:.3f} s (median of {r.repeats}, {_spread(r.step_runs)}; "
            f"first step {r.first_step_seconds:.2f} s)",
        ),
        (
            "floor",
            f"{r.floor_seconds:.3f} s (median, {_spread(r.floor_runs)}): CLIP fwd+bwd "
            f"{r.batch * (r.crops + 1)} x 224 px {r.floor_clip_seconds:.3f} s + VGG-19 to relu5_2 fwd+bwd "
            f"{r.batch} x {w}x{h} {r.floor_vgg_seconds:.3f} s, fp32",
        ),
        ("ratio", f"{r.ratio:.3f} x floor (median step / median floor; paired per repeat: {r.paired_ratio:.3f})"),
    ]
    if r.ops is not None:
        lines.append(("operators", f"{_ops(r.ops)} per step, counted on this device's path"))
    if r.ops_accelerator is not None:
        lines.append(("", f"{_ops(r.ops_accelerator)} on a GPU's path (no host reads), counted here"))
    if r.rejected_runs and None not in r.rejected_runs:
        lines.append(("rejected", "fraction of the crops per step: " + " ".join(f"{x:.2f}" for x in r.rejected_runs)))
    for f in r.forced:
        lines.append(
            (
                f"forced {f['rate']:g}",
                (
                    f"before {f['before_seconds']:.3f} s ({f['before_over_floor']:.3f} x floor), after "
                    f"{f['after_seconds']:.3f} s ({f['after_over_floor']:.3f} x floor): after / before "
                    f"{f['after_over_before']:.3f}; two-pass in {f['two_pass_steps']} of {f['after_steps']} steps"
                ),
            )
        )
    if r.baseline_seconds is not None:
        lines.append(
            (
                "baseline",
                f"{r.baseline_seconds:.3f} s per reference-style step (plain fp32, one crop "
                f"at a time): ours is {r.speedup:.2f}x faster",
            )
        )
    kind = "device peak of the steps" if r.peak_memory_kind == "device" else "process peak RSS"
    lines.append(("peak memory", f"{_gb(r.peak_memory_bytes)} ({kind})"))
    lines.append(("images/min", f"{r.images_per_minute:.3g} at {r.steps} steps, batch {r.batch}"))
    if r.batch1 is not None:
        lines.append(
            (
                "batch 1",
                f"{r.batch1['seconds_per_step']:.3f} s per step, {r.batch1['images_per_minute']:.3g} images/min",
            )
        )
    if r.load_seconds is not None:
        lines.append(
            (
                "load",
                f"{r.load_seconds:.2f} s (models from {r.load_from}; importing open_clip and "
                f"torchvision before it took {r.import_seconds:.2f} s)",
            )
        )
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in lines)


@click.command(context_settings={"max_content_width": 100})
@click.option(
    "--preset",
    type=click.Choice(sorted(PRESETS)),
    default="paper",
    show_default=True,
    help="Settings preset, as for run; explicit options override it.",
)
@click.option("--size", type=click.IntRange(8), default=None, help=f"Output side in pixels. [default: {D.size}]")
@click.option("--crops", type=click.IntRange(0), default=None, help=f"Random crops per step. [default: {D.crops}]")
@click.option(
    "--crop-size", type=click.IntRange(8), default=None, help=f"Crop side in pixels. [default: {D.crop_size}]"
)
@click.option(
    "--steps",
    type=click.IntRange(1),
    default=None,
    help=f"Steps per image, for images per minute (not all run). [default: {D.steps}]",
)
@click.option(
    "--repeats",
    type=click.IntRange(1),
    default=5,
    show_default=True,
    help="Timed steps, each followed by one timed floor pass.",
)
@click.option("--warmup", type=click.IntRange(0), default=2, show_default=True, help="Untimed steps first.")
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default=D.precision,
    show_default=True,
    help="Encoder precision, as for run (the floor is always fp32).",
)
@click.option(
    "--memory-format",
    type=click.Choice(MEMORY_FORMATS),
    default=D.memory_format,
    show_default=True,
    help="Layout of the VGG-19 activations.",
)
@click.option(
    "--compile",
    "compile_",
    type=click.Choice(COMPILE_MODES),
    is_flag=False,
    flag_value="default",
    default=None,
    help="torch.compile the networks, in this mode of torch.compile (alone: default); "
    "reduce-overhead adds CUDA graphs on a GPU. The first step compiles.",
)
@click.option(
    "--cuda-graph",
    is_flag=True,
    default=D.cuda_graph,
    help="Time the graph path: each step recorded once as CUDA graphs and replayed (CUDA only).",
)
@click.option(
    "--crop-batch",
    type=click.IntRange(0),
    default=D.crop_batch,
    show_default=True,
    help="Encode crops in chunks of this many (0: all at once).",
)
@click.option(
    "--batch",
    type=BatchSize(),
    default="1",
    show_default=True,
    metavar="N|auto",
    help="Optimise this many pairs together; above 1, batch 1 is timed too, for images per minute. "
    "auto: as run --batch auto chooses on this device.",
)
@click.option(
    "--baseline", is_flag=True, help="Also time the reference-style step (plain fp32, a Python loop over crops)."
)
@click.option(
    "--force-reject",
    "force_reject",
    default="",
    metavar="RATES",
    help="Also time steps with these fractions of the crops forced to count as rejected (comma-separated, "
    "e.g. 0,0.5,0.9), the single CLIP pass (before) alternating with the automatic two-pass path "
    "(after).",
)
@device_option
@click.option(
    "--threads",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="CPU threads for PyTorch (0: PyTorch's default, one per physical core).",
)
@click.option("--clip-model", default=CLIP_MODEL, show_default=True, help="open_clip architecture (random weights).")
@click.option(
    "--clip-weights",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="Load CLIP from this local file instead (also times loading; needs --vgg-weights).",
)
@click.option(
    "--vgg-weights",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="Load VGG-19 from this local file instead (also times loading; needs --clip-weights).",
)
@click.option(
    "--cached",
    is_flag=True,
    help="Load the models from their caches (open_clip's or Hugging Face's, and torch hub's), as run "
    "does without --clip-weights, and time it. Never downloads: an empty cache is an error.",
)
@click.option("--clip-pretrained", default=CLIP_PRETRAINED, show_default=True, help="open_clip tag for --cached.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@debug_option
@stop_on_sigterm
def bench(
    preset,
    size,
    crops,
    crop_size,
    steps,
    repeats,
    warmup,
    precision,
    memory_format,
    compile_,
    cuda_graph,
    crop_batch,
    batch,
    baseline,
    force_reject,
    device,
    threads,
    clip_model,
    clip_weights,
    vgg_weights,
    cached,
    clip_pretrained,
    as_json,
):
    """Time optimisation steps on the real architectures and compare them with the compute floor.

    The floor is one plain fp32 CLIP forward and backward pass over the crops
    and the whole image plus one VGG-19 pass to relu5_2 at the output size;
    steps and floor passes alternate in this process. Weights are random (no
    download) unless --clip-weights and --vgg-weights are given.

    \b
      clipstyle bench --size 256 --crops 16 --device cpu
      clipstyle bench --baseline --batch 4 --json
      clipstyle bench --size 256 --crops 16 --device cpu --force-reject 0,0.5,0.9
    """
    import torch

    from clipstyle.device import resolve_device
    from clipstyle.evaluation.bench import bench_models, run_bench

    if (clip_weights is None) != (vgg_weights is None):
        raise click.UsageError("--clip-weights and --vgg-weights go together")
    if cached and clip_weights is not None:
        raise click.UsageError("--cached loads from the caches, --clip-weights from files: choose one")
    try:
        rates = tuple(float(x) for x in force_reject.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"not a list of numbers: {force_reject!r}", param_hint="--force-reject") from None
    if any(not 0.0 <= x <= 1.0 for x in rates):
        raise click.BadParameter("each rate must be between 0 and 1", param_hint="--force-reject")
    if threads:
        torch.set_num_threads(threads)
    settings = settings_for(
        preset,
        steps=steps,
        size=size,
        crops=crops,
        crop_size=crop_size,
        precision=precision,
        memory_format=memory_format,
        compile=compile_ or "",
        crop_batch=crop_batch,
        cuda_graph=cuda_graph or None,
    )
    dev = resolve_device(device)
    load_seconds = import_seconds = load_from = None
    say = (lambda m: None) if as_json else (lambda m: click.echo(m, err=True))
    if clip_weights is not None or cached:
        # imported first and timed apart: loading is what the models cost, imports are the libraries'
        start = time.perf_counter()
        import open_clip  # noqa: F401
        import torchvision  # noqa: F401

        from clipstyle.models.loading import cached_weights, load_models

        import_seconds = time.perf_counter() - start
        if cached:
            clip_file, vgg_file = cached_weights(clip_model, clip_pretrained)
            missing = [
                what
                for what, f in ((f"CLIP {clip_model}/{clip_pretrained}", clip_file), ("VGG-19", vgg_file))
                if f is None
            ]
            if missing:
                raise UserError(
                    f"{' and '.join(missing)} not in the cache; `clipstyle run` downloads them once,"
                    " or use --clip-weights and --vgg-weights"
                )
            load_from, sources = "caches", {"clip_pretrained": clip_pretrained}
        else:
            load_from, sources = "local files", {"clip_weights": clip_weights, "vgg_weights": vgg_weights}
        say(f"loading models from {load_from}")
        start = time.perf_counter()
        models = load_models(clip_model=clip_model, device=dev, **sources)
        load_seconds = time.perf_counter() - start
    else:
        say("building models with random weights")
        models = bench_models(dev, clip_model)
    batch_auto = batch == "auto"
    if batch_auto:
        from clipstyle.jobs.memory import auto_batch

        batch = auto_batch(settings, dev)
        say(f"--batch auto: {batch}")
    with library_warnings():
        result = run_bench(
            models,
            settings,
            batch=batch,
            warmup=warmup,
            repeats=repeats,
            baseline=baseline,
            force_reject=rates,
            load_seconds=load_seconds,
            progress=say,
        )
    result.load_from, result.import_seconds = load_from, import_seconds
    result.batch_auto = batch_auto
    if as_json:
        click.echo(json.dumps(result.to_dict()))
    else:
        click.echo(format_result(result))
