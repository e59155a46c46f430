"""``apply``'s jobs: restyle image files and films with saved styles, one forward pass per image or frame.

One :class:`ApplyJob` per input (:func:`plan_outputs`); :func:`apply_files`
renders them (clipstyle.styles.rendering; a film frame by frame, clipstyle.jobs.film)
through the shared batch loop (batch.py), which skips, isolates failures and reports.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from clipstyle import images as io
from clipstyle.config import MAX_PIXELS, TILE_OVERLAP
from clipstyle.device import compute_info, release_cached_memory
from clipstyle.errors import ClipstyleError
from clipstyle.jobs.batch import Events, Summary, Work, job_error, run_jobs
from clipstyle.jobs.film import FrameProgress, film_fields, restyle_film
from clipstyle.jobs.inputs import InputFile, check_kind, mirrored_output, output_file
from clipstyle.jobs.memory import check_fits, render_bytes
from clipstyle.provenance import file_sha256, stamp
from clipstyle.regions import masks
from clipstyle.styles.rendering import (
    WHOLE_IMAGE_PIXELS,
    count_tiles,
    mix_weights,
    plan_tiles,
    render,
    target_size,
)
from clipstyle.styles.stylefile import Style
from clipstyle.video import Encoding, is_video


@dataclass
class ApplyJob:
    """One input image to restyle into one output."""

    input: InputFile
    output: Path


@dataclass(frozen=True)
class ApplyOptions:
    size: int | None = None  # longest side of the output; None: the input's own size
    tile: int | None = None
    overlap: int = TILE_OVERLAP
    strength: float = 1.0
    mix: list[float] | None = None
    overwrite: bool = False
    max_pixels: int = MAX_PIXELS  # inputs over this are refused (decompression bombs)
    whole_pixels: int = WHOLE_IMAGE_PIXELS  # whole-image pass up to this, tiles above
    tile_stats: str = "image"  # see rendering.render()
    region: object | None = None  # --mask/--where/--preserve-color: a regions.region.Region, None for none
    region_clip: object | None = None  # the CLIP encoder --where uses
    encoding: Encoding = Encoding()  # how films are encoded (--codec, --crf, --video-preset)


@dataclass(frozen=True)
class TileProgress:
    """Progress inside one apply job (batch.Events.progress): network passes over tiles."""

    done: int
    total: int


def plan_outputs(inputs: list[InputFile], styles: Sequence[Style], output: Path | None) -> list[ApplyJob]:
    """One job per input: ``<stem>-<style>.png`` (``.mp4`` for a film; styles joined by '+')
    in the output folder (default: the current one), under the input's subfolder for
    folder inputs; or ``output`` itself when it is a .png (or a video file for a film)
    and there is one input."""
    label = "+".join(s.name for s in styles)
    as_file = output_file(output, len(inputs) == 1, "one image", videos=True)
    check_kind(as_file, inputs)
    folder = Path(".") if output is None else output
    return [ApplyJob(inp, as_file or mirrored_output(folder, inp, label, _suffix(inp))) for inp in inputs]


def _suffix(inp: InputFile) -> str:
    return ".mp4" if is_video(inp.path) else ".png"


def _output_metadata(
    job: ApplyJob, styles: Sequence[Style], options: ApplyOptions, size, identity: dict, compute: dict
) -> dict:
    """The PNG's text chunks: what made it, where (``compute``: device.compute_info), and ``identity``
    (what determines it, see _RenderFiles.identity)."""
    fields = {
        "input": job.input.name,
        "styles": [{"file": s.path.name, "prompt": s.metadata.get("prompt")} for s in styles],
        "mix": mix_weights(len(styles), options.mix),
        "strength": options.strength,
        "size": list(size),
        "tile": options.tile,
        "overlap": options.overlap,
        "tile_stats": options.tile_stats,
        "compute": compute,
        **identity,
        **({"region": options.region.record()} if options.region is not None else {}),
    }
    meta = stamp(**fields)
    prompts = [s.metadata.get("prompt") for s in styles]
    if len(prompts) == 1 and isinstance(prompts[0], str):
        meta["prompt"] = prompts[0]
    return meta


class _RenderFiles(Work):
    """apply's work: decode, render with the styles' networks, save; one image at a time."""

    def __init__(self, styles: Sequence[Style], options: ApplyOptions, device):
        self.styles, self.options, self.device = list(styles), options, device
        self.overwrite = options.overwrite
        self.networks = [s.network.to(device) for s in styles]
        self._style_hashes: list[str | None] | None = None

    def identity(self, job: ApplyJob, path: Path) -> dict:
        """What determines an output: the input's and the styles' bytes and every rendering option."""
        options = self.options
        if self._style_hashes is None:
            self._style_hashes = [_sha256(s.path) for s in self.styles]
        return {
            "input_sha256": _sha256(job.input.path),
            "style_sha256": self._style_hashes,
            "mix": mix_weights(len(self.styles), options.mix),
            "strength": options.strength,
            "longest_side": options.size,
            "tile": options.tile,
            "overlap": options.overlap,
            "tile_stats": options.tile_stats,
            "whole_pixels": options.whole_pixels,
            **({"encoding": options.encoding.record()} if is_video(path) else {}),
        }

    def record(self, job: ApplyJob, status: str, error: str | None = None) -> dict:
        styles, options = self.styles, self.options
        return {
            "input": str(job.input.path),
            "styles": [str(s.path) for s in styles],
            "output": str(job.output),
            "status": status,
            "error": error,
            "seconds": None,
            "size": None,
            "strength": options.strength,
            "mix": mix_weights(len(styles), options.mix) if styles else None,
            "tiles": None,
            **({"region": options.region.record()} if options.region is not None else {}),
        }

    def out_of_memory(self, batch: list[tuple]) -> str:
        return "out of memory; use smaller tiles (--tile 512) or a smaller --size"

    def free_memory(self) -> None:
        super().free_memory()
        release_cached_memory(self.device)

    def process(self, batch: list[tuple], events: Events) -> list[dict]:
        return [self._render(job, events) for job, _ in batch]

    def _render(self, job: ApplyJob, events: Events) -> dict:
        if is_video(job.input.path):
            return self._render_film(job, events)
        options = self.options
        record = self.record(job, "ok")
        t0 = time.perf_counter()
        try:
            loaded = io.open_image(job.input.path, options.max_pixels)
            for note in loaded.notes:
                events.note(job, note)
            size = target_size(*loaded.image.size, options.size)
            check_fits(
                render_bytes(*size), self.device, f"rendering at {size[0]}x{size[1]} px", "lower --size", job.input.path
            )
            x = io.to_tensor(loaded.image, size)
            mask = masks.photo_mask(options.region, loaded.image, options.region_clip)
            del loaded
            plan = plan_tiles(size[1], size[0], options.tile, options.overlap, options.whole_pixels)
            record["tiles"] = count_tiles(size[1], size[0], plan)
            y = render(
                self.networks,
                x,
                tile=options.tile,
                overlap=options.overlap,
                strength=options.strength,
                mix=options.mix,
                max_pixels=options.whole_pixels,
                tile_stats=options.tile_stats,
                device=self.device,
                callback=lambda d, t: events.progress(job, TileProgress(d, t)),
            )
            y = masks.finish(y, x, options.region, mask)
            compute = compute_info(self.device)
            meta = _output_metadata(job, self.styles, options, size, self.identity(job, job.output), compute)
            io.save_png(y, job.output, meta, overwrite=self.overwrite)
            record.update(size=list(size), compute=compute)
        except ClipstyleError as exc:
            record.update(status="failed", error=job_error(job, exc))
        record["seconds"] = round(time.perf_counter() - t0, 4)
        return record

    def _render_film(self, job: ApplyJob, events: Events) -> dict:
        """Every frame of a film through the styles, streamed (clipstyle.jobs.film)."""
        options = self.options
        record = self.record(job, "ok")
        t0 = time.perf_counter()
        try:
            if options.region is not None:
                raise ClipstyleError("--mask, --where and --preserve-color work on images, not on films")
            if options.size:
                check_fits(
                    render_bytes(options.size, options.size),
                    self.device,
                    f"rendering frames at {options.size} px",
                    "lower --size",
                    job.input.path,
                )
            compute = compute_info(self.device)
            meta = _output_metadata(job, self.styles, options, (0, 0), self.identity(job, job.output), compute)
            fields = meta["clipstyle"]
            fields.update(encoding=options.encoding.record(), size=None)
            stats = restyle_film(
                job.input.path,
                job.output,
                self.networks,
                device=self.device,
                longest=options.size,
                strength=options.strength,
                mix=options.mix,
                tile=options.tile,
                overlap=options.overlap,
                tile_stats=options.tile_stats,
                encoding=options.encoding,
                record=fields,
                overwrite=self.overwrite,
                progress=lambda d, t: events.progress(job, FrameProgress(d, t)),
            )
            record.update(size=list(stats.size), compute=compute, **film_fields(stats))
            for note in stats.notes():
                events.note(job, note)
        except ClipstyleError as exc:
            record.update(status="failed", error=job_error(job, exc))
        record["seconds"] = round(time.perf_counter() - t0, 4)
        return record


def _sha256(path: Path) -> str | None:
    try:
        return file_sha256(path)
    except OSError:
        return None  # unreadable: the job fails when the image is read


def apply_files(
    jobs: list[ApplyJob],
    styles: Sequence[Style],
    options: ApplyOptions,
    report,
    events: Events | None = None,
    device=None,
    summary: Summary | None = None,
) -> Summary:
    """Restyle every job's input with ``styles`` (on ``device``, default the CPU) through
    the shared batch loop: what is done skipped, failures isolated. ``report``: a report.Report;
    ``summary``: see batch.run_jobs."""
    work = _RenderFiles(styles, options, torch.device("cpu") if device is None else torch.device(device))
    return run_jobs(jobs, work, report, events, summary)
