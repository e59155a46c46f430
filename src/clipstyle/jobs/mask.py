"""``mask``'s work: each photo's region written as an 8-bit greyscale PNG, through the shared batch loop."""

from __future__ import annotations

from pathlib import Path

from clipstyle.config import MAX_PIXELS
from clipstyle.errors import ClipstyleError
from clipstyle.images import open_image, save_png
from clipstyle.jobs.batch import Events, Summary, Work, job_error, run_jobs
from clipstyle.provenance import stamp
from clipstyle.regions.masks import mask_image, photo_mask
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

    def process(self, batch: list[tuple], events: Events) -> list[dict]:
        return [self._write(job) for job, _ in batch]

    def _write(self, job) -> dict:
        record = self.record(job, "ok")
        try:
            photo = open_image(job.input.path, self.max_pixels).image
            found = photo_mask(self.region, photo, self.clip)
            meta = stamp(input=Path(job.input.rel).name, region=self.region.record())
            save_png(mask_image(found), job.output, meta, overwrite=self.overwrite)
            record["size"] = list(photo.size)
        except ClipstyleError as exc:
            record.update(status="failed", error=job_error(job, exc))
        return record


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
    outputs skipped unless ``overwrite``, a photo that fails is a failed record. ``report``: report.Report."""
    return run_jobs(jobs, _WriteMasks(region, clip, overwrite, max_pixels), report, events)
