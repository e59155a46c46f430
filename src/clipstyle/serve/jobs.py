"""The job queue behind ``clipstyle serve``: one worker thread owns the device.

Jobs run one at a time, first in, first out, so several tabs or users share
one GPU and the models load once per server. The worker reports progress into
the job objects; the web layer only reads them (``state()``) and asks for
changes (``submit_*``, ``stop``, ``delete``).

Stopping a running job: the step callback raises ``_Stopped`` once the stop
flag is set, which ends ``stylize_many`` between two steps; the last image the
callback received is kept as the result. No style file is written for a
stopped job: the network behind that image is not handed to callbacks.

The server's folder holds everything it serves::

    uploads/<id>.bin   checked upload (original bytes), <id>.json its name and size, <id>.jpg a view
    results/<job>.png  the result, with the same PNG metadata as ``clipstyle run`` writes
    results/<job>.style  the trained network (finished stylize jobs)
    results/<job>.json  the job's record: reloaded into the gallery when the server starts

Every file is written atomically (temporary file, then rename), so stopping the
server at any moment leaves no partial file.
"""

from __future__ import annotations

import io
import json
import re
import threading
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

from clipstyle.config import MAX_PIXELS, PRECISIONS, PRESETS, Settings
from clipstyle.errors import ClipstyleError
from clipstyle.images import open_image, save_png, slugify, to_pil, write_atomic
from clipstyle.jobs.apply import ApplyJob, ApplyOptions, apply_files
from clipstyle.jobs.batch import Events as BatchEvents
from clipstyle.jobs.inputs import InputFile
from clipstyle.jobs.pairs import RunJob, pair_seed
from clipstyle.jobs.plan import RunPlan, execute
from clipstyle.jobs.report import Report
from clipstyle.jobs.run import RunOptions, output_metadata
from clipstyle.provenance import bytes_sha256, file_sha256
from clipstyle.styles.stylefile import load_style

# The settings the form shows, with the names of `clipstyle run`'s options.
# Their defaults are read from Settings and PRESETS; the rest stay at Settings' defaults.
FORM_FIELDS = (
    "steps",
    "size",
    "crops",
    "crop_size",
    "threshold",
    "lr",
    "lambda_patch",
    "lambda_dir",
    "lambda_content",
    "lambda_tv",
    "source",
    "precision",
)
CHOICES = {"precision": PRECISIONS}
MAX_PROMPTS = 16  # one job per prompt line
MAX_NAME = 200
JOB_ID = re.compile(r"[0-9a-f]{12}")
UPLOAD_ID = re.compile(r"[0-9a-f]{16}")
# Files the server hands out: results by job id, upload views by upload id. Nothing else.
SERVED = {
    "results": re.compile(r"[0-9a-f]{12}\.(png|style)"),
    "uploads": re.compile(r"[0-9a-f]{16}\.jpg"),
}
VIEW_SIDE = 768  # longest side of the upload's view in the page
FINISHED = ("done", "stopped", "failed", "cancelled", "interrupted")


class _Stopped(BaseException):
    """Raised from the step callback to end a job between two steps (a BaseException, so that the
    batch loop, which turns a batch's errors into failed records, lets it through)."""


def form_schema(help_texts: dict | None = None) -> dict:
    """The form, from Settings: name, type, default, choices and help of each field, and the presets."""
    defaults = Settings()
    fields = []
    for name in FORM_FIELDS:
        value = getattr(defaults, name)
        fields.append(
            {
                "name": name,
                "type": type(value).__name__,
                "default": value,
                "choices": list(CHOICES.get(name, ())) or None,
                "help": (help_texts or {}).get(name),
            }
        )
    return {"fields": fields, "presets": PRESETS, "seed": 0, "max_prompts": MAX_PROMPTS}


def settings_from_form(form: dict) -> Settings:
    """Form values -> Settings: the preset first, then every field given. One-line errors."""
    preset = form.get("preset") or "paper"
    if preset not in PRESETS:
        raise ClipstyleError(f"unknown preset {preset!r} (choose {', '.join(sorted(PRESETS))})")
    values = dict(PRESETS[preset])
    defaults = Settings()
    for name in FORM_FIELDS:
        raw = form.get(name)
        if raw is None or raw == "":
            continue
        kind = type(getattr(defaults, name))
        try:
            if kind is int:
                number = float(raw)
                if not number.is_integer():
                    raise ValueError
                values[name] = int(number)
            elif kind is float:
                values[name] = float(raw)
            else:
                values[name] = str(raw)
        except (TypeError, ValueError, OverflowError):
            what = "an integer" if kind is int else "a number"
            raise ClipstyleError(f"{name.replace('_', ' ')}: {raw!r} is not {what}") from None
    if values.get("precision", "auto") not in PRECISIONS:
        raise ClipstyleError(f"precision must be one of {', '.join(PRECISIONS)}")
    if values.get("size", 16) < 16:
        raise ClipstyleError("size must be at least 16")
    return Settings(**values)


def _seed(form: dict) -> int:
    raw = form.get("seed", 0)
    try:
        seed = int(raw if raw not in (None, "") else 0)
    except (TypeError, ValueError):
        raise ClipstyleError(f"seed: {raw!r} is not an integer") from None
    if not 0 <= seed < 2**63:
        raise ClipstyleError("seed must be between 0 and 2^63 - 1")
    return seed


def clean_name(name: str | None) -> str:
    """An uploaded file's name, as shown and recorded: no folders, no control characters."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(ch for ch in base if ch.isprintable()).strip()[:MAX_NAME]
    return base or "upload"


def describe_error(exc: BaseException, path: Path | None = None, name: str | None = None) -> str:
    """One line for the page. The server's own path of an upload is replaced by the name the user gave it."""
    if isinstance(exc, ClipstyleError):
        if path is not None and exc.path == str(path):
            return f"{name}: {exc.reason}"
        return str(exc)
    if type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower():
        return "out of memory; lower the size or the crops"
    first = (str(exc).splitlines() or [""])[0][:200]
    return f"internal error: {type(exc).__name__}: {first}"


@dataclass
class Job:
    """One request: stylize an upload after a prompt, or apply a finished job's style to an upload."""

    id: str
    kind: str  # "stylize" or "apply"
    upload: str  # upload id
    input_name: str  # the name the photo was uploaded under
    prompt: str
    settings: dict = field(default_factory=dict)  # Settings.to_dict() (stylize) - fills the form again
    preset: str = "paper"
    base_seed: int = 0
    # derived as `clipstyle run` derives it (same photo name, prompt and seed: same image); 63 bits,
    # so JSON readers that use doubles (browsers) get it as text in ``public()``
    seed: int = 0
    style_of: str | None = None  # apply: the job whose style is used
    strength: float = 1.0  # apply: blend with the photo
    status: str = "queued"  # queued, running, done, stopped, failed, cancelled, interrupted
    step: int = 0
    steps: int = 0
    losses: list = field(default_factory=list)  # [step, total loss] pairs
    seconds: float = 0.0
    error: str | None = None
    notes: list = field(default_factory=list)
    created: float = 0.0
    finished: float | None = None
    size: list | None = None  # [width, height] of the result
    png: str | None = None  # file names in results/
    style: str | None = None
    metadata: dict | None = None  # the PNG's text chunks, as written (JSON values stay text: 64-bit seeds)
    preview: int = 0  # bumps each time a new preview image is ready

    def public(self, full: bool = True) -> dict:
        """The job as JSON. ``full=False``: without settings, metadata and notes, for the state that
        is sent at every step (the page fetches a job in full when it needs those)."""
        data = asdict(self)
        data["seed"] = str(self.seed)
        data["eta"] = None
        if self.status == "running" and self.step > 0 and self.steps:
            data["eta"] = round(self.seconds / self.step * (self.steps - self.step), 1)
        if not full:
            for key in ("settings", "metadata", "notes"):
                del data[key]
        return data


class JobQueue:
    """Jobs in first-in, first-out order, run by one worker thread that owns ``models``."""

    def __init__(self, models, folder: str | Path, *, max_pixels: int | None = None, preview_seconds: float = 0.5):
        self.models = models
        self.folder = Path(folder)
        self.uploads = self.folder / "uploads"
        self.results = self.folder / "results"
        self.max_pixels = max_pixels or MAX_PIXELS
        self.preview_seconds = preview_seconds
        self.jobs: dict[str, Job] = {}
        self._queue: deque[str] = deque()
        self._running: str | None = None
        self._previews: dict[str, bytes] = {}
        self._settings: dict[str, Settings] = {}  # of queued stylize jobs
        self._stop: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closing = False
        self.version = 0  # bumps on every change; the event stream sends the state when it moves
        self._thread = threading.Thread(target=self._work, name="clipstyle-worker", daemon=True)
        for sub in (self.uploads, self.results):
            try:
                sub.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ClipstyleError(f"cannot create the server's folder: {exc.strerror or exc}", sub) from None
        self._load_gallery()

    # --- lifetime ---------------------------------------------------------------------------------------

    def start(self) -> JobQueue:
        self._thread.start()
        return self

    def close(self, timeout: float | None = None) -> None:
        """Stop the running job between two steps (nothing of it is written), drop the queue, join the worker."""
        with self._wake:
            self._closing = True
            for job_id in self._queue:
                self.jobs[job_id].status = "cancelled"
            self._queue.clear()
            self._changed()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _changed(self) -> None:
        """Call with the lock held."""
        self.version += 1
        self._wake.notify_all()

    # --- uploads ----------------------------------------------------------------------------------------

    def add_upload(self, data: bytes, name: str | None) -> dict:
        """Check an uploaded photo as the CLI checks its inputs; keep it under its content hash."""
        name = clean_name(name)
        digest = bytes_sha256(data)
        upload_id = digest[:16]
        final = self.uploads / f"{upload_id}.bin"
        tmp = self.uploads / f".{upload_id}.{uuid.uuid4().hex[:8]}.check"
        try:
            tmp.write_bytes(data)
            try:
                loaded = open_image(tmp, self.max_pixels)
            except ClipstyleError as exc:
                raise ClipstyleError(describe_error(exc, tmp, name)) from None
            if not final.exists():
                view = loaded.image.copy()
                view.thumbnail((VIEW_SIDE, VIEW_SIDE))
                buffer = io.BytesIO()
                view.save(buffer, format="JPEG", quality=88)
                write_atomic(self.uploads / f"{upload_id}.jpg", lambda fh: fh.write(buffer.getvalue()), overwrite=True)
                write_atomic(final, lambda fh: fh.write(data), overwrite=True)
        finally:
            tmp.unlink(missing_ok=True)
        info = {
            "id": upload_id,
            "name": name,
            "width": loaded.image.width,
            "height": loaded.image.height,
            "sha256": digest,
            "notes": list(loaded.notes),
        }
        write_atomic(self.uploads / f"{upload_id}.json", lambda fh: fh.write(json.dumps(info).encode()), overwrite=True)
        return info

    def upload_info(self, upload_id: str) -> dict:
        if not isinstance(upload_id, str) or not UPLOAD_ID.fullmatch(upload_id):
            raise ClipstyleError("no such upload: upload the photo again")
        try:
            return json.loads((self.uploads / f"{upload_id}.json").read_text())
        except (OSError, ValueError):
            raise ClipstyleError("no such upload: upload the photo again") from None

    # --- submitting -------------------------------------------------------------------------------------

    def submit_stylize(self, upload_id: str, prompts: list[str], form: dict) -> list[Job]:
        """One job per prompt; every value is checked before any job is queued."""
        info = self.upload_info(upload_id)
        prompts = [p.strip() for p in prompts if isinstance(p, str) and p.strip()]
        if not prompts:
            raise ClipstyleError("the prompt is empty")
        if len(prompts) > MAX_PROMPTS:
            raise ClipstyleError(f"{len(prompts)} prompts: at most {MAX_PROMPTS} at a time")
        settings = settings_from_form(form)
        base_seed = _seed(form)
        preset = form.get("preset") or "paper"
        jobs = [
            Job(
                id=uuid.uuid4().hex[:12],
                kind="stylize",
                upload=upload_id,
                input_name=info["name"],
                prompt=p,
                settings=settings.to_dict(),
                preset=preset,
                base_seed=base_seed,
                seed=pair_seed(base_seed, info["name"], p),
                steps=settings.steps,
                created=time.time(),
            )
            for p in dict.fromkeys(prompts)
        ]
        for job in jobs:
            self._settings[job.id] = settings
        self._enqueue(jobs)
        return jobs

    def submit_apply(self, style_of: str, upload_id: str, strength: float = 1.0) -> Job:
        info = self.upload_info(upload_id)
        source = self.jobs.get(style_of) if isinstance(style_of, str) else None
        if source is None or not source.style:
            raise ClipstyleError("that result has no style file (only finished runs keep one)")
        try:
            strength = float(strength)
        except (TypeError, ValueError):
            raise ClipstyleError(f"strength: {strength!r} is not a number") from None
        if not 0.0 <= strength <= 1.0:
            raise ClipstyleError("strength must be between 0 and 1")
        job = Job(
            id=uuid.uuid4().hex[:12],
            kind="apply",
            upload=upload_id,
            input_name=info["name"],
            prompt=source.prompt,
            style_of=style_of,
            strength=strength,
            steps=1,
            created=time.time(),
        )
        self._enqueue([job])
        return job

    def _enqueue(self, jobs: list[Job]) -> None:
        with self._wake:
            if self._closing:
                raise ClipstyleError("the server is stopping")
            for job in jobs:
                self.jobs[job.id] = job
                self._queue.append(job.id)
            self._changed()

    # --- changing ---------------------------------------------------------------------------------------

    def stop(self, job_id: str) -> Job:
        """A queued job is cancelled; a running one ends after its current step, keeping its last image."""
        with self._wake:
            job = self._get(job_id)
            if job.status == "queued":
                self._queue.remove(job_id)
                job.status = "cancelled"
                job.finished = time.time()
            elif job.status == "running":
                self._stop.add(job_id)
            self._changed()
            return job

    def delete(self, job_id: str) -> None:
        """Remove a finished job and its files from the gallery."""
        with self._wake:
            job = self._get(job_id)
            if job.status in ("queued", "running"):
                raise ClipstyleError("stop the job first")
            del self.jobs[job_id]
            self._previews.pop(job_id, None)
            self._changed()
        for name in (f"{job_id}.png", f"{job_id}.style", f"{job_id}.json"):
            (self.results / name).unlink(missing_ok=True)

    def _get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id) if isinstance(job_id, str) else None
        if job is None:
            raise KeyError(job_id)
        return job

    # --- reading ----------------------------------------------------------------------------------------

    def state(self) -> dict:
        with self._lock:
            queue = list(self._queue)
            return {
                "version": self.version,
                "running": self._running,
                "queue": queue,  # job ids in the order they will run; position = index + 1
                "jobs": [j.public(full=False) for j in sorted(self.jobs.values(), key=lambda j: j.created)],
            }

    def job(self, job_id: str) -> dict:
        """One job in full (KeyError if unknown)."""
        with self._lock:
            return self._get(job_id).public()

    def preview(self, job_id: str) -> tuple[bytes, str] | None:
        """The latest image of a job: the live preview (JPEG) while it runs, then its PNG."""
        with self._lock:
            job = self.jobs.get(job_id)
            data = self._previews.get(job_id)
        if job is None:
            return None
        if data is not None:
            return data, "image/jpeg"
        if job.png:
            try:
                return (self.results / job.png).read_bytes(), "image/png"
            except OSError:
                return None
        return None

    def served_file(self, folder: str, name: str) -> Path | None:
        """A file the server may hand out, or None: only known names in its own folders (no traversal)."""
        pattern = SERVED.get(folder)
        if pattern is None or not pattern.fullmatch(name):
            return None
        path = (self.folder / folder / name).resolve()
        if path.parent != (self.folder / folder).resolve() or not path.is_file():
            return None
        return path

    def download_name(self, job: Job, suffix: str) -> str:
        """``<photo>-<prompt>.png`` as `clipstyle run` names outputs."""
        stem = slugify(Path(job.input_name).stem, 100)
        label = slugify(job.prompt) + ("-applied" if job.kind == "apply" else "")
        return f"{stem}-{label}{suffix}"

    # --- the worker -------------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._closing:
                    self._wake.wait()
                if self._closing:
                    return
                job = self.jobs[self._queue.popleft()]
                job.status = "running"
                self._running = job.id
                self._changed()
            started = time.perf_counter()
            try:
                if job.kind == "stylize":
                    status = self._stylize(job)
                else:
                    status = self._apply(job)
            except Exception as exc:  # noqa: BLE001 - one job's failure must not stop the server
                status = "failed"
                job.error = describe_error(exc, self.uploads / f"{job.upload}.bin", job.input_name)
            with self._wake:
                job.status = status
                job.finished = time.time()
                self._previews.pop(job.id, None)
                if job.kind == "apply":
                    job.seconds = round(time.perf_counter() - started, 3)
                self._stop.discard(job.id)
                self._running = None
                if status in ("done", "stopped"):
                    self._save_record(job)  # before anyone sees it finished (and may delete it)
                self._changed()

    def _stylize(self, job: Job) -> str:
        """The job as a one-pair plan, executed as `clipstyle run` executes its plans (clipstyle.jobs.plan):
        the same checks, the same files. Stop keeps the last image (no style file)."""
        settings = self._settings.pop(job.id)
        source = self.uploads / f"{job.upload}.bin"
        pair = RunJob(
            InputFile(source, job.input_name, label=job.input_name),
            job.prompt,
            self.results / f"{job.id}.png",
            job.seed,
            style=self.results / f"{job.id}.style",
        )
        options = RunOptions(base_seed=job.base_seed, max_pixels=self.max_pixels)
        plan = RunPlan([pair], settings, options, models=self.models)
        events = _JobEvents(self, job)
        try:
            execute(plan, Report(None), events)
        except _Stopped:
            if self._closing or events.last is None:
                return "interrupted" if self._closing else "stopped"
            meta = output_metadata(pair, settings, self.models.info, options, file_sha256(source))
            meta["clipstyle"]["stopped_at_step"] = job.step
            self._finish(job, events.last, meta)
            return "stopped"
        (record,) = events.records
        if record["status"] != "ok":
            job.error = (record["error"] or "failed").replace(str(source), job.input_name)
            return "failed"
        job.png, job.size = pair.output.name, record["output_size"]
        job.metadata = _png_text(pair.output)
        job.style = pair.style.name
        return "done"

    def _finish(self, job: Job, tensor, meta: dict) -> None:
        path = self.results / f"{job.id}.png"
        save_png(tensor, path, meta)
        job.png, job.size = path.name, [int(tensor.shape[-1]), int(tensor.shape[-2])]
        job.metadata = _png_text(path)

    def _apply(self, job: Job) -> str:
        source_job = self.jobs[job.style_of]
        style = load_style(self.results / source_job.style)
        out = self.results / f"{job.id}.png"
        records = []

        class Events(BatchEvents):
            def note(self, _job, message):
                job.notes.append(message)

            def finished(self, _job, record):
                records.append(record)

        apply_files(
            [ApplyJob(InputFile(self.uploads / f"{job.upload}.bin", job.input_name), out)],
            [style],
            ApplyOptions(strength=job.strength, max_pixels=self.max_pixels),
            Report(None),
            Events(),
            device=self.models.device,
        )
        (record,) = records
        if record["status"] != "ok":
            job.error = record["error"].replace(str(self.uploads / f"{job.upload}.bin"), job.input_name)
            return "failed"
        job.metadata = _png_text(out)
        job.size = record["size"]
        job.png = out.name
        job.step = 1
        return "done"

    # --- the gallery on disk ----------------------------------------------------------------------------

    def _save_record(self, job: Job) -> None:
        data = json.dumps(asdict(job), ensure_ascii=False).encode("utf-8")
        try:
            write_atomic(self.results / f"{job.id}.json", lambda fh: fh.write(data), overwrite=True)
        except ClipstyleError as exc:
            job.notes.append(f"not kept for the next start: {exc}")

    def _load_gallery(self) -> None:
        names = {f.name for f in Job.__dataclass_fields__.values()}
        for path in sorted(self.results.glob("*.json")):
            if not JOB_ID.fullmatch(path.stem):
                continue
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                job = Job(**{k: v for k, v in data.items() if k in names})
            except (OSError, ValueError, TypeError):
                continue
            if job.id == path.stem and job.png and (self.results / job.png).is_file():
                job.preview = 0
                self.jobs[job.id] = job


class _JobEvents(BatchEvents):
    """A served job's run, as the queue shows it: step previews, notes, the record; Stop ends it."""

    def __init__(self, queue: JobQueue, job: Job):
        self.queue, self.job = queue, job
        self.last = None  # the latest step's output, kept when the job is stopped
        self.preview_at = 0.0
        self.records: list[dict] = []

    def progress(self, pair, info) -> None:
        queue, job = self.queue, self.job
        self.last = info.output
        now = time.perf_counter()
        stop = job.id in queue._stop or queue._closing
        image = None
        if not stop and (now - self.preview_at >= queue.preview_seconds or info.step == info.steps):
            image = _jpeg(to_pil(info.output))  # outside the lock: the page's requests go on meanwhile
            self.preview_at = now
        with queue._wake:
            job.step, job.seconds = info.step, round(info.seconds, 3)
            if info.losses:
                job.losses.append([info.step, round(info.losses["total"], 6)])
            if image is not None:
                queue._previews[job.id] = image
                job.preview += 1
            queue._changed()
        if stop:
            raise _Stopped()

    def note(self, pair, message) -> None:
        self.job.notes.append(message)

    def finished(self, pair, record) -> None:
        self.records.append(record)


def _png_text(path: Path) -> dict:
    from PIL import Image

    with Image.open(path) as img:
        return dict(img.text)


def _jpeg(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()
