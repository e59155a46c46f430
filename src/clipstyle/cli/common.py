"""Pieces shared by the commands: error lines, model options, device handling.

Commands import torch and the library's heavy modules inside their functions, not at the
top of their modules, so that ``clipstyle --help`` answers at once."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import unicodedata
import warnings
from pathlib import Path

import click

from clipstyle.config import (
    CLIP_MODEL,
    CLIP_PRETRAINED,
    MAX_PIXELS,
    VIDEO_CODEC,
    VIDEO_CRF,
    VIDEO_PRESET,
    VIDEO_PRESETS,
)
from clipstyle.errors import ClipstyleError


def error_line(exc: BaseException) -> str:
    """The one line for an error, with the command-line flags that help where there are some."""
    from clipstyle.errors import format_error, is_out_of_memory

    if is_out_of_memory(exc) and not isinstance(exc, ClipstyleError):
        return "out of memory; lower --size or --crops, or use --crop-batch"
    return format_error(exc)


class Number(click.FloatRange):
    """A float option in a range that refuses NaN and infinity first: click's own range
    lets NaN through (every comparison with it is false)."""

    name = "number"

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"must be a number, not {value!r}", param, ctx)
        return super().convert(number, param, ctx)


class UserError(click.ClickException):
    """Prints ``clipstyle: error: <file>: <reason>`` and exits 1."""

    exit_code = 1

    def __init__(self, exc: BaseException | str):
        super().__init__(exc if isinstance(exc, str) else error_line(exc))

    def show(self, file=None) -> None:
        click.echo(one_line(f"clipstyle: error: {self.message}"), err=True)


# line and paragraph breaks, other control characters (escape sequences) and lone surrogates
# (bytes of file names that are not UTF-8): written as escapes, so a file name never breaks a line
_NOT_IN_A_LINE = frozenset({"Cc", "Zl", "Zp", "Cs"})


def one_line(text: str) -> str:
    """``text`` as one printable line: a newline in a file name shows as ``\\n``."""
    return "".join(
        c.encode("unicode_escape").decode("ascii") if unicodedata.category(c) in _NOT_IN_A_LINE else c for c in text
    )


def output_path(_ctx, _param, value: str | None) -> Path | None:
    """``-o``'s callback: the path as a Path. A trailing slash says "folder", which a Path forgets
    (``x.png/`` would become the file ``x.png``): a name ending in a slash that is named like an
    image and is not an existing folder is refused, so that the slash never silently means a file."""
    from clipstyle.images import IMAGE_EXTENSIONS

    if value is None:
        return None
    path = Path(value)
    if value.endswith(("/", os.sep)) and path.suffix.lower() in IMAGE_EXTENSIONS and not path.is_dir():
        raise UserError(
            f"{value}: ends in a slash (a folder) but is named like an image file: give {path} for one "
            "file, or a folder name without an image suffix"
        )
    return path


def echo_outcome(record: dict, quiet: bool, wrote: str) -> None:
    """The line for a finished file, on stderr: ``wrote`` or the skip (unless quiet), or the error."""
    if record["status"] == "ok":
        if not quiet:
            click.echo(one_line(wrote), err=True)
    elif record["status"] == "skipped":
        if not quiet:
            click.echo(one_line(f"skipped {record['error'] or record['output']}"), err=True)
    else:
        click.echo(one_line(f"clipstyle: error: {record['error']}"), err=True)


def end_of_run(
    summary, seconds: float, quiet: bool, interrupted: bool = False, lost: str | None = None, note: str | None = None
) -> None:
    """The summary line that ends every run, interrupted ones too, and the exit code:
    130 when interrupted, 1 when any job failed or report records were lost
    (``lost``: the report's one line about records a full disk kept from it; ``note``: added to the line)."""
    line = f"{summary.ok} ok, {summary.skipped} skipped, {summary.failed} failed in {seconds:.1f} s"
    if note:
        line += f"; {note}"
    if interrupted:
        click.echo(f"clipstyle: interrupted: {line}", err=True)
        raise click.exceptions.Exit(130)
    if not quiet or summary.failed or lost:
        click.echo(line, err=True)
    if lost is not None:  # the run went on; the report is missing what the line says
        raise UserError(lost)
    if summary.failed:
        raise click.exceptions.Exit(1)


def echo_warning(path, message: str, bar=None) -> None:
    """``clipstyle: warning: <file>: <message>`` on stderr (the file when there is one), on a line
    of its own above ``bar`` (a progress bar being drawn), which is drawn again below it."""
    where = f"{path}: " if path is not None else ""
    line = one_line(f"clipstyle: warning: {where}{message}")
    if bar is None:
        click.echo(line, err=True)
        return
    from tqdm import tqdm

    with tqdm.external_write_mode(file=sys.stderr):
        click.echo(line, err=True)


def progress_bar(**options):
    """A progress bar on stderr; a Ctrl-C while it is built waits until it is whole (see interrupts.deferred)."""
    from tqdm import tqdm

    from clipstyle import interrupts

    with interrupts.deferred():
        return tqdm(file=sys.stderr, dynamic_ncols=True, **options)


def close_bar(bar) -> None:
    """Close a bar from progress_bar; a Ctrl-C meanwhile waits until it is closed."""
    from clipstyle import interrupts

    if bar is not None:
        with interrupts.deferred():
            bar.close()


class BatchSize(click.ParamType):
    """--batch: a whole number of pairs (1 or more), or auto."""

    name = "N|auto"

    def convert(self, value, param, ctx):
        if isinstance(value, int) or value == "auto":
            return value
        text = str(value).strip().lower()
        if text == "auto":
            return "auto"
        if text.isdigit() and int(text) >= 1:
            return int(text)
        self.fail(f"{value!r} is neither a whole number of pairs (1 or more) nor auto", param, ctx)


@contextlib.contextmanager
def library_warnings():
    """Warnings the library raises (warnings.warn in clipstyle's modules) shown as our one-line warnings."""
    with warnings.catch_warnings():
        default = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if f"{os.sep}clipstyle{os.sep}" in str(filename):
                echo_warning(None, str(message))
            else:
                default(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def debug_option(f):
    """``--debug`` on a command, as on the group: tracebacks instead of one-line errors."""

    def callback(ctx, _param, value):
        if value:
            ctx.ensure_object(dict)
            root = ctx.find_root()
            root.ensure_object(dict)
            root.obj["debug"] = True
        return value

    return click.option(
        "--debug", is_flag=True, expose_value=False, callback=callback, help="Show full tracebacks for errors."
    )(f)


def max_pixels_option(what: str = "input images"):
    """``--max-pixels``, the same on every command that reads images (decompression bombs)."""
    return click.option(
        "--max-pixels",
        type=click.IntRange(1),
        default=MAX_PIXELS,
        show_default=True,
        help=f"Refuse {what} with more pixels than this (decompression bombs).",
    )


def device_option(f):
    """``--device``, the same on every command that computes."""
    return click.option(
        "--device",
        default="auto",
        show_default=True,
        help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.",
    )(f)


def model_options(f):
    """CLIP/VGG model and weight options, and the device; the same on every command."""
    options = [
        click.option(
            "--clip-model",
            default=CLIP_MODEL,
            show_default=True,
            help="open_clip architecture (ViT-B-32, ViT-B-16, ViT-L-14, ...).",
        ),
        click.option(
            "--clip-pretrained",
            default=CLIP_PRETRAINED,
            show_default=True,
            help="open_clip pretrained tag, downloaded once into open_clip's cache.",
        ),
        click.option(
            "--clip-weights",
            type=click.Path(path_type=Path, dir_okay=False),
            default=None,
            help="Local CLIP weights: an open_clip state dict, safetensors, or OpenAI's original .pt "
            "file. No network is used.",
        ),
        click.option(
            "--vgg-weights",
            type=click.Path(path_type=Path, dir_okay=False),
            default=None,
            help="Local torchvision vgg19 state dict (vgg19-dcbb9e9d.pth). No network is used.",
        ),
        device_option,
    ]
    for option in reversed(options):
        f = option(f)
    return f


def load_models_from_options(clip_model, clip_pretrained, clip_weights, vgg_weights, device="auto", progress=True):
    """The models the model options name, on ``device`` (clipstyle.jobs.plan.ModelSpec loads them)."""
    from clipstyle.jobs.plan import ModelSpec

    return ModelSpec(clip_model, clip_pretrained, clip_weights, vgg_weights).load(device, progress)


def stop_on_sigterm(f):
    """Ctrl-C and SIGTERM stop a command cleanly, exit code 130 (clipstyle.interrupts).

    In the clipstyle command, start-up ends at once on a signal and the command
    switches to raising KeyboardInterrupt where its work begins
    (``interrupts.raising()``); called in-process (click's test runner), the
    whole command raises.
    """

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        from clipstyle import interrupts

        if interrupts.installed():
            return f(*args, **kwargs)
        with interrupts.raising():
            return f(*args, **kwargs)

    return wrapper


def video_options(f):
    """--codec, --crf and --video-preset: how restyled films are encoded (apply, run)."""
    f = click.option(
        "--video-preset",
        "video_preset",
        type=click.Choice(VIDEO_PRESETS),
        default=VIDEO_PRESET,
        show_default=True,
        help="Films: the x264/x265 encoder's speed/size trade-off.",
    )(f)
    f = click.option(
        "--crf",
        type=click.IntRange(0, 51),
        default=VIDEO_CRF,
        show_default=True,
        help="Films: constant quality, lower is better and larger (18: about visually lossless).",
    )(f)
    return click.option(
        "--codec",
        default=VIDEO_CODEC,
        show_default=True,
        help="Films: the video encoder (frames are yuv420p; audio is copied untouched).",
    )(f)


def encoding_from_options(codec: str, crf: int, preset: str):
    """The films' Encoding; a codec this FFmpeg lacks is refused before anything is written."""
    from clipstyle.video import Encoding, encoders

    known = encoders() if codec != VIDEO_CODEC else None  # PyAV loads only for a codec asked for
    if known is not None and codec not in known:
        raise click.BadParameter(f"this FFmpeg has no video encoder {codec!r} (try libx264)", param_hint="'--codec'")
    return Encoding(codec=codec, crf=crf, preset=preset)
