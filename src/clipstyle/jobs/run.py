"""``run``'s work: optimising planned image x prompt pairs (pairs.py) and saving their outputs.

A film input trains its style on frames spread over the film, then renders every frame
(clipstyle.jobs.film); a ``--train-on`` job trains one style over a set of images and writes
the style file alone.

:func:`run_pairs` optimises RunJobs through the shared batch loop (batch.py),
which skips, isolates failures and reports.
This module never prints: everything a user sees goes through batch.Events.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from clipstyle import images as io
from clipstyle.config import MAX_PIXELS, TRAIN_FRAMES
from clipstyle.device import compute_info, release_cached_memory
from clipstyle.errors import ClipstyleError, is_out_of_memory
from clipstyle.jobs.batch import Events, Summary, Work, job_error, run_jobs
from clipstyle.jobs.film import FrameProgress, film_fields, restyle_film, training_frames
from clipstyle.jobs.memory import auto_batch, check_fits, render_bytes, run_bytes
from clipstyle.jobs.pairs import RunJob
from clipstyle.jobs.resume import settings_identity
from clipstyle.method.loop import stylize_many
from clipstyle.method.text import check_prompt
from clipstyle.provenance import file_sha256, stamp
from clipstyle.regions.cache import Regions
from clipstyle.regions.where import phrase_warnings
from clipstyle.styles.rendering import render, target_size
from clipstyle.styles.stylefile import save_style, style_metadata
from clipstyle.video import Encoding, is_video


@dataclass(frozen=True)
class RunOptions:
    """How ``run`` treats its outputs (the optimisation itself is config.Settings). Checked when made."""

    overwrite: bool = False
    batch: int | str = 1  # pairs optimised together; "auto": from the GPU's free memory (memory.auto_batch)
    save_every: int = 0  # snapshot every N steps (0: none)
    contrast: bool = False  # the reference code's post-processing (images.enhance_contrast)
    max_pixels: int = MAX_PIXELS
    base_seed: int = 0
    output_size: str | None = None  # None: the training size; "full": the input's; or a longest side
    strength: float = 1.0  # blend of content (0) and styled image (1)
    region: object | None = None  # --mask/--where/--preserve-color: a regions.region.Region, None for none
    train_frames: int = TRAIN_FRAMES  # frames of a film its style trains on (spread evenly over it)
    encoding: Encoding = Encoding()  # how restyled films are encoded

    def __post_init__(self) -> None:
        size = self.output_size
        if size is not None and size != "full" and not (str(size).isdigit() and int(size) >= 8):
            raise ClipstyleError(f"output size must be 'full' or a number of pixels (8 or more), not {size!r}")
        if not 0.0 <= self.strength <= 1.0:
            raise ClipstyleError(f"strength must be between 0 and 1, not {self.strength}")
        if self.batch != "auto" and not (isinstance(self.batch, int) and self.batch >= 1):
            raise ClipstyleError(f"batch must be 'auto' or at least 1, not {self.batch!r}")
        if self.save_every < 0:
            raise ClipstyleError("save_every must be 0 or more")
        if self.max_pixels < 1:
            raise ClipstyleError("max_pixels must be at least 1")
        if self.train_frames < 1:
            raise ClipstyleError("train_frames must be at least 1")

    @property
    def output_longest(self) -> int | None:
        """The longest side to render the final image at; None for the input's own size."""
        return None if self.output_size in (None, "full") else int(self.output_size)


def base_record(job: RunJob, settings, status: str, error: str | None = None) -> dict:
    record = {
        "input": str(job.input.path),
        "prompt": job.prompt,
        "output": str(job.output),
        "status": status,
        "error": error,
        "seed": job.seed,
        "steps": settings.steps,
        "size": None,
        "device": None,
        "precision": None,
        "seconds_total": None,
        "seconds_per_step": None,
        "losses": None,
        "peak_memory_bytes": None,
        "rejected_fraction": None,
        "compute": None,
    }
    target = job.target_record()
    if target is not None:  # style images, a blend, phrases to avoid: only then, so plain records stay as they were
        record["target"] = target
    return record


def output_metadata(
    job: RunJob,
    settings,
    models_info: dict,
    options: RunOptions,
    input_sha256: str | None = None,
    compute: dict | None = None,
) -> dict:
    """What goes into the PNG's text chunks: enough to repeat the run (no timings, so the same
    seed on the same ``compute`` - device.compute_info - gives the same bytes), and to know on a
    rerun whether it is done (resume.py; ``compute`` is not compared: see docs/scale.md)."""
    return {
        "prompt": job.prompt,
        **stamp(
            input=job.input.name,
            input_sha256=input_sha256,
            prompt=job.prompt,
            seed=job.seed,
            base_seed=options.base_seed,
            contrast=options.contrast,
            strength=options.strength,
            output_size=options.output_size,
            settings=settings.to_dict(),
            **({"compute": compute} if compute is not None else {}),
            models=models_info,
            **({"region": options.region.record()} if options.region is not None else {}),
            **({"target": job.target_record()} if job.target_record() is not None else {}),
        ),
    }


class Files:
    """Where run's work reads images and writes results: this machine's files.

    An executor on other machines passes its own: inputs sent as bytes, results
    returned as bytes (ray_executor.py).
    """

    def open_image(self, path: Path, max_pixels: int):
        return io.open_image(path, max_pixels)

    def save_png(self, image, path: Path, metadata: dict, overwrite: bool) -> None:
        io.save_png(image, path, metadata, overwrite=overwrite)

    def save_style(self, path: Path, network, metadata: dict, overwrite: bool) -> None:
        save_style(path, network, metadata, overwrite=overwrite)

    def sha256(self, path: Path) -> str:
        """SHA-256 of an input's bytes (recorded in outputs, compared on reruns). Raises OSError."""
        return file_sha256(path)


@dataclass
class _Content:
    """A pair's prepared input: the image at the training size, and the original when
    the final image is rendered at another size."""

    tensor: object  # (1, 3, h, w) in [0, 1]; a list of them for a film or a --train-on set
    original: object | None  # PIL image
    trained_on: object | None = None  # a film's or a set's: what the style was trained on (recorded in it)


class _StylizePairs(Work):
    """run's work: check prompts once, decode each image once, optimise pairs in batches, save."""

    def __init__(
        self, models, settings, options: RunOptions, models_info: dict | None = None, files: Files | None = None
    ):
        self.files = files or Files()
        self._models = models  # Models, or a callable that loads them (called once, when first needed)
        self._models_info = models_info
        self._input_hashes: dict[str, str] = {}
        self.settings, self.options = settings, options
        # "auto" is chosen once the models are loaded on their device (start)
        self.batch_size, self.overwrite = (1 if options.batch == "auto" else options.batch), options.overwrite
        self._prompts: dict[str, str | None] = {}  # prompt -> its error, None when usable
        self._last: tuple[str, _Content | ClipstyleError] | None = None  # one decoded image at a time
        self._regions: Regions | None = None
        self._batch_chosen = False
        self._where_checked = False  # --where's phrase checked (once, with the run's CLIP)

    def start(self) -> None:
        if callable(self._models):
            self._models = self._models()
        if self.options.batch == "auto" and not self._batch_chosen:
            self.batch_size, self._batch_chosen = auto_batch(self.settings, self._models.device), True
        if self._regions is None:  # masks of the photos a batch holds (--where uses the run's CLIP)
            self._regions = Regions(self.options.region, self._models.clip, keep=self.batch_size + 1)

    @property
    def models(self):
        self.start()
        return self._models

    @property
    def models_info(self) -> dict:
        """What the models are (recorded in outputs): as given, else the loaded models' own."""
        return self._models_info if self._models_info is not None else self.models.info

    def record(self, job: RunJob, status: str, error: str | None = None) -> dict:
        return base_record(job, self.settings, status, error)

    def outputs(self, job: RunJob) -> list[Path]:
        return [job.output] if job.style is None else [job.output, job.style]

    def identity(self, job: RunJob, path: Path) -> dict:
        made = {
            "prompt": job.prompt,
            "seed": job.seed,
            "settings": settings_identity(self.settings),
            "models": self.models_info,
            "input_sha256": self._input_sha256(job),
            "target": job.target_record(),  # None: the prompt alone (resume.py reads a record without it so)
        }
        if job.film or job.train_on is not None:
            made["train_frames"] = self.options.train_frames
        if path == job.output and job.train_on is None:  # the image; the style file is the network alone
            made.update(
                contrast=self.options.contrast, strength=self.options.strength, output_size=self.options.output_size
            )
            if job.film:
                made["encoding"] = self.options.encoding.record()
        return made

    def _input_sha256(self, job: RunJob) -> str | list | None:
        if job.train_on is not None:  # a set: each member's, in order
            hashes = [self._file_sha256(m.path) for m in job.train_on]
            return None if None in hashes else hashes
        return self._file_sha256(job.input.path)

    def _file_sha256(self, path: Path) -> str | None:
        key = str(path)
        if key not in self._input_hashes:
            try:
                self._input_hashes[key] = self.files.sha256(path)
            except OSError:
                return None  # unreadable: the pair fails when the image is read
        return self._input_hashes[key]

    def prepare(self, job: RunJob, events: Events) -> _Content:
        self._check_where(events)
        for text in job.targets().texts():  # the prompt, or every text of a blend and every avoided phrase
            self._check_prompt(text, events)
            if self._prompts[text] is not None:
                raise ClipstyleError(self._prompts[text], repr(text))
        several = job.film or job.train_on is not None  # frames or a set, trained on together
        key = "\0".join(str(m.path) for m in job.train_on) if job.train_on is not None else str(job.input.path)
        if self._last is None or self._last[0] != key:
            self._last = (key, self._load_set(job, events) if several else self._load(job, events))
        content = self._last[1]
        if isinstance(content, ClipstyleError):
            raise content
        return content

    def _check_where(self, events: Events) -> None:
        region = self.options.region
        if self._where_checked or region is None or region.where is None:
            return
        self._where_checked = True
        for warning in phrase_warnings(self.models.clip, region.where):
            events.note(None, warning)

    def _check_prompt(self, prompt: str, events: Events) -> None:
        if prompt in self._prompts:
            return
        try:
            for warning in check_prompt(self.models, prompt):
                events.note(None, f"{prompt[:40]!r}: {warning}")
            self._prompts[prompt] = None
        except ClipstyleError as exc:
            self._prompts[prompt] = exc.reason

    def _load(self, job: RunJob, events: Events) -> _Content | ClipstyleError:
        try:
            loaded = self.files.open_image(job.input.path, self.options.max_pixels)
        except ClipstyleError as exc:
            return exc
        for note in loaded.notes:
            events.note(job, note)
        try:  # before allocating: a size that cannot fit fails here, with the number
            self._check_memory(job, *loaded.image.size)
        except ClipstyleError as exc:
            return exc
        tensor = io.prepare_content(loaded.image, self.settings.size)
        try:
            self._regions.prepare(str(job.input.path), loaded.image)
        except ClipstyleError as exc:
            return exc
        return _Content(tensor, loaded.image if self.options.output_size else None)

    def _load_set(self, job: RunJob, events: Events) -> _Content | ClipstyleError:
        """A film's training frames, or a --train-on set's images (a film in a set gives its frames),
        each at the training size. A member that cannot be read is left out with a warning."""
        size, count = self.settings.size, self.options.train_frames
        tensors, members = [], []
        for member in (job.input,) if job.film else job.train_on:
            try:
                if is_video(member.path):
                    frames, indices = training_frames(member.path, count, size)
                    tensors += frames
                    members.append({"input": member.name, "frames": indices})
                else:
                    loaded = self.files.open_image(member.path, self.options.max_pixels)
                    for note in loaded.notes:
                        events.note(job, f"{member.path.name}: {note}")
                    tensors.append(io.prepare_content(loaded.image, size))
                    members.append({"input": member.name})
            except ClipstyleError as exc:
                if job.film:
                    return exc
                events.note(job, f"{exc}; left out of the set")
                continue
            members[-1]["input_sha256"] = self._file_sha256(member.path)
        if not tensors:
            return ClipstyleError("no image of the set could be read", job.input.path)
        s, (h, w) = self.settings, max((t.shape[-2:] for t in tensors), key=lambda hw: hw[0] * hw[1])
        try:
            check_fits(
                run_bytes(w, h, s.crops, s.crop_batch),
                self.models.device,
                f"optimising at {w}x{h} px with {s.crops} crops",
                "lower --size or --crops",
                job.input.path,
            )
        except ClipstyleError as exc:
            return exc
        return _Content(tensors, None, {"images": len(tensors), "members": members})

    def _check_memory(self, job: RunJob, width: int, height: int) -> None:
        """Refuse an image whose training (or output) size cannot fit in the device's memory."""
        s, device = self.settings, self.models.device
        w, h = io.fit_size(width, height, s.size)
        check_fits(
            run_bytes(w, h, s.crops, s.crop_batch),
            device,
            f"optimising at {w}x{h} px with {s.crops} crops",
            "lower --size or --crops",
            job.input.path,
        )
        if self.options.output_size:
            w, h = target_size(width, height, self.options.output_longest)
            check_fits(render_bytes(w, h), device, f"rendering at {w}x{h} px", "lower --output-size", job.input.path)

    def out_of_memory(self, batch: list[tuple]) -> str:
        content = batch[0][1]
        tensor = content.tensor[0] if content is not None and isinstance(content.tensor, list) else None
        tensor = tensor if tensor is not None else (content.tensor if content is not None else None)
        h, w = tensor.shape[-2:] if tensor is not None else (self.settings.size,) * 2
        several = len(batch) > 1
        where = f"at {w}x{h} px" if content is not None else f"preparing the image for --size {self.settings.size}"
        return (
            f"out of memory {where} with {self.settings.crops} crops"
            f"{f' and {len(batch)} pairs per batch' if several else ''}; lower --size,"
            f" --crops{' or --batch' if several else ''}, or encode crops in chunks with --crop-batch 8"
        )

    def free_memory(self) -> None:
        super().free_memory()
        if not callable(self._models):
            release_cached_memory(self._models.device)

    def process(self, batch: list[tuple], events: Events) -> list[dict]:
        jobs = [job for job, _ in batch]
        results = stylize_many(
            [c.tensor for _, c in batch],
            [j.prompt for j in jobs],
            [j.seed for j in jobs],
            models=self.models,
            settings=self.settings,
            callback=lambda info: self._on_step(jobs[info.pair], info, events),
            masks=[
                None if isinstance(c.tensor, list) else self._regions.training_mask(str(j.input.path), c.tensor)
                for j, c in batch
            ],
            targets=[j.target for j in jobs],
        )
        return [self._save(job, content, result, events) for (job, content), result in zip(batch, results)]

    def _on_step(self, job: RunJob, info, events: Events) -> None:
        events.progress(job, info)
        every = self.options.save_every
        if every and info.step % every == 0 and info.step < self.settings.steps:
            snap = job.output.with_name(f"{job.output.stem}.step{info.step:04d}.png")
            image = io.enhance_contrast(info.output) if self.options.contrast else info.output
            self.files.save_png(image, snap, {"prompt": job.prompt, "step": str(info.step)}, overwrite=True)
            events.snapshot(job, snap)

    def _save(self, job: RunJob, content: _Content, result, events: Events | None = None) -> dict:
        record = self.record(job, "ok")
        record.update(
            size=list(result.size),
            device=result.device,
            precision=result.precision,
            seconds_total=round(result.seconds_total, 4),
            seconds_per_step=round(result.seconds_per_step, 5),
            losses=result.losses or None,
            peak_memory_bytes=result.peak_memory_bytes,
            rejected_fraction=result.rejected_fraction,
            batch=self.batch_size,
            compute=compute_info(self.models.device),
        )
        if self.options.region is not None:
            record["region"] = self.options.region.record()
        if result.error is not None:
            record.update(status="failed", error=f"{job.input.path}: {result.error.reason}")
            return record
        if content.trained_on is not None:
            record["trained_on"] = content.trained_on
        try:
            if job.train_on is not None:  # a set: the style file is the output
                self._save_style(job, job.output, content, result)
                return record
            if job.film:
                self._save_film(job, content, result, events or Events(), record)
                return record
            image = self._regions.finish(str(job.input.path), self._final_image(content, result), self.options.contrast)
            if not self.keeps(job.output):
                meta = output_metadata(
                    job, self.settings, self.models_info, self.options, self._input_sha256(job), record["compute"]
                )
                self.files.save_png(image, job.output, meta, overwrite=self.overwrite)
            record["output_size"] = list(image.shape[-1:-3:-1])
            if job.style is not None and not self.keeps(job.style):
                meta = style_metadata(
                    prompt=job.prompt,
                    settings=self.settings,
                    seed=job.seed,
                    input_path=job.input.path,
                    input_name=job.input.name,
                    trained_size=result.size,
                    models_info=self.models_info,
                    input_sha256=self._input_sha256(job),
                )
                if self.options.region is not None:
                    meta["region"] = self.options.region.record()
                if job.target_record() is not None:
                    meta["target"] = job.target_record()
                self.files.save_style(job.style, result.network, meta, overwrite=self.overwrite)
                record["style"] = str(job.style)
        except ClipstyleError as exc:
            record.update(status="failed", error=job_error(job, exc))
        except Exception as exc:  # out of memory while rendering or saving fails this pair only
            if not is_out_of_memory(exc):
                raise
            self.free_memory()
            record.update(
                status="failed", error=f"{job.input.path}: out of memory rendering the final image; lower --output-size"
            )
        return record

    def _save_style(self, job: RunJob, path: Path, content: _Content, result) -> None:
        """A film's or a set's style file, recording what it was trained on."""
        if self.keeps(path):
            return
        meta = style_metadata(
            prompt=job.prompt,
            settings=self.settings,
            seed=job.seed,
            input_path=job.input.path if job.film else None,
            trained_size=result.size,
            models_info=self.models_info,
            input_sha256=self._input_sha256(job) if job.film else None,
        )
        if not job.film:
            meta.update(input=job.input.name, input_sha256=self._input_sha256(job))
        meta.update(trained_on=content.trained_on, train_frames=self.options.train_frames)
        if job.target_record() is not None:  # as a photo's style file records it (a rerun compares it)
            meta["target"] = job.target_record()
        self.files.save_style(path, result.network, meta, overwrite=self.overwrite)

    def _save_film(self, job: RunJob, content: _Content, result, events: Events, record: dict) -> None:
        """Every frame of the film through the trained network (at the film's size, or
        --output-size N as a cap), then the style file if asked."""
        options = self.options
        if not self.keeps(job.output):
            meta = output_metadata(
                job, self.settings, self.models_info, options, self._input_sha256(job), record["compute"]
            )
            fields = dict(meta["clipstyle"], prompt=job.prompt, train_frames=options.train_frames)
            fields.update(encoding=options.encoding.record(), trained_on=content.trained_on)
            stats = restyle_film(
                job.input.path,
                job.output,
                result.network,
                device=self.models.device,
                longest=options.output_longest,
                strength=options.strength,
                encoding=options.encoding,
                record=fields,
                overwrite=self.overwrite,
                progress=lambda d, t: events.progress(job, FrameProgress(d, t)),
            )
            record.update(output_size=list(stats.size), **film_fields(stats))
            for note in stats.notes():
                events.note(job, note)
        if job.style is not None:
            self._save_style(job, job.style, content, result)
            record["style"] = str(job.style)

    def _final_image(self, content: _Content, result):
        """The image to save: the run's output, or the trained network rendered at
        the requested size, blended with the content by ``strength``."""
        options = self.options
        if not options.output_size and options.strength == 1.0:
            return result.tensor
        if options.output_size:
            original = content.original
            full = io.to_tensor(original, target_size(*original.size, options.output_longest))
            return render(result.network, full, strength=options.strength)
        return torch.lerp(content.tensor.cpu(), result.tensor, options.strength)


def run_work(
    models, settings, options: RunOptions, models_info: dict | None = None, files: Files | None = None
) -> Work:
    """run's batch.Work (see run_pairs for the arguments)."""
    return _StylizePairs(models, settings, options, models_info, files)


def run_pairs(
    jobs: list[RunJob],
    models,
    settings,
    options: RunOptions,
    report,
    events: Events | None = None,
    models_info: dict | None = None,
    summary: Summary | None = None,
    files: Files | None = None,
    claiming: bool = True,
) -> Summary:
    """Optimise every pair through the shared batch loop (batch.run_jobs).

    ``models``: a loading.Models, or a callable returning one, called only if a
    pair needs them. ``models_info``: what the models are (loading.models_info
    of the arguments they load with), recorded in each output and compared
    with existing outputs; given, a rerun whose outputs are all done loads
    nothing; default: the models' own ``info``. ``summary``: see batch.run_jobs.
    ``files``: where inputs are read and results written (default: this machine's files).
    ``claiming``: see batch.run_jobs.
    """
    work = run_work(models, settings, options, models_info, files)
    return run_jobs(jobs, work, report, events, summary, claiming)
