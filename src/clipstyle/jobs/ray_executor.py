"""Many machines: pairs handed out to Ray actors, one per GPU (or per group of CPUs).

The driver (the machine where ``clipstyle run`` was typed) owns every file: it
skips existing outputs, reads each input and sends its bytes, and writes what
comes back with the same atomic writes, report records and summary as the local
executor, so no shared file system is needed. Each actor loads the models once
and runs batches of pairs through runner.run_pairs, with a :class:`runner.Files`
that reads the bytes it was sent and returns PNG and style files as bytes.

Batches are handed out as actors finish them (at most ``DEPTH`` waiting per
actor), so a slow GPU or a large image holds back nobody else. An actor that
dies (process killed, node lost) is replaced and its unfinished batches go
back in the queue; a batch is written only when it comes back, so no pair is
written twice and none is lost. Ray is imported only here, and only when used.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from clipstyle import __version__
from clipstyle.errors import ClipstyleError
from clipstyle.images import open_image, png_bytes, write_atomic
from clipstyle.jobs.batch import Events, Outcomes, Summary, claim_job, not_done
from clipstyle.jobs.claims import Leftovers
from clipstyle.jobs.pairs import RunJob
from clipstyle.jobs.report import Report
from clipstyle.jobs.run import Files, RunOptions, base_record, run_pairs, run_work
from clipstyle.provenance import bytes_sha256
from clipstyle.styles.stylefile import style_bytes

INSTALL_HINT = "Ray is not installed; install it with: pip install 'clipstyle[ray]'"
DEPTH = 2  # batches queued on an actor: the next one is already there when one ends
MAX_ATTEMPTS = 3  # a batch whose actor died this many times fails (it may be what kills them)
WAIT_NOTE_S = 60.0  # say so when no actor has started after this long


def import_ray():
    """The ray module, or a ClipstyleError saying in one line how to install it."""
    try:
        import ray
    except ImportError:
        raise ClipstyleError(INSTALL_HINT) from None
    return ray


@dataclass
class Returned:
    """What an actor sends back for one batch."""

    records: list[dict] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)  # path -> bytes, outputs, styles and snapshots
    notes: list[tuple[str | None, str]] = field(default_factory=list)


class _Received(Files):
    """Inputs from the bytes the driver sent; results kept as bytes for the driver to write."""

    def __init__(self, data: dict[str, bytes]):
        self.data = data
        self.written: dict[str, bytes] = {}

    def open_image(self, path, max_pixels):
        return open_image(path, max_pixels, data=self.data[str(path)])

    def save_png(self, image, path, metadata, overwrite):
        self.written[str(path)] = png_bytes(image, metadata)

    def save_style(self, path, network, metadata, overwrite):
        self.written[str(path)] = style_bytes(network, metadata)

    def sha256(self, path) -> str:
        return bytes_sha256(self.data[str(path)])


class _Collect(Events):
    def __init__(self, returned: Returned):
        self.returned = returned

    def finished(self, pair, record) -> None:
        self.returned.records.append(record)

    def note(self, pair, message) -> None:
        self.returned.notes.append((None if pair is None else str(pair.input.path), message))


def stylize_batch(
    models, batch: list[RunJob], data: dict[str, bytes], settings, options: RunOptions, models_info: dict | None = None
) -> Returned:
    """An actor's work on one batch: runner.run_pairs on the bytes it was sent.

    Existing files are the driver's business, so the actor overwrites its
    (in-memory) outputs and claims nothing; the driver claims each pair, applies
    ``--overwrite`` when it writes, and releases the claim after writing.
    """
    returned = Returned()
    files = _Received(data)
    run_pairs(
        batch,
        models,
        settings,
        dataclasses.replace(options, overwrite=True),
        Report(None),
        _Collect(returned),
        models_info=models_info,
        files=files,
        claiming=False,
    )
    returned.files = files.written
    return returned


def instant_batch(
    models, batch: list[RunJob], data: dict[str, bytes], settings, options: RunOptions, png: bytes | None = None
) -> Returned:
    """A stand-in for stylize_batch that returns at once, for measuring the driver and Ray
    without a model (and for tests): every pair ok, its output ``png`` (default: a tiny
    PNG of a colour drawn from the pair's seed). Not reachable from the command line."""
    from PIL import Image

    returned = Returned()
    for pair in batch:
        assert str(pair.input.path) in data  # the driver sent the input
        returned.records.append(base_record(pair, settings, "ok"))
        colour = tuple(pair.seed.to_bytes(8, "little")[:3])
        returned.files[str(pair.output)] = (
            png if png is not None else png_bytes(Image.new("RGB", (8, 8), colour), {"seed": str(pair.seed)})
        )
    return returned


class Worker:
    """One Ray actor: models loaded once, then batch after batch (wrapped by ray.remote when used).

    ``job(models, batch, data, settings, options) -> Returned`` is stylize_batch,
    or a stand-in in tests and benchmarks. ``threads``: torch's CPU threads in this
    actor (the CPUs Ray gives it), whatever the node's core count.
    """

    def __init__(self, loader, device: str, settings, options: RunOptions, job=None, threads: int | None = None):
        self.settings, self.options, self.job = settings, options, job or stylize_batch
        self.models, self.fatal = None, None
        try:
            if threads:
                import torch

                torch.set_num_threads(threads)
            self.models = loader(device=device)
        except BaseException as exc:  # noqa: BLE001 - reported to the driver as one line
            self.fatal = _one_line(exc)

    def info(self) -> dict:
        import socket

        return {
            "version": __version__,
            "host": socket.gethostname(),
            "fatal": self.fatal,
            "device": str(getattr(self.models, "device", None)),
        }

    def run(self, batch: list[RunJob], data: dict[str, bytes]) -> Returned:
        return self.job(self.models, batch, data, self.settings, self.options)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, ClipstyleError):
        return str(exc)
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


@dataclass
class _Batch:
    pairs: list[RunJob]
    attempts: int = 0  # deaths of actors while running it


def default_workers(resources: dict, cpus_per_worker: int) -> tuple[int, bool]:
    """How many actors a cluster holds, and whether they are GPU actors: one per GPU
    when it has GPUs, else one per ``cpus_per_worker`` CPUs."""
    gpus = int(resources.get("GPU", 0))
    if gpus:
        return gpus, True
    return max(1, int(resources.get("CPU", 1)) // max(1, cpus_per_worker)), False


# What a gRPC server (Ray's GCS, or a Ray Client server) answers at once: HTTP/2's client preface and an
# empty SETTINGS frame are met by a SETTINGS frame (9-byte header, type 4). Anything else is not a Ray cluster.
HTTP2_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
CONNECT_TIMEOUT_S = 10.0


def check_address(address: str | None, timeout: float | None = None) -> None:
    """Refuse a cluster address nothing answers at, or something other than Ray answers at:
    Ray itself retries for minutes (a port that accepts and never answers kept it waiting
    over ten). ``timeout``: seconds for each of connecting and the first answer."""
    if not address or address in ("auto", "local"):
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        return  # a form Ray may know and we do not: Ray judges
    import socket

    timeout = CONNECT_TIMEOUT_S if timeout is None else timeout
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock:
            if os.environ.get("RAY_USE_TLS", "0").lower() in ("0", "", "false"):  # TLS: Ray judges
                sock.sendall(HTTP2_HELLO)
                head = b""
                while len(head) < 9:
                    chunk = sock.recv(9 - len(head))
                    if not chunk:
                        break
                    head += chunk
                if len(head) < 9 or head[3] != 4:
                    raise ClipstyleError("something answers there, but not a Ray cluster", address)
    except TimeoutError:
        raise ClipstyleError(f"cannot reach the Ray cluster: no answer in {timeout:g} s", address) from None
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ClipstyleError(f"cannot reach the Ray cluster: {reason}", address) from None


def connect(ray, address: str | None) -> bool:
    """Join the cluster at ``address`` (or RAY_ADDRESS), else start a local instance;
    True when this call started it. The caller's SIGTERM handler is kept."""
    if ray.is_initialized():
        return False
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    address = address or os.environ.get("RAY_ADDRESS") or None
    check_address(address)
    local = {} if address else {"include_dashboard": False}  # options Ray accepts only when starting one
    if not address:  # Ray says it made a token for the instance it starts: not the user's concern
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    try:
        ray.init(address=address, log_to_driver=False, logging_level="WARNING", **local)
    except Exception as exc:  # noqa: BLE001 - connection failures come in many types
        raise ClipstyleError(f"cannot connect to the Ray cluster: {_one_line(exc)}", address) from None
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGTERM, previous)  # ray.init installs its own, which exits with code 15
    return True


def run_with_ray(
    pairs: list[RunJob],
    loader,
    settings,
    options: RunOptions,
    report: Report,
    events: Events | None = None,
    *,
    address: str | None = None,
    workers: int | None = None,
    cpus_per_worker: int = 1,
    device: str = "auto",
    job=None,
    models_info: dict | None = None,
    summary: Summary | None = None,
) -> Summary:
    """Like runner.run_pairs, on the actors of a Ray cluster.

    ``loader(device=...)`` loads the models in an actor; it must be picklable
    and importable there (a module-level function or a functools.partial of one).
    ``workers``: how many actors (default: one per GPU of the cluster, or one
    per ``cpus_per_worker`` CPUs on a cluster without GPUs). ``job`` replaces
    the actors' stylizing (tests and benchmarks only). ``summary``: see batch.run_jobs.
    """
    outcomes = Outcomes(report, events, summary)
    events, summary, finish = outcomes.events, outcomes.summary, outcomes.finish
    start = time.perf_counter()

    work = run_work(None, settings, options, models_info)  # decides, as locally, what is done
    todo = not_done(pairs, work, finish)
    if job is None:
        job = functools.partial(stylize_batch, models_info=models_info)
    if todo:
        ray = import_ray()
        started_here = connect(ray, address)
        try:
            driver = _Driver(
                ray, todo, len(pairs), loader, settings, options, events, finish, workers, cpus_per_worker, device, job
            )
            driver.work = work  # decides again, once a pair is claimed; keeps what is there, made as asked
            driver.run()
        finally:
            if started_here:
                ray.shutdown()
    summary.seconds = time.perf_counter() - start
    return summary


class _Driver:
    """The hand-out loop: keeps every live actor busy, writes what comes back, replaces the dead."""

    def __init__(
        self, ray, todo, total, loader, settings, options, events, finish, workers, cpus_per_worker, device, job
    ):
        self.ray, self.total, self.settings, self.options = ray, total, settings, options
        self.events, self.finish = events, finish
        self.work = None  # run_with_ray sets it: run's batch.Work, which claims and keeps outputs
        self.claims: dict[str, object] = {}  # output -> its claims.Claim, from hand-out until written
        self.leftovers = Leftovers()  # temporary files killed writers left, listed once per folder
        size = max(1, options.batch)
        self.queue = collections.deque(_Batch(todo[i : i + size]) for i in range(0, len(todo), size))
        count, gpu = default_workers(ray.cluster_resources(), cpus_per_worker)
        self.count = workers or count
        self.needs = {"num_gpus": 1 if gpu else 0, "num_cpus": 1 if gpu else cpus_per_worker}
        self.remote = ray.remote(Worker).options(**self.needs, max_restarts=0, max_task_retries=0)
        # torch's threads in each actor: the CPUs it is given, as a local run on that many cores would use
        self.args = (loader, device, settings, options, job, self.needs["num_cpus"])
        self.keys = itertools.count()
        self.actors: dict = {}  # actor key -> handle, the live ones
        self.order: dict = collections.defaultdict(list)  # actor key -> its batches in flight, oldest first
        self.inflight: dict = {}  # result ref -> (actor key, batch)
        self.pending_info: dict = {}  # info ref -> actor key, until the actor has started
        self.ready: set = set()  # actor keys that have started: only they get work
        self.deaths_in_a_row = 0
        self.fatal: list[str] = []
        self.seen_notes: set = set()
        self.done = 0
        self._last_input: tuple[str, bytes] | None = None

    def run(self) -> None:
        for _ in range(self.count):
            self._start_actor()
        began, waited_noted = time.monotonic(), False
        try:
            while self.queue or self.inflight:
                self._hand_out()
                refs = list(self.inflight) + list(self.pending_info)
                if not refs:
                    break  # work left, and no worker working or starting
                ready, _ = self.ray.wait(refs, num_returns=1, timeout=0.5)
                for ref in ready:
                    if ref in self.pending_info:
                        self._started(ref)
                    else:
                        self._returned(ref)
                if (
                    not waited_noted
                    and self.pending_info
                    and len(self.pending_info) == len(self.actors)
                    and time.monotonic() - began > WAIT_NOTE_S
                ):
                    waited_noted = True
                    self.events.note(
                        None,
                        f"no Ray worker has started after {WAIT_NOTE_S:.0f} s; each needs "
                        f"{self._needs()} (is the cluster big enough?)",
                    )
        finally:
            for handle in self.actors.values():
                self.ray.kill(handle, no_restart=True)
            self.actors.clear()
            for held in self.claims.values():  # interrupted: nothing stays claimed
                held.release()
            self.claims.clear()
        reason = "; ".join(dict.fromkeys(self.fatal)) or "no Ray worker left"
        for batch in self.queue:  # pairs no actor could take
            for pair in batch.pairs:
                self._finish(
                    pair, base_record(pair, self.settings, "failed", f"{pair.input.path}: not processed ({reason})")
                )

    def _needs(self) -> str:
        return f"{self.needs['num_gpus']} GPU and {self.needs['num_cpus']} CPU"

    def _start_actor(self) -> None:
        handle = self.remote.remote(*self.args)
        key = next(self.keys)
        self.actors[key] = handle
        self.pending_info[handle.info.remote()] = key

    def _started(self, ref) -> None:
        """An actor answered: it gets work from now on (an actor the cluster cannot place gets none)."""
        key = self.pending_info.pop(ref)
        try:
            info = self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:  # it died while starting
            self._actor_died(key, _one_line(exc))
            return
        if info["fatal"] is not None:  # e.g. its models did not load: no use starting another
            self.fatal.append(info["fatal"])
            self.events.note(None, f"a Ray worker on {info['host']} cannot start: {info['fatal']}")
            self._retire(key)
            return
        self.ready.add(key)
        if info["version"] != __version__:
            self.events.note(
                None,
                f"the Ray worker on {info['host']} runs clipstyle {info['version']}, this "
                f"machine {__version__}: outputs may differ from a local run",
            )

    def _hand_out(self) -> None:
        for key in sorted(self.ready):
            handle = self.actors[key]
            while self.queue and len(self.order[key]) < DEPTH:
                batch = self.queue.popleft()
                data = {}
                ready = []
                for pair in batch.pairs:
                    if not self._claim(pair):
                        continue
                    content = self._read(pair)
                    if isinstance(content, ClipstyleError):
                        self._finish(pair, base_record(pair, self.settings, "failed", str(content)))
                    else:
                        data[str(pair.input.path)] = content
                        ready.append(pair)
                if not ready:
                    continue
                batch.pairs = ready
                self.events.started(ready, self.done, self.total)
                self.inflight[handle.run.remote(ready, data)] = (key, batch)
                self.order[key].append(batch)

    def _claim(self, pair: RunJob) -> bool:
        """Claim ``pair`` on this machine, as a local run does (held until its files are written, so
        a local run on the same folder neither computes it too nor is skipped by a lock a worker
        left); False when it ended here instead: done meanwhile, refused, or another run's."""
        if str(pair.output) in self.claims:  # a batch back from a lost worker: still ours
            return True
        held = claim_job(self.work, pair, self.leftovers)
        if isinstance(held, tuple):
            self._finish(pair, self.work.record(pair, *held))
            return False
        self.claims[str(pair.output)] = held
        return True

    def _read(self, pair: RunJob) -> bytes | ClipstyleError:
        """The input's bytes (the last one is kept: with several prompts it is read once)."""
        key = str(pair.input.path)
        if self._last_input is not None and self._last_input[0] == key:
            return self._last_input[1]
        try:
            data = pair.input.path.read_bytes()
        except OSError:
            try:  # the same one-line reason as a local run gives
                open_image(pair.input.path, self.options.max_pixels)
            except ClipstyleError as exc:
                return exc
            return ClipstyleError("cannot read", pair.input.path)
        self._last_input = (key, data)
        return data

    def _returned(self, ref) -> None:
        key, batch = self.inflight.pop(ref)
        try:
            returned = self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as exc:  # a bug in the actor's code: that batch fails
            self.order[key].remove(batch)
            message = f"internal error in a Ray worker: {_one_line(exc.cause or exc)}"
            for pair in batch.pairs:
                self._finish(pair, base_record(pair, self.settings, "failed", f"{pair.input.path}: {message}"))
            return
        except self.ray.exceptions.RayError as exc:  # the actor or its node is gone
            self._lost(key, batch, exc)
            return
        self.order[key].remove(batch)
        self.deaths_in_a_row = 0
        for path, message in returned.notes:
            if (path, message) not in self.seen_notes:
                self.seen_notes.add((path, message))
                self.events.note(None, f"{path}: {message}" if path else message)
        by_output = {str(p.output): p for p in batch.pairs}
        outputs = {r["output"] for r in returned.records} | {r.get("style") for r in returned.records}
        for path, data in returned.files.items():  # snapshots (--save-every) first, replaced as locally
            if path not in outputs:
                self._write(path, data, overwrite=True)
        for record in returned.records:
            pair = by_output.pop(record["output"])
            if record["status"] == "ok":
                self._write_outputs(pair, record, returned.files)
            self._finish(pair, record)
        for pair in by_output.values():  # cannot happen: run_pairs ends every pair in a record
            self._finish(pair, base_record(pair, self.settings, "failed", f"{pair.input.path}: no result"))

    def _write_outputs(self, pair: RunJob, record: dict, files: dict[str, bytes]) -> None:
        """Write a pair's PNG, then its style file, as run_pairs does locally (outputs already
        there, made as asked, are kept)."""
        try:
            if not self.work.keeps(pair.output):
                self._write(record["output"], files[record["output"]], self.options.overwrite)
        except ClipstyleError as exc:
            record.pop("output_size", None)
            record.pop("style", None)
            record.update(status="failed", error=str(exc))
            return
        if "style" in record:
            data = files[record.pop("style")]
            style = pair.style
            try:
                if not self.work.keeps(style):
                    write_atomic(style, lambda fh: fh.write(data), overwrite=self.options.overwrite)
                record["style"] = str(style)
            except ClipstyleError as exc:
                record.update(status="failed", error=str(exc))

    @staticmethod
    def _write(path: str, data: bytes, overwrite: bool) -> None:
        write_atomic(Path(path), lambda fh: fh.write(data), overwrite=overwrite)

    def _lost(self, key: int, batch: _Batch, exc: BaseException) -> None:
        """``batch`` came back lost with its actor: back in the queue, or failed after MAX_ATTEMPTS."""
        reason = _one_line(exc)
        self._actor_died(key, reason)
        self.order[key].remove(batch)
        if batch.attempts >= MAX_ATTEMPTS:
            for pair in batch.pairs:
                self._finish(
                    pair,
                    base_record(
                        pair,
                        self.settings,
                        "failed",
                        f"{pair.input.path}: a Ray worker died {batch.attempts} times while running it ({reason})",
                    ),
                )
        else:
            self.queue.appendleft(batch)

    def _actor_died(self, key: int, reason: str) -> None:
        """Replace a dead actor, once (the first of its lost batches says so, or its start).

        Only the batch it was running (its oldest) counts the death against itself,
        so a batch that kills every actor it meets ends after MAX_ATTEMPTS.
        """
        if key not in self.actors:  # already replaced, or retired by us
            return
        if self.order[key]:
            self.order[key][0].attempts += 1
        self._retire(key)
        self.deaths_in_a_row += 1
        if self.deaths_in_a_row <= max(3, 2 * self.count):
            self.events.note(None, f"a Ray worker stopped ({reason}); starting another")
            self._start_actor()
        else:
            self.fatal.append(f"{self.deaths_in_a_row} Ray workers died in a row (last: {reason})")

    def _retire(self, key: int) -> None:
        self.ready.discard(key)
        handle = self.actors.pop(key, None)
        if handle is not None:
            self.ray.kill(handle, no_restart=True)
        for ref, actor in list(self.pending_info.items()):
            if actor == key:
                del self.pending_info[ref]

    def _finish(self, pair: RunJob, record: dict) -> None:
        held = self.claims.pop(str(pair.output), None)
        if held is not None:  # its files are written (or it failed): another run may look at it now
            held.release()
        self.done += 1
        self.finish(pair, record)
