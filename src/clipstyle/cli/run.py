"""``clipstyle run``: restyle images after text prompts."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from clipstyle.cli.common import (
    BatchSize,
    Number,
    close_bar,
    debug_option,
    echo_outcome,
    echo_warning,
    encoding_from_options,
    end_of_run,
    library_warnings,
    max_pixels_option,
    model_options,
    output_path,
    progress_bar,
    stop_on_sigterm,
    video_options,
)
from clipstyle.cli.mask import region_options
from clipstyle.config import AUTO_BATCH_MAX, AVOID_WEIGHT, PRECISIONS, PRESETS, TRAIN_FRAMES, Settings

D = Settings()  # every default below is read from config (Settings and its constants): written once


def time_left(seconds: float) -> str:
    """A duration as a person reads it: 40 s, 12 min, 2 h 05 min."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def overall(done: int, total: int, batch: int, pair_seconds: list[float]) -> str:
    """The whole run's part of the progress line: ``[4/40, 1 h 12 min left in all]``, the time from
    the pairs computed so far (a batch of pairs takes about one pair's time); none before the first."""
    if not pair_seconds:
        return f"[{done + 1}/{total}]"
    left = sum(pair_seconds) / len(pair_seconds) * (total - done) / max(1, batch)
    return f"[{done + 1}/{total}, {time_left(left)} left in all]"


def _progress(quiet: bool, steps: int, per_step: bool = True):
    from clipstyle import interrupts
    from clipstyle.jobs.batch import Events

    class Progress(Events):
        def __init__(self):
            self.bar = None
            self.pair_seconds: list[float] = []  # of the pairs computed so far (not skipped ones)
            self.postfix: dict[str, str] = {}  # the losses last read, the latest snapshot

        def started(self, pairs, done, total):
            interrupts.check()  # a signal that a library swallowed
            self.close()
            if quiet or not per_step:
                return
            names = ", ".join(f"{p.input.path.name} x {p.prompt[:30]!r}" for p in pairs[:2])
            names += "" if len(pairs) <= 2 else f" (+{len(pairs) - 2})"
            self.bar = progress_bar(
                total=steps,
                desc=f"{overall(done, total, len(pairs), self.pair_seconds)} {names}",
                unit="step",
                leave=False,
            )

        def progress(self, pair, info):
            interrupts.check()
            if getattr(info, "unit", None) == "frame":  # a film being rendered after its training
                self._frames(pair, info)
                return
            if self.bar is None or info.pair != 0:
                return
            self.bar.update(1)
            if info.losses:
                self.postfix.update({k: f"{v:.4g}" for k, v in info.losses.items()})
                self.bar.set_postfix(self.postfix, refresh=False)

        def snapshot(self, pair, path):
            if self.bar is not None:  # the latest one named on the progress line, to open while it runs
                self.postfix["snapshot"] = str(path)
                self.bar.set_postfix(self.postfix)

        def _frames(self, pair, info):
            if quiet:
                return
            if self.bar is None or self.bar.unit != "frame":
                self.close()
                self.bar = progress_bar(
                    total=info.total or None,
                    desc=f"rendering {pair.input.path.name}",
                    unit="frame",
                    leave=False,
                )
            if info.total and self.bar.total != info.total:
                self.bar.total = info.total
            self.bar.update(info.done - self.bar.n)

        def finished(self, pair, record):
            self.close()  # the outcome on a line of its own, never after the bar's
            if record["status"] == "ok" and record.get("seconds_total"):
                self.pair_seconds.append(record["seconds_total"])
            echo_outcome(record, quiet, f"wrote {record['output']} ({record.get('seconds_total') or 0:.1f} s)")

        def note(self, pair, message):
            echo_warning(pair.input.path if pair is not None else None, message, self.bar)

        def close(self):
            self.postfix = {}
            bar, self.bar = self.bar, None
            close_bar(bar)

    return Progress()


@click.command(context_settings={"max_content_width": 100})
@click.argument("images", nargs=-1, type=str)
@click.option(
    "-p",
    "--prompt",
    "prompts",
    multiple=True,
    metavar="TEXT",
    help="Style prompt; repeat for several (each image is restyled with each prompt).",
)
@click.option(
    "--style-image",
    "style_images",
    multiple=True,
    metavar="FILE",
    help="A painting or picture whose style to take; repeatable. Each is one more output per image, "
    "like a prompt (with --blend, part of the one blended target).",
)
@click.option(
    "--blend",
    is_flag=True,
    help="Train one network per image towards all prompts and style images together, weighted: "
    '\'-p "starry night:0.7" -p "watercolor:0.3"\' (no weight: 1; write \\: for a colon before a number).',
)
@click.option(
    "--avoid",
    multiple=True,
    metavar="TEXT",
    help='Push the style away from what TEXT names; repeatable. E.g. --avoid "written text, letters, watermark" '
    "against the words CLIP paints in.",
)
@click.option(
    "--avoid-weight",
    type=Number(0),
    default=AVOID_WEIGHT,
    show_default=True,
    help="Weight of --avoid against the style's own directional loss (under 1 the style always leads).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(),
    callback=output_path,
    default=None,
    help="Output .png file (one image, one prompt), video file (one film: .mp4, .mov, .mkv) or folder. "
    "[default: current folder, named <image>-<prompt>.png or <film>-<prompt>.mp4]",
)
@click.option("-r", "--recursive", is_flag=True, help="Descend into subfolders of folder inputs.")
@click.option(
    "--from-file",
    type=str,
    default=None,
    metavar="LIST",
    help="Read input paths from LIST, one per line ('-' for standard input).",
)
@click.option(
    "--preset",
    type=click.Choice(sorted(PRESETS)),
    default="paper",
    show_default=True,
    help="paper: the paper's settings. draft: 100 steps, 256 px, 16 crops of 64 px, for CPUs. "
    "Explicit options override the preset.",
)
@click.option("--steps", type=click.IntRange(1), default=None, help=f"Optimisation steps. [default: {D.steps}]")
@click.option(
    "--size",
    type=click.IntRange(16),
    default=None,
    help=f"Longest side in pixels (aspect ratio kept, rounded to a multiple of 8). [default: {D.size}]",
)
@click.option("--crops", type=click.IntRange(0), default=None, help=f"Random crops per step. [default: {D.crops}]")
@click.option(
    "--crop-size", type=click.IntRange(8), default=None, help=f"Crop side in pixels. [default: {D.crop_size}]"
)
@click.option(
    "--threshold",
    type=Number(0, 2, max_open=True),
    default=D.threshold,
    show_default=True,
    help="Patch loss threshold: patches below it are dropped (the patch loss is in [0, 2]).",
)
@click.option(
    "--lr",
    type=Number(min=0, min_open=True),
    default=D.lr,
    show_default=True,
    help="Adam learning rate (halved at the middle of the run).",
)
@click.option(
    "--lambda-patch",
    type=Number(0),
    default=D.lambda_patch,
    show_default=True,
    help="Weight of the patch directional CLIP loss.",
)
@click.option(
    "--lambda-dir",
    type=Number(0),
    default=D.lambda_dir,
    show_default=True,
    help="Weight of the global directional CLIP loss.",
)
@click.option(
    "--lambda-content",
    type=Number(0),
    default=D.lambda_content,
    show_default=True,
    help="Weight of the VGG-19 content loss.",
)
@click.option(
    "--lambda-tv",
    type=Number(0),
    default=D.lambda_tv,
    show_default=True,
    help="Weight of total variation (raise it if the prompt's words get painted in).",
)
@click.option("--source", default=D.source, show_default=True, help="Neutral text the style direction starts from.")
@click.option(
    "--templates",
    "templates_file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="File of prompt templates, one per line with {} (default: CLIP's 79 ImageNet templates).",
)
@click.option("--no-templates", is_flag=True, help="Encode prompts as they are, without templates.")
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default=D.precision,
    show_default=True,
    help="Encoder precision: auto is fp32 on CPU, bf16 on CUDA (fp16 on cards before Ampere), fp16 on MPS.",
)
@click.option(
    "--crop-batch",
    type=click.IntRange(0),
    default=D.crop_batch,
    show_default=True,
    help="Encode crops in chunks of this many (0: all at once); lowers peak memory.",
)
@model_options
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Base seed; each image x prompt pair derives its own from it, so results repeat.",
)
@click.option(
    "--batch",
    type=BatchSize(),
    default="1",
    show_default=True,
    metavar="N|auto",
    help="Optimise this many image x prompt pairs together (faster on a large GPU). auto: on a GPU as "
    f"many as its free memory holds at --size (at most {AUTO_BATCH_MAX}), 1 elsewhere; the summary line says how many.",
)
@click.option(
    "--cuda-graph",
    is_flag=True,
    default=D.cuda_graph,
    help="Record each optimisation step once as CUDA graphs and replay them (CUDA only; elsewhere the step "
    "runs eagerly, with a warning). Same crops and maths; if recording fails, one warning and the usual path.",
)
@click.option(
    "--devices",
    type=str,
    default=None,
    metavar="LIST",
    help="Comma-separated devices, e.g. cuda:0,cuda:1: one worker process per device over a "
    "shared queue, each loading the models once and using its share of the CPU threads. Overrides --device.",
)
@click.option(
    "--executor",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="local: this machine (--device or --devices). ray: the workers of a Ray cluster, one per GPU "
    "(needs pip install 'clipstyle[ray]').",
)
@click.option(
    "--ray-address",
    type=str,
    default=None,
    metavar="ADDRESS",
    help="The Ray cluster to use (default: RAY_ADDRESS, else a Ray instance started on this machine).",
)
@click.option(
    "--ray-workers",
    type=click.IntRange(1),
    default=None,
    metavar="N",
    help="Ray workers to start. [default: one per GPU of the cluster; without GPUs, one per "
    "--ray-cpus-per-worker CPUs]",
)
@click.option(
    "--ray-cpus-per-worker",
    "ray_cpus",
    type=click.IntRange(1),
    default=None,
    metavar="N",
    help="CPUs of each Ray worker on a cluster without GPUs; it uses as many torch threads, so its "
    "outputs equal a local run's with OMP_NUM_THREADS=N. [default: 1]",
)
@click.option(
    "--shard",
    type=str,
    default=None,
    metavar="K/N",
    help="Process only the K-th of N stable shards of the pairs (for job arrays).",
)
@click.option(
    "--save-every",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    metavar="N",
    help="Also save a numbered snapshot every N steps (0: none).",
)
@click.option(
    "--contrast",
    is_flag=True,
    help="Post-process as the reference code does silently (contrast x1.5, then min-max "
    "rescaling). The paper's figures use it; off by default, so the output is the "
    "network's own image.",
)
@click.option(
    "--save-style",
    type=click.Path(path_type=Path),
    default=None,
    help="Keep the trained network as a style file for `clipstyle apply`: a .style file for one "
    "image and one prompt, else a folder (<output name>.style).",
)
@click.option(
    "--train-on",
    "train_on",
    multiple=True,
    metavar="FILES_OR_FOLDER",
    help="Train one style over these images (files, folders, globs; films give --train-frames frames "
    "each) instead of one per image: each step trains on one of them. Needs --save-style; repeat for more.",
)
@click.option(
    "--train-frames",
    type=click.IntRange(1),
    default=TRAIN_FRAMES,
    show_default=True,
    metavar="K",
    help="Films: train the style on K frames spread evenly over the film, then render every frame.",
)
@video_options
@click.option(
    "--output-size",
    type=str,
    default=None,
    metavar="full|N",
    help="Render the final image with the trained network at the input's own resolution (full) "
    "or with longest side N; training stays at --size. [default: the training size; a film: its own size]",
)
@click.option(
    "--strength",
    type=Number(0, 1),
    default=1.0,
    show_default=True,
    help="How much of the style to apply: a blend of content (0) and styled image (1).",
)
@region_options()
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace existing outputs (default: skip those made with the same settings, refuse others).",
)
@click.option(
    "--report",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Append one JSON line per image x prompt to this file.",
)
@max_pixels_option()
@click.option("-q", "--quiet", is_flag=True, help="No progress bar; errors and warnings only.")
@debug_option
@stop_on_sigterm
def run(
    images,
    prompts,
    style_images,
    blend,
    avoid,
    avoid_weight,
    output,
    recursive,
    from_file,
    preset,
    steps,
    size,
    crops,
    crop_size,
    threshold,
    lr,
    lambda_patch,
    lambda_dir,
    lambda_content,
    lambda_tv,
    source,
    templates_file,
    no_templates,
    precision,
    crop_batch,
    clip_model,
    clip_pretrained,
    clip_weights,
    vgg_weights,
    device,
    seed,
    batch,
    cuda_graph,
    devices,
    executor,
    ray_address,
    ray_workers,
    ray_cpus,
    shard,
    save_every,
    contrast,
    save_style,
    train_on,
    train_frames,
    codec,
    crf,
    video_preset,
    output_size,
    strength,
    overwrite,
    report,
    max_pixels,
    quiet,
    region,
):
    """Restyle IMAGES and films (files, folders or globs) after each --prompt and --style-image.

    A film (.mp4, .mov, .mkv, .webm, .avi; pip install 'clipstyle[video]') trains
    one style on --train-frames frames spread over it, then every frame is
    restyled with it, keeping the film's timing, rotation, pixel aspect and audio.

    \b
      clipstyle run -p "starry night" photo.jpg
      clipstyle run -p "ink wash painting" -p "mosaic" photos/ -o styled/ --report runs.jsonl
      clipstyle run -p "ink wash painting" holiday.mp4 -o holiday-ink.mp4 --save-style ink.style
      clipstyle run -p "ink wash painting" --train-on frames/ --save-style ink.style
      clipstyle run --blend -p "starry night:0.7" --style-image monet.jpg:0.3 photo.jpg
      clipstyle run -p "pop art" photo.jpg --avoid "written text, letters, watermark"

    Outputs made with the same settings are skipped, others refused, unless
    --overwrite; a file that fails is reported and the run goes on. Exit code 0 when every pair is ok or
    skipped, 1 when any failed, 130 when interrupted.
    """
    from clipstyle import interrupts
    from clipstyle.cli.cluster import check_executor
    from clipstyle.config import settings_for
    from clipstyle.jobs.batch import Summary
    from clipstyle.jobs.pairs import parse_shard
    from clipstyle.jobs.plan import Executor, ModelSpec, execute, plan_run
    from clipstyle.jobs.report import Report
    from clipstyle.jobs.run import RunOptions
    from clipstyle.prompts import choose_templates

    if not prompts and not style_images:
        raise click.UsageError("at least one --prompt or --style-image is needed")
    if blend and len(prompts) + len(style_images) < 2:
        raise click.UsageError("--blend needs at least two targets (--prompt or --style-image)")
    if train_on and (images or from_file is not None):
        raise click.UsageError(
            "--train-on trains a style only: leave out the images, and restyle them afterwards with "
            "clipstyle apply STYLE IMAGES"
        )
    if not images and from_file is None and not train_on:
        raise click.UsageError("no input images (give files, folders or globs, or --from-file)")
    # every option is checked before anything is read, loaded or written
    settings = settings_for(
        preset,
        steps=steps,
        size=size,
        crops=crops,
        crop_size=crop_size,
        threshold=threshold,
        lr=lr,
        lambda_patch=lambda_patch,
        lambda_dir=lambda_dir,
        lambda_content=lambda_content,
        lambda_tv=lambda_tv,
        source=source,
        templates=choose_templates(no_templates, templates_file),
        precision=precision,
        crop_batch=crop_batch,
        cuda_graph=cuda_graph or None,
    )
    if settings.crops == 0 and settings.lambda_patch > 0:
        echo_warning(None, "--crops 0: no patches are cut, so the patch loss (the paper's main style term) is off")
    options = RunOptions(
        overwrite=overwrite,
        batch=batch,
        save_every=save_every,
        contrast=contrast,
        max_pixels=max_pixels,
        base_seed=seed,
        output_size=output_size,
        strength=strength,
        region=region,
        train_frames=train_frames,
        encoding=encoding_from_options(codec, crf, video_preset),
    )
    prompts, targets = _targets(prompts, style_images, blend, max_pixels)
    shard_kn = parse_shard(shard) if shard else None
    check_executor(executor, devices, ray_address, ray_workers, ray_cpus, device)
    device_names = _device_list(devices, "--devices") if devices is not None else None
    if executor == "ray":
        where = Executor(
            "ray", device, ray_address=ray_address, ray_workers=ray_workers, ray_cpus_per_worker=ray_cpus or 1
        )
    elif device_names:
        where = Executor("devices", devices=tuple(device_names))
    else:  # an absent device fails here, before anything is written
        where = Executor("local", str(_device_list(device, "--device")[0]))
    plan = plan_run(
        list(images),
        list(prompts),
        output=output,
        settings=settings,
        options=options,
        models=ModelSpec(clip_model, clip_pretrained, clip_weights, vgg_weights),
        executor=where,
        recursive=recursive,
        from_file=from_file,
        stdin=sys.stdin,
        shard=shard_kn,
        save_style=save_style,
        report=report,
        videos=True,
        train_on=list(train_on) or None,
        targets=targets,
        avoid=tuple(avoid),
        avoid_weight=avoid_weight,
    )
    report_file = Report(report, warn=lambda message: echo_warning(report, message))
    if executor == "ray":
        from clipstyle.cli.cluster import Overall

        events = Overall(quiet, len(plan.pairs))
    else:
        events = _progress(quiet, settings.steps, per_step=not devices)
    summary, interrupted = Summary(), False
    start = time.perf_counter()
    with interrupts.raising(), library_warnings():  # from here on files are written: a signal unwinds cleanly
        try:
            execute(plan, report_file, events, summary)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            events.close()
            report_file.close()
    note = f"--batch auto: {summary.batch} pairs per batch" if batch == "auto" and summary.batch else None
    interrupted = interrupted or interrupts.requested()  # also one kept from a finaliser (interrupts._raise)
    end_of_run(summary, time.perf_counter() - start, quiet, interrupted, report_file.lost, note)


def _targets(prompts, style_images, blend: bool, max_pixels: int):
    """The jobs' targets: (plain prompts, Targets). Without --blend every prompt and every style
    image is a job of its own; with it, all of them are one job, each with its ``:weight``
    (prompts first, then style images). Style images are read (and checked) here, before
    anything is written; --avoid joins every job in plan_run."""
    from clipstyle.jobs.plan import check_prompts
    from clipstyle.method.targets import StyleImage, Target, Targets
    from clipstyle.prompts import split_weight

    if not blend:
        check_prompts(list(prompts))
        return list(prompts), [Targets((Target(image=StyleImage.open(f, max_pixels)),)) for f in style_images]
    parts = []
    for text in prompts:
        body, weight = split_weight(text)
        check_prompts([body])
        parts.append(Target(body, weight=1.0 if weight is None else weight))
    for name in style_images:
        path, weight = split_weight(name)
        parts.append(Target(image=StyleImage.open(path, max_pixels), weight=1.0 if weight is None else weight))
    return [], [Targets(tuple(parts))]


def _device_list(devices: str, option: str) -> list[str]:
    """--devices LIST -> device names, each checked (an absent device fails here, before any work)."""
    from clipstyle.device import resolve_device

    names = [d.strip() for d in devices.split(",") if d.strip()]
    if not names:
        raise click.BadParameter(f"names no device: {devices!r}", param_hint=f"'{option}'")
    for name in names:
        resolve_device(name)
    return names
