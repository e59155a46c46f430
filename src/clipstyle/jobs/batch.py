"""The one batch loop of ``run`` and ``apply``: skip what is done, isolate failures, records, summary.

A command's work is a list of jobs, each with an ``input`` (inputs.InputFile)
and an ``output`` path, and a :class:`Work` that says how to prepare one job
and how to process a batch of prepared jobs. :func:`run_jobs` does the rest
the same way for every command: a job whose outputs all exist, made the same
way, is skipped, and one whose output exists made otherwise fails with one
line (:meth:`Work.existing`, unless overwriting); a job is claimed before it
is computed, so that runs sharing a folder share the work (claims.py); a job
that fails - while preparing, processing or saving - ends in a failed record
and the others go on, an allocation failure frees memory and names the sizes
to lower, and every finished job is counted, written to the report and
announced to the events, as it ends.

This module never prints; what a user sees goes through :class:`Events`.
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from clipstyle.errors import ClipstyleError, format_error, is_out_of_memory
from clipstyle.jobs.claims import Claim, Leftovers, LockError, claim
from clipstyle.jobs.inputs import make_folders, remove_if_empty
from clipstyle.jobs.resume import mismatch


@dataclass
class Summary:
    ok: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    records: list[dict] = field(default_factory=list)
    batch: int | None = None  # the largest batch size a job ran in (run: --batch, or what auto chose)

    def add(self, record: dict) -> None:
        """Keep a finished job's record and count it under its status (ok, skipped, failed)."""
        self.records.append(record)
        if record.get("batch"):
            self.batch = max(self.batch or 0, record["batch"])
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

    def snapshot(self, job, path: Path) -> None:
        """An intermediate image of ``job`` was written to ``path`` (run --save-every)."""


class Work:
    """How one command prepares and processes its jobs. Subclasses override the methods."""

    batch_size: int = 1
    overwrite: bool = False
    _kept: frozenset = frozenset()  # existing outputs verified by existing(), kept when saving

    def outputs(self, job) -> list[Path]:
        """Every file ``job`` is asked to write: it is done only when all of them exist."""
        return [job.output]

    def identity(self, job, path: Path) -> dict:
        """What determines ``path`` (one of the job's outputs), as recorded in the file
        (resume.py): an existing file that records the same values is kept."""
        return {}

    def existing(self, job) -> tuple[str, str] | None:
        """What the files already there mean for ``job`` - the one place that decides:
        None to process it; ("skipped", why) when every output it asks for exists, made
        the same way; ("failed", why) when one exists made otherwise (or not by clipstyle).

        Existing outputs of a job that is processed all the same (another of its
        outputs is missing) are kept: :meth:`keeps` says so when saving.
        """
        if self.overwrite:
            return None
        paths = self.outputs(job)
        present = [p for p in paths if os.path.lexists(p)]
        for path in present:
            problem = mismatch(path, lambda: self.identity(job, path))
            if problem:
                return "failed", f"{path}: {problem}; --overwrite replaces it, or choose another output (-o)"
        if present and len(present) == len(paths):
            return "skipped", f"{job.output}: exists, made with these settings"
        self._kept = self._kept | set(present)
        return None

    def keeps(self, path: Path) -> bool:
        """Whether ``path`` exists, made as asked, and is to be kept rather than written again."""
        return path in self._kept

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


class Outcomes:
    """Where a finished job goes, the same for every executor: counted in the summary, written to
    the report, announced to the events."""

    def __init__(self, report, events: Events | None = None, summary: Summary | None = None):
        self.report, self.events = report, events or Events()
        self.summary = Summary() if summary is None else summary

    def finish(self, job, record: dict) -> None:
        self.summary.add(record)
        self.report.write(record)
        self.events.finished(job, record)


def job_error(job, exc: ClipstyleError) -> str:
    """The one line of a job's failure: the error's own file, else the job's input."""
    return str(exc) if exc.path else f"{job.input.path}: {exc.reason}"


def claim_job(work: Work, job, leftovers: Leftovers, folders: list[Path] | None = None) -> Claim | tuple[str, str]:
    """Claim ``job`` before computing it (claims.py): its Claim, to release once its outputs are
    written; else its record's (status, why): done or refused by what is there (:meth:`Work.existing`),
    made by another run now (skipped), an output folder that cannot be made, or a lock path that is
    not a lock file (failed). ``leftovers``: the run's claims.Leftovers (temporary files killed
    writers left). The output's folder is made here, not when planning (a run that fails first
    leaves none); ``folders`` collects those made, for the run to remove if it writes nothing."""
    verdict = work.existing(job)
    if verdict is not None:
        if verdict[0] == "skipped":
            tidy(work, job, leftovers)
        return verdict
    try:
        made = make_folders(job.output.parent)
    except OSError as exc:
        return "failed", f"{job.output.parent}: cannot create the output folder: {exc.strerror or exc}"
    if folders is not None:
        folders += made
    try:
        held = claim(job.output, also=_others(work, job), leftovers=leftovers)
    except LockError as exc:
        return "failed", str(exc)
    if isinstance(held, str):
        return "skipped", f"{job.output}: another run is making it ({held})"
    verdict = work.existing(job)  # that run may have finished it while we looked
    if verdict is not None:
        held.release()
        return verdict
    return held


def _others(work: Work, job) -> tuple:
    return tuple(p for p in work.outputs(job) if p != job.output)


def tidy(work: Work, job, leftovers: Leftovers) -> None:
    """Remove the temporary files beside a done job's outputs (a writer killed after moving its file
    into place, before removing the temporary name), under the job's claim: never while another run
    holds it (it may be replacing them with --overwrite)."""
    if not any(leftovers.of(path) for path in work.outputs(job)):
        return
    try:
        held = claim(job.output, also=_others(work, job), leftovers=leftovers)
    except LockError:
        return
    if isinstance(held, Claim):
        held.release()


def not_done(jobs: list, work: Work, finish) -> list:
    """The jobs still to process. Each job already done, or refused by what is there
    (:meth:`Work.existing`), is passed to ``finish(job, record)`` instead."""
    todo, leftovers = [], Leftovers()
    for job in jobs:
        verdict = work.existing(job)
        if verdict is None:
            todo.append(job)
        else:
            if verdict[0] == "skipped":
                tidy(work, job, leftovers)
            finish(job, work.record(job, *verdict))
    return todo


def run_jobs(
    jobs: list,
    work: Work,
    report,
    events: Events | None = None,
    summary: Summary | None = None,
    claiming: bool = True,
) -> Summary:
    """Process every job, skipping what is done and isolating failures. ``report``: a report.Report.

    ``summary``: filled in as jobs end (give one to read the counts after an interruption).
    ``claiming``: claim each job before computing it (False where another process owns the output
    files and claims them itself: a Ray worker, whose driver writes what it returns).
    """
    events = events or Events()
    runner = _Loop(work, report, events, total=len(jobs), summary=summary, claiming=claiming)
    try:
        _each_job(jobs, work, events, runner)
    finally:
        for held in runner.claims.values():  # interrupted: nothing stays claimed
            held.release()
        remove_if_empty(runner.folders)  # a run that wrote nothing leaves no new folder behind
    runner.summary.seconds = time.perf_counter() - runner.start
    return runner.summary


def _each_job(jobs: list, work: Work, events: Events, runner: _Loop) -> None:
    pending: list[tuple] = []
    started = False
    for job in jobs:
        verdict = runner.claim(job)
        if verdict is not None:
            runner.finish(job, work.record(job, *verdict))
            continue
        if not started:
            work.start()
            started = True
        try:
            prepared = work.prepare(job, events)
        except ClipstyleError as exc:
            runner.finish(job, work.record(job, "failed", job_error(job, exc)))
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


class _Loop:
    """The bookkeeping of one run_jobs call: the summary, the report and the events."""

    def __init__(
        self, work: Work, report, events: Events, total: int, summary: Summary | None = None, claiming: bool = True
    ):
        self.work, self.events, self.total = work, events, total
        self.outcomes = Outcomes(report, events, summary)
        self.summary = self.outcomes.summary
        self.start = time.perf_counter()
        self.claims: dict[int, object] = {}  # id(job) -> its claims.Claim, while it runs
        self.folders: list[Path] = []  # output folders this run made (for its claims and files)
        self.claiming = claiming
        self.leftovers = Leftovers()  # temporary files killed writers left, listed once per folder

    def claim(self, job) -> tuple[str, str] | None:
        """None when ``job`` is to be processed (it is then claimed); else its record's (status, why)."""
        if not self.claiming:
            return self.work.existing(job)
        held = claim_job(self.work, job, self.leftovers, self.folders)
        if isinstance(held, tuple):
            return held
        self.claims[id(job)] = held
        return None

    def finish(self, job, record: dict) -> None:
        held = self.claims.pop(id(job), None)
        if held is not None:
            held.release()
        self.outcomes.finish(job, record)

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
