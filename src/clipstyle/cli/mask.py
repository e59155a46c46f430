"""``clipstyle mask``: write the mask that ``--where`` makes; and the region options of run and apply."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from clipstyle.cli.common import (
    Number,
    UserError,
    debug_option,
    device_option,
    echo_outcome,
    echo_warning,
    max_pixels_option,
    output_path,
    stop_on_sigterm,
)
from clipstyle.config import FEATHER, MAX_FEATHER


def make_region(mask, where, invert, feather, preserve_colour):
    """The options as a clipstyle.regions.region.Region (None when none is given), checked: a missing,
    unreadable or empty mask file, an empty phrase or a lone --invert-mask stop here."""
    from clipstyle.regions.region import Region

    if mask is None and where is None and not preserve_colour:
        if invert:
            raise UserError("--invert-mask needs --mask or --where")
        return None
    region = Region(mask=mask, where=where, invert=invert, feather=feather, preserve_colour=preserve_colour)
    region.check()
    return region


def clip_options(f):
    """The CLIP model options of a command that loads CLIP only for --where."""
    for option in reversed(
        [
            click.option(
                "--clip-model",
                default="ViT-B-32",
                show_default=True,
                help="open_clip architecture --where uses (a vision transformer).",
            ),
            click.option(
                "--clip-pretrained",
                default="openai",
                show_default=True,
                help="open_clip pretrained tag for --where, downloaded once into open_clip's cache.",
            ),
            click.option(
                "--clip-weights",
                type=click.Path(path_type=Path, dir_okay=False),
                default=None,
                help="Local CLIP weights for --where (open_clip state dict, safetensors, or OpenAI's .pt).",
            ),
        ]
    ):
        f = option(f)
    return f


def load_where_clip(region, clip_model, clip_pretrained, clip_weights, device):
    """The CLIP encoder that ``--where`` needs, or None without ``--where``."""
    if region is None or region.where is None:
        return None
    from clipstyle.models.loading import load_clip
    from clipstyle.regions.where import phrase_warnings

    clip = load_clip(clip_model, clip_pretrained, clip_weights, device)
    for warning in phrase_warnings(clip, region.where):
        echo_warning(None, warning)
    return clip


def region_options(with_clip: bool = False):
    """--mask, --invert-mask, --feather, --where and --preserve-color on a command, which gets them
    as one ``region`` argument (a clipstyle.regions.region.Region, or None). ``with_clip``: also the CLIP
    options for commands without a CLIP of their own, given as ``region_clip(device)``, a loader."""

    def decorate(f):
        @functools.wraps(f)
        def wrapper(*args, mask, invert_mask, feather, where, preserve_colour, **kwargs):
            region = make_region(mask, where, invert_mask, feather, preserve_colour)
            if with_clip:
                names = (kwargs.pop("clip_model"), kwargs.pop("clip_pretrained"), kwargs.pop("clip_weights"))
                kwargs["region_clip"] = functools.partial(load_where_clip, region, *names)
            return f(*args, region=region, **kwargs)

        options = [
            click.option(
                "--mask",
                type=click.Path(path_type=Path, dir_okay=False),
                default=None,
                metavar="FILE",
                help="Stylize only where this greyscale image is white (black keeps the photo, grey "
                "blends; an alpha channel, if any, is the mask). Resized to each photo.",
            ),
            click.option("--invert-mask", is_flag=True, help="Flip the mask (of --mask, --where, or both)."),
            click.option(
                "--feather",
                type=Number(0, MAX_FEATHER),
                default=FEATHER,
                show_default=True,
                metavar="PX",
                help="Soften the mask's edges over about PX output pixels (0: as it is).",
            ),
            click.option(
                "--where",
                type=str,
                default=None,
                metavar="TEXT",
                help='Stylize only what TEXT names ("the sky"), found by the run\'s own CLIP. With '
                "--mask: only inside both.",
            ),
            click.option(
                "--preserve-color",
                "--preserve-colour",
                "preserve_colour",
                is_flag=True,
                help="Keep the photo's colours: take only luminance (light and texture) from the style.",
            ),
        ]
        for option in reversed(options):
            wrapper = option(wrapper)
        return clip_options(wrapper) if with_clip else wrapper

    return decorate


@click.command(context_settings={"max_content_width": 100})
@click.argument("images", nargs=-1, type=str)
@click.option("--where", required=True, metavar="TEXT", help='What to find, e.g. "the sky".')
@click.option(
    "-o",
    "--output",
    type=click.Path(),
    callback=output_path,
    default=None,
    help="Output .png file (one image) or folder. [default: current folder, named <image>-mask-<text>.png]",
)
@click.option("--invert-mask", is_flag=True, help="Write the mask of everything but TEXT.")
@click.option("-r", "--recursive", is_flag=True, help="Descend into subfolders of folder inputs.")
@device_option
@click.option("--overwrite", is_flag=True, help="Replace existing outputs (default: skip them).")
@max_pixels_option()
@click.option("-q", "--quiet", is_flag=True, help="Errors and warnings only.")
@clip_options
@click.option(
    "--vgg-weights",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    expose_value=False,
    help="Accepted and ignored (mask uses no VGG), so scripts can pass run's weight options as they are.",
)
@debug_option
@stop_on_sigterm
def mask(
    images,
    where,
    output,
    invert_mask,
    recursive,
    device,
    overwrite,
    max_pixels,
    quiet,
    clip_model,
    clip_pretrained,
    clip_weights,
):
    """Write the mask that --where TEXT makes for each of IMAGES, as an 8-bit greyscale PNG at the
    image's own size (white: TEXT), to look at, touch up in any editor and pass back with --mask.
    A phrase that selects nothing still writes its mask (black; white with --invert-mask) and warns.
    An existing output is skipped only when it is this same mask; any other file there is an error
    unless --overwrite.

    \b
      clipstyle mask --where "the sky" photo.jpg -o sky.png
      clipstyle run -p "starry night" photo.jpg --mask sky.png     # same as --where "the sky"
    """
    from clipstyle.device import resolve_device
    from clipstyle.jobs.batch import Events
    from clipstyle.jobs.inputs import check_outputs, collect_inputs
    from clipstyle.jobs.mask import write_masks
    from clipstyle.jobs.pairs import plan_pairs
    from clipstyle.jobs.report import Report
    from clipstyle.regions.region import Region

    if not images:
        raise click.UsageError("no input images")
    region = Region(where=where, invert=invert_mask, feather=0.0)
    region.check()
    dev = resolve_device(device)
    inputs = collect_inputs(list(images), recursive=recursive)
    if not inputs:
        raise UserError("no input images found")
    jobs = plan_pairs(inputs, [f"mask {where}"], output, 0)  # names <image>-mask-<text>.png
    check_outputs(jobs)
    clip = load_where_clip(region, clip_model, clip_pretrained, clip_weights, dev)

    class Outcomes(Events):
        def finished(self, job, record):
            echo_outcome(record, quiet, f"wrote {record['output']}")

        def note(self, job, message):
            echo_warning(job.input.path if job is not None else None, message)

    summary = write_masks(
        jobs, region, clip, Report(None), overwrite=overwrite, max_pixels=max_pixels, events=Outcomes()
    )
    if summary.failed:
        sys.exit(1)
