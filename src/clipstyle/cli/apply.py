"""``clipstyle apply``: restyle images with saved styles, one forward pass each."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from clipstyle.cli.common import (
    Number,
    UserError,
    close_bar,
    debug_option,
    device_option,
    echo_outcome,
    echo_warning,
    encoding_from_options,
    end_of_run,
    max_pixels_option,
    output_path,
    progress_bar,
    stop_on_sigterm,
    video_options,
)
from clipstyle.cli.mask import region_options
from clipstyle.config import STYLE_SUFFIXES, TILE_OVERLAP


def split_arguments(args: tuple[str, ...], style_options: tuple[Path, ...]) -> tuple[list[str], list[str]]:
    """(styles, images). With --style, every argument is an image; otherwise the
    leading arguments ending in .style or .safetensors are styles."""
    if style_options:
        return [str(s) for s in style_options], list(args)
    n = 0
    while n < len(args) and Path(args[n]).suffix.lower() in STYLE_SUFFIXES:
        n += 1
    return list(args[:n]), list(args[n:])


def mix_from_options(n_styles: int, mix: tuple[float, ...]) -> list[float] | None:
    """--mix values -> one weight per style. Two styles: --mix M gives (1 - M, M).
    N styles: N - 1 values for styles 2..N; the first style gets the rest."""
    if not mix:
        return None
    if n_styles < 2:
        raise click.UsageError("--mix needs two or more styles")
    if len(mix) != n_styles - 1:
        raise click.UsageError(f"{n_styles} styles need {n_styles - 1} --mix value(s) (for styles 2..{n_styles})")
    rest = 1.0 - sum(mix)
    if rest < -1e-9:
        raise click.UsageError(f"--mix values sum to {sum(mix):g}, more than 1")
    return [max(rest, 0.0), *mix]


def _events(quiet: bool):
    from clipstyle import interrupts
    from clipstyle.jobs.batch import Events

    class Progress(Events):
        def __init__(self):
            self.bar = None

        def progress(self, job, info):
            interrupts.check()  # a signal that a library swallowed
            done, total = info.done, info.total
            unit = getattr(info, "unit", "tile")  # a film's frames (FrameProgress), else an image's tiles
            if quiet or (total <= 1 and unit == "tile"):
                return
            if self.bar is None:
                self.bar = progress_bar(total=total or None, desc=job.input.path.name, unit=unit, leave=False)
            if total and self.bar.total != total:
                self.bar.total = total
            self.bar.update(done - self.bar.n)

        def finished(self, job, record):
            self.close()
            w, h = record.get("size") or (0, 0)
            echo_outcome(record, quiet, f"wrote {record['output']} ({w}x{h}, {record.get('seconds') or 0:.1f} s)")

        def note(self, job, message):
            echo_warning(job.input.path if job is not None else None, message, self.bar)

        def close(self):
            bar, self.bar = self.bar, None
            close_bar(bar)

    return Progress()


@click.command(context_settings={"max_content_width": 100})
@click.argument("args", nargs=-1, type=str, metavar="STYLE... IMAGES_OR_VIDEOS...")
@click.option(
    "-s",
    "--style",
    "style_options",
    multiple=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="A style file; repeat for several. With --style, every argument is an image.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(),
    callback=output_path,
    default=None,
    help="Output .png file (one image), video file (one film: .mp4, .mov, .mkv) or folder. "
    "[default: current folder, named <image>-<style>.png or <film>-<style>.mp4, styles joined by '+']",
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
    "--size",
    type=click.IntRange(8),
    default=None,
    help="Longest side of the output in pixels, aspect ratio kept; for films a cap (never enlarged). "
    "[default: the input's own size]",
)
@click.option(
    "--strength",
    type=Number(0, 1),
    default=1.0,
    show_default=True,
    help="How much of the style to apply: a linear blend with the input in pixel space "
    "(0: the input, 1: the fully styled image).",
)
@click.option(
    "--mix",
    type=Number(0, 1),
    multiple=True,
    metavar="W",
    help="Blend the outputs of two styles: (1-W) x first + W x second, in pixel space; 0 gives the "
    "first style exactly, 1 the second. With N styles give N-1 values. [default: equal]",
)
@click.option(
    "--tile",
    type=click.IntRange(0),
    default=None,
    metavar="PX",
    help="Render in overlapping tiles of PX pixels (0: never tile). [default: whole image up to "
    "4 megapixels, tiles of 1024 above]",
)
@click.option(
    "--overlap",
    type=click.IntRange(0),
    default=TILE_OVERLAP,
    show_default=True,
    metavar="PX",
    help="Overlap of neighbouring tiles, blended with smooth ramps.",
)
@click.option(
    "--tile-stats",
    type=click.Choice(["image", "tile"]),
    default="image",
    show_default=True,
    help="Tiles normalise with the whole image's statistics (no seams; about 8x the compute) or "
    "each with its own (one pass; soft seams possible).",
)
@video_options
@device_option
@region_options(with_clip=True)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace existing outputs (default: skip those made with the same settings, refuse others).",
)
@click.option(
    "--report",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Append one JSON line per image to this file.",
)
@max_pixels_option()
@click.option("-q", "--quiet", is_flag=True, help="No progress; errors and warnings only.")
@debug_option
@stop_on_sigterm
def apply(
    args,
    style_options,
    output,
    recursive,
    from_file,
    size,
    strength,
    mix,
    tile,
    overlap,
    tile_stats,
    codec,
    crf,
    video_preset,
    device,
    overwrite,
    report,
    max_pixels,
    quiet,
    region,
    region_clip,
):
    """Restyle IMAGES and VIDEOS (files, folders or globs) with saved styles, one forward pass each.

    Styles are the leading arguments ending in .style or .safetensors (or
    given with --style); the rest are images and films (.mp4, .mov, .mkv,
    .webm, .avi; needs pip install 'clipstyle[video]'). A film is restyled
    frame by frame, streamed, keeping its frame timing, rotation, pixel aspect
    and audio. Styles come from
    `clipstyle run --save-style FILE`; files that could run code when loaded
    (pickles, torch.save) are refused.

    \b
      clipstyle apply ink.style photo.jpg                       # -> ./photo-ink.png, same size as photo.jpg
      clipstyle apply ink.style frames/ -o styled/ --size 1080
      clipstyle apply ink.style fire.style --mix 0.3 photo.jpg  # 70% ink, 30% fire
      clipstyle apply ink.style photo.jpg --strength 0.6 -o soft.png
      clipstyle apply ink.style holiday.mp4 -o holiday-ink.mp4 --size 1280

    Outputs made the same way are skipped, others refused, unless
    --overwrite; a file that fails is reported and the rest go on. Exit code 0 when every image is ok or
    skipped, 1 when any failed, 130 when interrupted.
    """
    import time

    from clipstyle import interrupts
    from clipstyle.device import resolve_device
    from clipstyle.jobs.apply import ApplyOptions, apply_files, plan_outputs
    from clipstyle.jobs.batch import Summary
    from clipstyle.jobs.inputs import check_outputs, collect_inputs
    from clipstyle.jobs.memory import check_render_size
    from clipstyle.jobs.report import Report
    from clipstyle.styles.rendering import plan_tiles
    from clipstyle.styles.stylefile import load_style

    style_paths, images = split_arguments(args, style_options)
    if not style_paths:
        raise click.UsageError("no style: give a .style file first (or --style FILE)")
    if not images and from_file is None:
        raise click.UsageError("no input images (give files, folders or globs after the styles, or --from-file)")
    weights = mix_from_options(len(style_paths), mix)
    try:
        if tile != 0:
            plan_tiles(1 << 20, 1 << 20, tile, overlap)  # checks tile and overlap against each other
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--tile'/'--overlap'") from None
    dev = resolve_device(device)
    if size:
        check_render_size(size, dev)  # a size that cannot fit in memory, before anything is allocated
    clip = region_clip(dev)  # CLIP for --where only
    options = ApplyOptions(
        size=size,
        tile=tile,
        overlap=overlap,
        strength=strength,
        mix=weights,
        overwrite=overwrite,
        max_pixels=max_pixels,
        tile_stats=tile_stats,
        region=region,
        region_clip=clip,
        encoding=encoding_from_options(codec, crf, video_preset),
    )
    styles = [load_style(p) for p in style_paths]  # a bad style stops here, before any image
    inputs = collect_inputs(images, recursive=recursive, from_file=from_file, stdin=sys.stdin, videos=True)
    if not inputs:
        raise UserError("no input images found")
    jobs = plan_outputs(inputs, styles, output)
    check_outputs(jobs, report)
    report_file = Report(report, warn=lambda message: echo_warning(report, message))
    events = _events(quiet)
    summary, interrupted = Summary(), False
    start = time.perf_counter()
    with interrupts.raising():  # from here on files are written: a signal unwinds cleanly
        try:
            apply_files(jobs, styles, options, report_file, events, device=dev, summary=summary)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            events.close()
            report_file.close()
    interrupted = interrupted or interrupts.requested()  # also one kept from a finaliser (interrupts._raise)
    end_of_run(summary, time.perf_counter() - start, quiet, interrupted, report_file.lost)
