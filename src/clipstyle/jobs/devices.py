"""Several devices on one machine: one worker process per device over a shared queue.

Each worker loads the models once on its device and takes batches of pairs
from the queue until it is empty, so a fast device simply takes more work. The
parent process owns the report and everything the user sees. Results do not
depend on which worker ran a pair: every pair carries its own seed, and every
worker uses the same number of CPU threads (:func:`worker_threads`).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_module
import signal
import threading
import time
from dataclasses import dataclass

import torch

from clipstyle.errors import format_error
from clipstyle.jobs.batch import Events, Outcomes, Summary, not_done
from clipstyle.jobs.pairs import RunJob
from clipstyle.jobs.report import Report
from clipstyle.jobs.run import RunOptions, base_record, run_pairs, run_work


@dataclass
class _Forward(Events):
    """Events of a worker, forwarded to the parent."""

    results: object  # multiprocessing queue
    worker: int

    def started(self, jobs, done, total) -> None:
        self.results.put(("started", self.worker, [j.output for j in jobs]))

    def finished(self, job, record) -> None:
        self.results.put(("record", self.worker, record))

    def note(self, job, message) -> None:
        self.results.put(("note", self.worker, (None if job is None else str(job.input.path), message)))


def _stop_with(parent: int) -> None:
    """Stop this worker cleanly on SIGTERM, and send it SIGTERM when ``parent`` dies.

    A parent killed with SIGKILL cannot stop its workers, and an orphan would
    write images that no report records. On Linux the kernel sends the signal
    (a parent-death signal); elsewhere a thread watches the parent's pid. The
    handler raises SystemExit, so a file being written is removed on the way out.
    """

    def stop(signum, frame):
        raise SystemExit(1)

    signal.signal(signal.SIGTERM, stop)
    try:
        import ctypes

        if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0) != 0:  # 1: PR_SET_PDEATHSIG
            raise OSError
    except (OSError, AttributeError):  # not Linux: poll

        def watch():
            while os.getppid() == parent:
                time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent:  # the parent died before the signal was set up
        raise SystemExit(1)


def worker_threads(workers: int) -> int:
    """torch's CPU threads in each of ``workers`` workers: this process's share of its own threads
    (one per physical core by default, or OMP_NUM_THREADS), so that the workers do not oversubscribe
    the cores, at least 1. A local run with that many threads makes the same bytes."""
    return max(1, torch.get_num_threads() // max(1, workers))


def _worker(
    index: int,
    device: str,
    loader,
    settings,
    options: RunOptions,
    tasks,
    results,
    parent: int,
    models_info: dict | None = None,
    threads: int | None = None,
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    _stop_with(parent)
    if threads:
        torch.set_num_threads(threads)
    try:
        card = torch.device(device)
        if card.type == "cuda" and card.index is not None:
            # what uses the current card (cuBLAS handles, a context) uses this one, not cuda:0
            torch.cuda.set_device(card)
        models = loader(device=device)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent as one line
        results.put(("fatal", index, f"{device}: {format_error(exc)}"))
        return
    events = _Forward(results, index)
    while True:
        batch = tasks.get()
        if batch is None:
            break
        run_pairs(batch, models, settings, options, Report(None), events, models_info)
    results.put(("done", index, None))


def run_on_devices(
    pairs: list[RunJob],
    devices: list[str],
    loader,
    settings,
    options: RunOptions,
    report: Report,
    events: Events | None = None,
    models_info: dict | None = None,
    summary: Summary | None = None,
) -> Summary:
    """Like runner.run_pairs, spread over ``devices`` (e.g. ["cuda:0", "cuda:1"]).

    ``loader(device=...)`` loads the models in a worker; it must be picklable
    (a module-level function or a functools.partial of one). ``models_info``
    and ``summary``: as for run_pairs (without ``models_info``, deciding whether
    an existing output is done loads the models here too).
    """
    outcomes = Outcomes(report, events, summary)
    events, summary, finish = outcomes.events, outcomes.summary, outcomes.finish
    start = time.perf_counter()

    work = run_work(loader, settings, options, models_info)  # the skip decision; workers claim and compute
    todo = not_done(pairs, work, finish)
    by_output = {str(p.output): p for p in todo}
    if todo:
        ctx = mp.get_context("spawn")  # CUDA cannot be used in forked children
        tasks, results = ctx.Queue(), ctx.Queue()
        size = max(1, options.batch)
        for i in range(0, len(todo), size):
            tasks.put(todo[i : i + size])
        for _ in devices:
            tasks.put(None)
        threads = worker_threads(len(devices))
        procs = [
            ctx.Process(
                target=_worker,
                args=(i, d, loader, settings, options, tasks, results, os.getpid(), models_info, threads),
                daemon=True,
            )
            for i, d in enumerate(devices)
        ]
        for proc in procs:
            proc.start()
        running, reported = len(procs), set()
        fatal: list[str] = []
        try:
            while running:
                try:
                    kind, worker, payload = results.get(timeout=1.0)
                except queue_module.Empty:
                    dead = [i for i, p in enumerate(procs) if not p.is_alive() and i not in reported]
                    for i in dead:  # a worker that died without saying goodbye
                        reported.add(i)
                        running -= 1
                        fatal.append(f"{devices[i]}: worker stopped unexpectedly (exit code {procs[i].exitcode})")
                    continue
                if kind == "record":
                    finish(by_output.pop(payload["output"], None), payload)
                elif kind == "started":
                    events.started(
                        [by_output[str(o)] for o in payload if str(o) in by_output], len(summary.records), len(pairs)
                    )
                elif kind == "note":
                    path, message = payload
                    events.note(None, f"{path}: {message}" if path else message)
                elif kind in ("done", "fatal"):
                    reported.add(worker)
                    running -= 1
                    if kind == "fatal":
                        fatal.append(payload)
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.terminate()
                proc.join(timeout=5)
        for message in fatal:
            events.note(None, message)
        for pair in list(by_output.values()):  # pairs no worker could take
            finish(
                pair,
                base_record(
                    pair,
                    settings,
                    "failed",
                    f"{pair.input.path}: not processed ({'; '.join(fatal) or 'no worker left'})",
                ),
            )
    summary.seconds = time.perf_counter() - start
    return summary
