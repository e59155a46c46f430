"""The one batch loop of ``run`` and ``apply``: skip what exists, isolate failures, records, summary.

A command's work is a list of jobs, each with an ``input`` (inputs.InputFile)
and an ``output`` path, and a :class:`Work` that says how to prepare one job
and how to process a batch of prepared jobs. :func:`run_jobs` does the rest
the same way for every command: a job whose output exists is skipped (unless
overwriting), a job that fails - while preparing, processing or saving - ends
in a failed record and the others go on, an allocation failure frees memory
and names the sizes to lower, and every finished job is counted, written to
the report and announced to the events, as it ends.

This module never prints; what a user sees goes through :class:`Events`.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path

from clipstyle.errors import ClipstyleError, format_error, is_out_of_memory


@dataclass
class Summary:
    ok: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    records: list[dict] = field(default_factory=list)

    def add(self, record: dict) -> None:
        """Keep a finished job's record and count it under its status (ok, skipped, failed)."""
        self.records.append(record)
        setattr(self, record["status"], getattr(self, record["status"]) + 1)


class Events:
    """What a batch run reports as it goes; the CLI overrides these to show progress."""

    def started(self, jobs: list, done: int, total: int) -> None:
        """A batch of ``jobs`` starts; ``done`` of ``total`` jobs have ended."""

    def progress(self, job, info) -> None:
        """Progress inside a job: an optimisation step (run) or a rendered tile (apply)."""

    def finished(self, job, record: dict) -> None:
        """A job ended: ``record["status"]`` is ok, skipped or failed."""

    def note(self, job, message: str) -> None:
        """A warning about a job (or about the run, when ``job`` is None)."""


def is_done(output: Path, overwrite: bool) -> bool:
    """Whether a job's output already exists and is to be kept (the job is skipped)."""
    return not overwrite and output.exists()


class Work:
    """How one command prepares and processes its jobs. Subclasses override the methods."""

    batch_size: int = 1
    overwrite: bool = False

    def record(self, job, status: str, error: str | None = None) -> dict:
        """The report record of ``job`` with ``status`` and, when failed, the one-line error."""
        raise NotImplementedError

    def start(self) -> None:
        """Called once, before the first job that is not skipped (e.g. to load models).
        Its errors stop the whole run: nothing could be processed."""

    def prepare(self, job, events: Events):
        """What processing ``job`` needs (e.g. its decoded image). Raises ClipstyleError to fail the job."""
        return None

    def process(self, batch: list[tuple], events: Events) -> list[dict]:
        """Process prepared (job, prepared) pairs; one record per job, in order.

        An exception fails every job of the batch; a job that fails alone (say,
        its file cannot be written) returns a failed record instead.
        """
        raise NotImplementedError

    def out_of_memory(self, batch: list[tuple]) -> str:
        """The message of a batch that ran out of memory: what to lower. A job that ran
        out while being prepared comes as ``[(job, None)]``."""
        return "out of memory"

    def free_memory(self) -> None:
        """After a failed batch: give back what it held."""
        gc.collect()


def run_jobs(jobs: list, work: Work, report, events: Events | None = None) -> Summary:
    """Process every job, skipping existing outputs and isolating failures. ``report``: a report.Report."""
    events = events or Events()
    runner = _Loop(work, report, events, total=len(jobs))
    pending: list[tuple] = []
    started = False
    for job in jobs:
        if is_done(job.output, work.overwrite):
            runner.finish(job, work.record(job, "skipped", f"{job.output} exists"))
            continue
        if not started:
            work.start()
            started = True
        try:
            prepared = work.prepare(job, events)
        except ClipstyleError as exc:
            runner.finish(job, work.record(job, "failed", str(exc)))
            continue
        except Exception as exc:  # an allocation failure while preparing is the job's, like one while processing
            if not is_out_of_memory(exc):
                raise
            work.free_memory()
            runner.finish(job, work.record(job, "failed", f"{job.input.path}: {work.out_of_memory([(job, None)])}"))
            continue
        pending.append((job, prepared))
        if len(pending) >= max(1, work.batch_size):
            runner.process(pending)
            pending = []
    if pending:
        runner.process(pending)
    runner.summary.seconds = time.perf_counter() - runner.start
    return runner.summary


class _Loop:
    """The bookkeeping of one run_jobs call: the summary, the report and the events."""

    def __init__(self, work: Work, report, events: Events, total: int):
        self.work, self.report, self.events, self.total = work, report, events, total
        self.summary = Summary()
        self.start = time.perf_counter()

    def finish(self, job, record: dict) -> None:
        self.summary.add(record)
        self.report.write(record)
        self.events.finished(job, record)

    def process(self, batch: list[tuple]) -> None:
        self.events.started([job for job, _ in batch], len(self.summary.records), self.total)
        try:
            records = self.work.process(batch, self.events)
        except Exception as exc:  # noqa: BLE001 - one batch's failure must not stop the others
            self.work.free_memory()
            message = self.work.out_of_memory(batch) if is_out_of_memory(exc) else format_error(exc)
            records = [self.work.record(job, "failed", f"{job.input.path}: {message}") for job, _ in batch]
        for (job, _), record in zip(batch, records):
            self.finish(job, record)
