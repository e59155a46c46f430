"""``apply``'s jobs: restyle image files with saved styles, one forward pass each.

One :class:`ApplyJob` per input (:func:`plan_outputs`); :func:`apply_files`
renders them (render.py) through the shared batch loop (batch.py), which
skips, isolates failures and reports.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from clipstyle import __version__
from clipstyle import images as io
from clipstyle.batch import Events, Summary, Work, run_jobs
from clipstyle.config import MAX_PIXELS, TILE_OVERLAP
from clipstyle.errors import ClipstyleError
from clipstyle.inputs import InputFile, mirrored_output, output_file
from clipstyle.memory import check_fits, render_bytes
from clipstyle.rendering import (
    WHOLE_IMAGE_PIXELS,
    count_tiles,
    mix_weights,
    plan_tiles,
    render,
    target_size,
)
from clipstyle.stylefile import Style


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
    tile_stats: str = "image"  # see render.render()


@dataclass(frozen=True)
class TileProgress:
    """Progress inside one apply job (batch.Events.progress): network passes over tiles."""

    done: int
    total: int


def plan_outputs(inputs: list[InputFile], styles: Sequence[Style], output: Path | None) -> list[ApplyJob]:
    """One job per input: ``<stem>-<style>.png`` (styles joined by '+') in the
    output folder (default: the current one), under the input's subfolder for
    folder inputs; or ``output`` itself when it is a .png and there is one input."""
    label = "+".join(s.name for s in styles)
    as_file = output_file(output, len(inputs) == 1, "one image")
    folder = Path(".") if output is None else output
    return [ApplyJob(inp, as_file or mirrored_output(folder, inp, label)) for inp in inputs]


def _output_metadata(job: ApplyJob, styles: Sequence[Style], options: ApplyOptions, size) -> dict:
    meta = {
        "Software": f"clipstyle {__version__}",
        "clipstyle": {
            "version": __version__, "input": Path(job.input.rel).name,
            "styles": [{"file": s.path.name, "prompt": s.metadata.get("prompt")} for s in styles],
            "mix": mix_weights(len(styles), options.mix), "strength": options.strength, "size": list(size),
            "tile": options.tile, "overlap": options.overlap, "tile_stats": options.tile_stats,
        },
    }
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

    def record(self, job: ApplyJob, status: str, error: str | None = None) -> dict:
        styles, options = self.styles, self.options
        return {"input": str(job.input.path), "styles": [str(s.path) for s in styles], "output": str(job.output),
                "status": status, "error": error, "seconds": None, "size": None,
                "strength": options.strength, "mix": mix_weights(len(styles), options.mix) if styles else None,
                "tiles": None}

    def out_of_memory(self, batch: list[tuple]) -> str:
        return "out of memory; use smaller tiles (--tile 512) or a smaller --size"

    def free_memory(self) -> None:
        import torch

        super().free_memory()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def process(self, batch: list[tuple], events: Events) -> list[dict]:
        return [self._render(job, events) for job, _ in batch]

    def _render(self, job: ApplyJob, events: Events) -> dict:
        options = self.options
        record = self.record(job, "ok")
        t0 = time.perf_counter()
        try:
            loaded = io.open_image(job.input.path, options.max_pixels)
            for note in loaded.notes:
                events.note(job, note)
            size = target_size(*loaded.image.size, options.size)
            check_fits(render_bytes(*size), self.device, f"rendering at {size[0]}x{size[1]} px", "lower --size",
                       job.input.path)
            x = io.to_tensor(loaded.image, size)
            del loaded
            plan = plan_tiles(size[1], size[0], options.tile, options.overlap, options.whole_pixels)
            record["tiles"] = count_tiles(size[1], size[0], plan)
            y = render(self.networks, x, tile=options.tile, overlap=options.overlap, strength=options.strength,
                       mix=options.mix, max_pixels=options.whole_pixels, tile_stats=options.tile_stats,
                       device=self.device, callback=lambda d, t: events.progress(job, TileProgress(d, t)))
            io.save_png(y, job.output, _output_metadata(job, self.styles, options, size), overwrite=self.overwrite)
            record.update(size=list(size))
        except ClipstyleError as exc:
            record.update(status="failed", error=str(exc))
        record["seconds"] = round(time.perf_counter() - t0, 4)
        return record


def apply_files(jobs: list[ApplyJob], styles: Sequence[Style], options: ApplyOptions, report,
                events: Events | None = None, device=None) -> Summary:
    """Restyle every job's input with ``styles`` (on ``device``, default the CPU) through
    the shared batch loop: existing outputs skipped, failures isolated. ``report``: a report.Report."""
    import torch

    work = _RenderFiles(styles, options, torch.device("cpu") if device is None else torch.device(device))
    return run_jobs(jobs, work, report, events)
