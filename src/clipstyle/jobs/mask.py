"""``mask``'s work: each photo's region written as an 8-bit greyscale PNG, through the shared batch loop.

An existing output is kept only when it is a mask made for the same photo name with the same
region (its clipstyle record says so); a stylized image or a mask made otherwise there fails
the job with one line unless overwriting. A phrase that selects nothing still gives its mask
(black, or white with --invert-mask) and a warning: the mask is for looking at and touching up.
"""

from __future__ import annotations

import os
from pathlib import Path

from clipstyle.config import MAX_PIXELS
from clipstyle.errors import ClipstyleError
from clipstyle.images import open_image, save_png
from clipstyle.jobs.batch import Events, Summary, Work, job_error, run_jobs
from clipstyle.jobs.resume import read_record
from clipstyle.provenance import stamp
from clipstyle.regions.masks import EMPTY, mask_image, photo_mask
from clipstyle.regions.region import Region


class _WriteMasks(Work):
    """The mask command's work: each photo's mask as an 8-bit greyscale PNG at the photo's own size."""

    def __init__(self, region: Region, clip, overwrite: bool, max_pixels: int):
        self.region, self.clip, self.overwrite, self.max_pixels = region, clip, overwrite, max_pixels

    def record(self, job, status: str, error: str | None = None) -> dict:
        return {
            "input": str(job.input.path),
            "output": str(job.output),
            "status": status,
            "error": error,
            "region": self.region.record(),
        }

    def identity(self, job, path: Path) -> dict:
        return {"input": Path(job.input.rel).name, "region": self.region.record()}

    def existing(self, job) -> tuple[str, str] | None:
        if not self.overwrite and os.path.lexists(job.output):
            made = read_record(job.output)
            if made is not None and not is_mask_record(made):
                return "failed", (
                    f"{job.output}: exists, made by clipstyle but not a mask; --overwrite replaces it, "
                    "or choose another output (-o)"
                )
        return super().existing(job)

    def process(self, batch: list[tuple], events: Events) -> list[dict]:
        return [self._write(job, events) for job, _ in batch]

    def _write(self, job, events: Events) -> dict:
        record = self.record(job, "ok")
        try:
            photo = open_image(job.input.path, self.max_pixels).image
            found = photo_mask(self.region, photo, self.clip, allow_empty=True)
            if float((1 - found if self.region.invert else found).max()) < EMPTY:
                shade = "white (--invert-mask)" if self.region.invert else "black"
                events.note(job, f"--where {self.region.where!r} selects nothing in this image: its mask is {shade}")
            meta = stamp(input=Path(job.input.rel).name, region=self.region.record())
            save_png(mask_image(found), job.output, meta, overwrite=self.overwrite)
            record["size"] = list(photo.size)
        except ClipstyleError as exc:
            record.update(status="failed", error=job_error(job, exc))
        return record


def is_mask_record(record: dict) -> bool:
    """Whether a clipstyle record (resume.read_record) is a mask's: a region and no prompt or style."""
    return "region" in record and not {"prompt", "settings", "style_sha256"} & set(record)


def write_masks(
    jobs,
    region: Region,
    clip,
    report,
    overwrite: bool = False,
    max_pixels: int = MAX_PIXELS,
    events: Events | None = None,
) -> Summary:
    """Write each job's mask (``jobs``: anything with ``.input`` and ``.output``, e.g. pairs.RunJob) as an
    8-bit greyscale PNG at the input's own size, through the shared batch loop (batch.py): existing
    outputs that are the same mask skipped unless ``overwrite`` (any other file there fails the job),
    a photo that fails is a failed record. ``report``: report.Report."""
    return run_jobs(jobs, _WriteMasks(region, clip, overwrite, max_pixels), report, events)
