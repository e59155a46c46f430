"""The job queue behind ``clipstyle serve``: one worker thread owns the device.

Jobs run one at a time, first in, first out, so several tabs or users share
one GPU and the models load once per server. The worker reports progress into
the job objects; the web layer only reads them (``state()``) and asks for
changes (``submit_*``, ``stop``, ``delete``).

Stopping a running job: the step callback raises ``_Stopped`` once the stop
flag is set, which ends ``stylize_many`` between two steps; the last image the
callback received is kept as the result. No style file is written for a
stopped job: the network behind that image is not handed to callbacks. A job
stopped before its first step, and an apply job (stopped between two tiles),
keep nothing: they end "cancelled". A film (an apply job) stops between two frames
and keeps nothing either (a film is written whole or not at all).

A stylize job's region and colour values (``run``'s --where, --mask, --invert-mask,
--feather, --preserve-color; the mask an uploaded image) go into its one-pair plan
as ``RunOptions.region``, as ``clipstyle run`` passes them (an apply job's into
``ApplyOptions.region``, as ``clipstyle apply`` does); its style images, blend weights
and avoided phrases (``run``'s --style-image, --blend, --avoid, --avoid-weight; style images
uploaded like photos) as the pair's ``RunJob.target``, as ``plan_run`` sets it.

The server's folder holds everything it serves::

    uploads/<id>.bin   checked upload (original bytes), <id>.json its name and size, <id>.jpg a view
    uploads/<id>.mp4   a checked film (its own suffix: .mov, .mkv...), <id>.jpg its first frame
    results/<job>.png  the result, with the same PNG metadata as ``clipstyle run`` writes
    results/<job>.mp4  a restyled film (an apply job on a film), its record in the container
    results/<job>.style  the trained network (finished stylize jobs)
    results/<job>.json  the job's record: reloaded into the gallery when the server starts

Every file is written atomically (temporary file, then rename), so stopping the
server at any moment leaves no partial file; temporary files of a server that was
killed are removed at the next start.

Nothing in the folder is trusted: a record is loaded into the gallery only when
every field has the type and the shape the server writes (file names are the
job's own id, ids are generated-id shaped), so a planted or edited record can
never make the server read or serve another file. Limits keep one client from
filling the queue or the disk: at most ``max_queued`` jobs wait, uploads share a
disk budget (uploads no job refers to are removed, oldest first, when space is
needed, and at start).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import threading
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from clipstyle import video
from clipstyle.config import AVOID_WEIGHT, FEATHER, MAX_FEATHER, MAX_PIXELS, PRECISIONS, PRESETS, Settings
from clipstyle.device import compute_info
from clipstyle.errors import ClipstyleError
from clipstyle.images import fit_size, open_image, save_png, slugify, to_pil, write_atomic
from clipstyle.jobs.apply import ApplyJob, ApplyOptions, apply_files
from clipstyle.jobs.batch import Events as BatchEvents
from clipstyle.jobs.film import FrameProgress
from clipstyle.jobs.inputs import InputFile
from clipstyle.jobs.memory import check_fits, check_run_size, run_bytes
from clipstyle.jobs.pairs import RunJob, pair_seed
from clipstyle.jobs.plan import RunPlan, check_prompts, execute
from clipstyle.jobs.report import Report
from clipstyle.jobs.run import RunOptions, output_metadata
from clipstyle.method.targets import StyleImage, Target, Targets
from clipstyle.prompts import is_blank, split_weight
from clipstyle.provenance import bytes_sha256, file_sha256
from clipstyle.regions.region import Region
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
# The region and colour controls of `clipstyle run` (--where, --mask, --invert-mask, --feather,
# --preserve-color), by their form names; ``mask`` is the id of an uploaded image.
REGION_FIELDS = ("where", "mask", "invert_mask", "feather", "preserve_color")
# run's target options (--style-image, --blend, --avoid, --avoid-weight) by form name -> run's parameter name.
TARGET_HELP = {"style_images": "style_images", "blend": "blend", "avoid": "avoid", "avoid_weight": "avoid_weight"}
MAX_PROMPTS = 16  # one job per prompt line
MAX_PROMPT_CHARS = 1000  # CLIP reads 77 tokens; a longer text is a mistake or an attack
MAX_NAME = 200
# Steps of one job. The loop draws every step's crops before the first step (clipstyle.method.loop):
# time and memory in proportion, before a Stop can be seen; 10,000 is 50 times the paper's 200.
MAX_STEPS = 10_000
MAX_QUEUED = 100  # jobs waiting at once; more are refused politely (429) until some have run
DEFAULT_UPLOAD_SPACE = 2 * 1024**3  # bytes of uploads kept on disk (photo, view, record)
JOB_ID = re.compile(r"[0-9a-f]{12}")
UPLOAD_ID = re.compile(r"[0-9a-f]{16}")
# Files the server hands out: results by job id, upload views by upload id. Nothing else.
SERVED = {
    "results": re.compile(r"[0-9a-f]{12}\.(png|style|mp4)"),
    "uploads": re.compile(r"[0-9a-f]{16}\.jpg"),
}
VIEW_SIDE = 768  # longest side of the upload's view in the page
# Uploaded films keep their own suffix (clipstyle.video reads a film as one by its name):
# uploads/<id>.mp4 etc. beside <id>.jpg (its first frame) and <id>.json.
FILM_SUFFIXES = tuple(sorted(video.VIDEO_EXTENSIONS))
FINISHED = ("done", "stopped", "failed", "cancelled", "interrupted")
KEPT = ("done", "stopped")  # the statuses of jobs whose record is written (and reloaded)
TEMPORARY = re.compile(r"\..+\.(\d+)-\d+\.tmp")  # images.write_atomic's temporary files: .<name>.<pid>-<n>.tmp


class QueueFull(ClipstyleError):
    """Too many jobs are waiting (HTTP 429)."""


class NoSpace(ClipstyleError):
    """The server's upload budget or its disk is full (HTTP 507)."""


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
    helps = help_texts or {}
    region = {
        "feather": FEATHER,
        "max_feather": MAX_FEATHER,
        # the help of run's options, by form name (preserve_color is run's --preserve-color)
        "help": {name: helps.get("preserve_colour" if name == "preserve_color" else name) for name in REGION_FIELDS},
    }
    targets = {
        "avoid_weight": AVOID_WEIGHT,
        # run's --style-image, --blend, --avoid and --avoid-weight, by form name
        "help": {name: helps.get(option) for name, option in TARGET_HELP.items()},
    }
    return {
        "fields": fields,
        "presets": PRESETS,
        "seed": 0,
        "max_prompts": MAX_PROMPTS,
        "region": region,
        "targets": targets,
        "films": film_support(),
    }


def film_support() -> dict:
    """Whether films can be uploaded (PyAV is installed), and if not, how to install it."""
    try:
        video.require_av()
    except ClipstyleError as exc:
        return {"available": False, "hint": str(exc), "suffixes": list(FILM_SUFFIXES)}
    return {"available": True, "hint": None, "suffixes": list(FILM_SUFFIXES)}


def _form_number(raw, what: str) -> float:
    """A number a client sent: a plain number or its text (not true/false, a list, an object, or
    beyond a float); one line naming ``what`` otherwise. Its range is the caller's to check."""
    try:
        if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
            raise ValueError
        return float(raw)
    except (TypeError, ValueError, OverflowError):
        raise ClipstyleError(f"{what}: {_shown(raw)} is not a number") from None


def _weight(raw, what: str, minimum_exclusive: bool = True) -> float:
    """A weight from a form: a plain number (or its text), finite, above 0 (or 0 and above)."""
    number = _form_number(raw, what)
    if not math.isfinite(number) or number < 0 or (minimum_exclusive and number == 0):
        raise ClipstyleError(f"{what} must be a number above 0" if minimum_exclusive else f"{what} must be 0 or more")
    return number


def _texts(raw, what: str) -> list[str]:
    """A list of texts from a form (each stripped, empty ones dropped), bounded like the prompts."""
    if raw is None or raw == "":
        return []
    if not isinstance(raw, list) or not all(isinstance(t, str) for t in raw):
        raise ClipstyleError(f"{what} must be a list of texts")
    texts = [t.strip() for t in raw if t.strip()]
    if len(texts) > MAX_PROMPTS:
        raise ClipstyleError(f"{len(texts)} {what} phrases: at most {MAX_PROMPTS} at a time")
    for t in texts:
        if len(t) > MAX_PROMPT_CHARS:
            raise ClipstyleError(f"{what}: a phrase has {len(t):,} characters, at most {MAX_PROMPT_CHARS:,}")
        if not _utf8(t):
            raise ClipstyleError(f"{what}: not valid text (a lone surrogate)")
    return texts


def targets_from_form(prompts: list[str], form: dict) -> list[tuple[str | None, dict | None]]:
    """The jobs a form asks for, as `clipstyle run` makes them from -p, --style-image, --blend,
    --avoid and --avoid-weight: one (prompt, None) per plain prompt, else (None, its target
    record), with style images by upload id (the queue checks them, JobQueue.targets_for). Without
    ``blend`` each prompt and each style image is a job; with it, all are one job, a prompt's
    weight written ``"text:0.7"`` as on the command line, a style image's beside it."""
    raw = form.get("style_images")
    if raw is None or raw == "":
        raw = []
    if not isinstance(raw, list):
        raise ClipstyleError("style images must be a list of uploads")
    images = []
    for item in raw:
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("upload"), str)
            or not set(item) <= {"upload", "weight"}
        ):
            raise ClipstyleError(f"style image: {_shown(item)} is not an upload and a weight")
        weight = item.get("weight")
        weight = 1.0 if weight is None or weight == "" else _weight(weight, "a style image's weight")
        images.append({"image": item["upload"], "name": None, "weight": weight})
    blend = form.get("blend")
    if blend is not None and not isinstance(blend, bool):
        raise ClipstyleError(f"blend: {_shown(blend)} is not true or false")
    avoid = _texts(form.get("avoid"), "avoid")
    avoid_weight = form.get("avoid_weight")
    avoid_weight = (
        AVOID_WEIGHT if avoid_weight is None or avoid_weight == "" else _weight(avoid_weight, "avoid weight", False)
    )
    if not prompts and not images:
        raise ClipstyleError("the prompt is empty")
    extra = {"avoid": avoid, "avoid_weight": avoid_weight}
    if blend:
        if len(prompts) + len(images) < 2:
            raise ClipstyleError("a blend needs at least two targets (prompts or style images)")
        texts = []
        for prompt in prompts:
            body, weight = split_weight(prompt)
            texts.append({"text": body, "weight": 1.0 if weight is None else weight})
        return [(None, {"targets": [*texts, *images], **extra, "blend": True})]
    if len(prompts) + len(images) > MAX_PROMPTS:
        raise ClipstyleError(f"{len(prompts) + len(images)} prompts and style images: at most {MAX_PROMPTS} at a time")
    jobs: list[tuple[str | None, dict | None]] = [
        (None, {"targets": [{"text": p, "weight": 1.0}], **extra, "blend": False}) if avoid else (p, None)
        for p in prompts
    ]
    jobs += [(None, {"targets": [image], **extra, "blend": False}) for image in images]
    return jobs


@dataclass(frozen=True)
class ServedRegion(Region):
    """A Region whose mask is an upload: recorded under the name it was uploaded under (as
    `clipstyle run --mask NAME` records it), not the server's ``<id>.bin``."""

    mask_name: str | None = None

    def record(self) -> dict:
        out = super().record()
        if self.mask is not None and self.mask_name:
            out["mask"] = self.mask_name
        return out


def region_from_form(form: dict) -> dict | None:
    """The region and colour values of a form, checked like the other form values (one line each;
    flags must be true or false, the feather a finite number from 0 to MAX_FEATHER, the phrase
    text, as run's --where is): the job's record of them, or None when none is asked for. The mask's upload id is
    checked by the queue (JobQueue.region_for)."""
    where = form.get("where")
    if where is not None and not isinstance(where, str):
        raise ClipstyleError(f"where: {_shown(where)} is not text")
    where = (where or "").strip() or None
    if where is not None:
        if len(where) > MAX_PROMPT_CHARS:
            raise ClipstyleError(f"where: {len(where):,} characters, at most {MAX_PROMPT_CHARS:,}")
        if not _utf8(where):
            raise ClipstyleError("where: not valid text (a lone surrogate)")
        if is_blank(where):
            raise ClipstyleError("where: the phrase has no visible character")
    mask = form.get("mask")
    if mask is not None and mask != "" and not isinstance(mask, str):
        raise ClipstyleError(f"mask: {_shown(mask)} is not an upload id")
    mask = mask or None
    flags = {}
    for name in ("invert_mask", "preserve_color"):
        raw = form.get(name)
        if raw is not None and not isinstance(raw, bool):
            raise ClipstyleError(f"{name.replace('_', ' ')}: {_shown(raw)} is not true or false")
        flags[name] = bool(raw)
    raw = form.get("feather")
    feather = FEATHER
    if raw is not None and raw != "":
        feather = _form_number(raw, "feather")
        if not 0 <= feather <= MAX_FEATHER:  # false for nan too
            raise ClipstyleError(f"feather must be between 0 and {MAX_FEATHER:,.0f} pixels")
    if flags["invert_mask"] and where is None and mask is None:
        raise ClipstyleError("invert mask needs a mask or a where phrase")
    if where is None and mask is None and not flags["preserve_color"]:
        return None
    return {"where": where, "mask": mask, "mask_name": None, "feather": feather, **flags}


def settings_from_form(form: dict) -> Settings:
    """Form values -> Settings: the preset first, then every field given. One-line errors; values
    that are not plain numbers or text (lists, objects, true/false, infinities) are refused."""
    preset = form.get("preset") or "paper"
    if not isinstance(preset, str) or preset not in PRESETS:
        raise ClipstyleError(f"unknown preset {_shown(preset)} (choose {', '.join(sorted(PRESETS))})")
    values = dict(PRESETS[preset])
    defaults = Settings()
    for name in FORM_FIELDS:
        raw = form.get(name)
        if raw is None or raw == "":
            continue
        kind = type(getattr(defaults, name))
        what = "an integer" if kind is int else "a number" if kind is float else "text"
        try:
            if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
                raise ValueError
            if kind is int:
                values[name] = _integer(raw)
            elif kind is float:
                number = float(raw)
                if not math.isfinite(number):
                    raise ValueError
                values[name] = number
            else:
                values[name] = str(raw)
                if len(values[name]) > MAX_PROMPT_CHARS:  # text CLIP reads, bounded as prompts are
                    raise ClipstyleError(f"{name}: {len(values[name]):,} characters, at most {MAX_PROMPT_CHARS:,}")
        except (TypeError, ValueError, OverflowError):
            raise ClipstyleError(f"{name.replace('_', ' ')}: {_shown(raw)} is not {what}") from None
        if kind is int and abs(values[name]) >= 2**31:  # means nothing here, and overflows float sums
            raise ClipstyleError(f"{name.replace('_', ' ')}: {_shown(raw)} is too large")
    if values.get("precision", "auto") not in PRECISIONS:
        raise ClipstyleError(f"precision must be one of {', '.join(PRECISIONS)}")
    if values.get("size", 16) < 16:
        raise ClipstyleError("size must be at least 16")
    if values.get("steps", 0) > MAX_STEPS:
        raise ClipstyleError(f"steps: at most {MAX_STEPS:,} on this server")
    return Settings(**values)


def _integer(raw) -> int:
    """A whole number from JSON or text ("12", 12, 12.0, "1e3"); ValueError for 1.7, inf, nan, "x"."""
    if isinstance(raw, int):
        return raw
    if isinstance(raw, str) and re.fullmatch(r"\s*[+-]?\d+\s*", raw):
        return int(raw)
    number = float(raw)
    if not math.isfinite(number) or not number.is_integer():
        raise ValueError
    return int(number)


def _shown(value) -> str:
    """A value a client sent, as an error line shows it: repr, cut short."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _seed(form: dict) -> int:
    raw = form.get("seed", 0)
    try:
        if isinstance(raw, bool) or not isinstance(raw, (str, int, float, type(None))):
            raise ValueError
        seed = _integer(raw if raw not in (None, "") else 0)
    except (TypeError, ValueError, OverflowError):
        raise ClipstyleError(f"seed: {_shown(raw)} is not an integer") from None
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
    region: dict | None = None  # the form's region and colour values (region_from_form), stylize or apply
    film: bool = False  # apply: the upload is a film (step and steps count its frames)
    video: str | None = None  # the restyled film in results/ (a film job's result instead of ``png``)
    # stylize: what the network is trained towards beyond the prompt alone (targets_from_form): style
    # images (by upload id, with their names), a blend's parts and weights, phrases to avoid
    target: dict | None = None

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

    @classmethod
    def from_record(cls, data, job_id: str) -> Job | None:
        """The job a record in results/ describes, or None unless every field has the type and the
        shape this server writes: its files are ``<job_id>.png`` and ``<job_id>.style``, its
        ids are generated-id shaped, its status is a kept one. A record is data from disk (a shared
        or copied folder): nothing in it may name another file."""
        if not isinstance(data, dict) or data.get("id") != job_id or not JOB_ID.fullmatch(job_id):
            return None
        fields = cls.__dataclass_fields__
        if not set(data) <= set(fields):
            return None
        checks = {
            "kind": lambda v: v in ("stylize", "apply"),
            "upload": lambda v: isinstance(v, str) and UPLOAD_ID.fullmatch(v),
            "input_name": lambda v: isinstance(v, str) and v == clean_name(v),
            "prompt": lambda v: isinstance(v, str) and 0 < len(v) <= MAX_PROMPT_CHARS and _utf8(v),
            "settings": lambda v: isinstance(v, dict),
            "preset": lambda v: isinstance(v, str),
            "base_seed": lambda v: _whole(v) and 0 <= v < 2**63,
            "seed": lambda v: _whole(v) and 0 <= v < 2**64,
            "style_of": lambda v: v is None or (isinstance(v, str) and JOB_ID.fullmatch(v)),
            "strength": lambda v: _number(v) and 0 <= v <= 1,
            "status": lambda v: v in KEPT,
            "step": lambda v: _whole(v) and v >= 0,
            "steps": lambda v: _whole(v) and v >= 0,
            "losses": lambda v: (
                isinstance(v, list)
                and all(isinstance(p, list) and len(p) == 2 and _whole(p[0]) and _number(p[1]) for p in v)
            ),
            "seconds": _number,
            "error": lambda v: v is None or isinstance(v, str),
            "notes": lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v),
            "created": _number,
            "finished": lambda v: v is None or _number(v),
            "size": lambda v: v is None or (isinstance(v, list) and len(v) == 2 and all(_whole(n) for n in v)),
            "png": lambda v: v is None or v == f"{job_id}.png",
            "video": lambda v: v is None or v == f"{job_id}.mp4",
            "film": lambda v: isinstance(v, bool),
            "region": lambda v: v is None or _region_ok(v),
            "target": lambda v: v is None or _target_ok(v),
            "style": lambda v: v is None or v == f"{job_id}.style",
            "metadata": lambda v: (
                v is None
                or (isinstance(v, dict) and all(isinstance(k, str) and isinstance(t, str) for k, t in v.items()))
            ),
            "preview": _whole,
        }
        required = ("id", "kind", "upload", "input_name", "prompt", "status")
        if any(name not in data for name in required) or not (data.get("png") or data.get("video")):
            return None
        if not all(check(data[name]) for name, check in checks.items() if name in data):
            return None
        job = cls(**data)
        job.preview = 0
        return job


def _region_ok(v) -> bool:
    """A job record's region, as region_from_form makes it (the mask an upload id)."""
    return (
        isinstance(v, dict)
        and set(v) == {"where", "mask", "mask_name", "feather", "invert_mask", "preserve_color"}
        and (v["where"] is None or _text(v["where"]))
        and (v["mask"] is None or (isinstance(v["mask"], str) and bool(UPLOAD_ID.fullmatch(v["mask"]))))
        and (v["mask_name"] is None or _name_ok(v["mask_name"]))
        and _number(v["feather"])
        and 0 <= v["feather"] <= MAX_FEATHER
        and isinstance(v["invert_mask"], bool)
        and isinstance(v["preserve_color"], bool)
    )


def _target_ok(v) -> bool:
    """A job record's target, as targets_from_form makes it (style images by upload id)."""

    def part_ok(p) -> bool:
        if not isinstance(p, dict) or not (_number(p.get("weight")) and p["weight"] > 0):
            return False
        if set(p) == {"text", "weight"}:
            return _text(p["text"])
        return (
            set(p) == {"image", "name", "weight"}
            and isinstance(p["image"], str)
            and bool(UPLOAD_ID.fullmatch(p["image"]))
            and _name_ok(p["name"])
        )

    return (
        isinstance(v, dict)
        and set(v) == {"targets", "avoid", "avoid_weight", "blend"}
        and isinstance(v["targets"], list)
        and 0 < len(v["targets"]) <= 2 * MAX_PROMPTS
        and all(part_ok(p) for p in v["targets"])
        and isinstance(v["avoid"], list)
        and len(v["avoid"]) <= MAX_PROMPTS
        and all(_text(a) for a in v["avoid"])
        and _number(v["avoid_weight"])
        and v["avoid_weight"] >= 0
        and isinstance(v["blend"], bool)
    )


def _name_ok(v) -> bool:
    return isinstance(v, str) and v == clean_name(v)


def _text(v) -> bool:
    return isinstance(v, str) and 0 < len(v) <= MAX_PROMPT_CHARS and _utf8(v)


def _film_ok(v) -> bool:
    """An upload record's film facts, as _check_film writes them (None for a photo)."""
    return v is None or (
        isinstance(v, dict) and v.get("suffix") in FILM_SUFFIXES and _whole(v.get("frames")) and v["frames"] >= 0
    )


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class JobQueue:
    """Jobs in first-in, first-out order, run by one worker thread that owns ``models``."""

    def __init__(
        self,
        models,
        folder: str | Path,
        *,
        max_pixels: int | None = None,
        preview_seconds: float = 0.5,
        max_queued: int = MAX_QUEUED,
        upload_space: int = DEFAULT_UPLOAD_SPACE,
    ):
        self.models = models
        self.folder = Path(folder)
        self.uploads = self.folder / "uploads"
        self.results = self.folder / "results"
        self.max_pixels = max_pixels or MAX_PIXELS
        self.preview_seconds = preview_seconds
        self.max_queued = max_queued
        self.upload_space = upload_space
        self.jobs: dict[str, Job] = {}
        self.skipped: list[str] = []  # records in results/ that were not loaded (not as this server writes them)
        self._queue: deque[str] = deque()
        self._running: str | None = None
        self._previews: dict[str, bytes] = {}
        self._settings: dict[str, Settings] = {}  # of queued stylize jobs
        self._stop: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._uploading = threading.Lock()  # one upload at a time checks and spends the budget
        self._closing = False
        self.version = 0  # bumps on every change; the event stream sends the state when it moves
        self._thread = threading.Thread(target=self._work, name="clipstyle-worker", daemon=True)
        for sub in (self.uploads, self.results):
            try:
                sub.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ClipstyleError(f"cannot create the server's folder: {exc.strerror or exc}", sub) from None
        self._load_gallery()
        self._tidy()

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

    def public(self, message: str) -> str:
        """``message`` as a client may read it: the server's own folder named by its part inside it
        (``results/...``), never by its absolute path."""
        for root in sorted({str(self.folder.resolve()), str(self.folder.absolute())}, key=len, reverse=True):
            message = message.replace(root + os.sep, "").replace(root, "the server's folder")
        return message

    # --- uploads ----------------------------------------------------------------------------------------

    def add_upload(self, data: bytes, name: str | None) -> dict:
        """Check an uploaded photo as the CLI checks its inputs (from memory: nothing is written until
        it is known to be a usable image); keep it under an id made of its bytes and its name, so the
        same bytes under two names are two uploads (the name makes the seed) and re-uploading one
        changes nothing."""
        name = clean_name(name)
        if video.is_video(name):
            return self._add_film(data, name)
        try:
            loaded = open_image(Path(name), self.max_pixels, data=data)
        except ClipstyleError as exc:
            raise ClipstyleError(f"{name}: {exc.reason}") from None
        digest = bytes_sha256(data)
        upload_id = bytes_sha256(f"{digest}\0{name}".encode())[:16]
        info = {
            "id": upload_id,
            "name": name,
            "width": loaded.image.width,
            "height": loaded.image.height,
            "sha256": digest,
            "notes": list(loaded.notes),
        }
        paths = [self.uploads / f"{upload_id}.{suffix}" for suffix in ("bin", "jpg", "json")]
        with self._uploading:
            if all(p.is_file() for p in paths):
                return info  # the same bytes under the same name: already kept
            view = loaded.image.copy()
            view.thumbnail((VIEW_SIDE, VIEW_SIDE))
            buffer = io.BytesIO()
            view.save(buffer, format="JPEG", quality=88)
            record = json.dumps(info, ensure_ascii=False).encode("utf-8")
            contents = [data, buffer.getvalue(), record]
            self._make_room(sum(len(c) for c in contents))
            try:
                for path, content in zip(paths, contents):
                    write_atomic(path, lambda fh, c=content: fh.write(c), overwrite=True)
            except ClipstyleError as exc:
                for path in paths:  # all three or none: no orphan files
                    path.unlink(missing_ok=True)
                raise self._refusal(f"cannot keep {name}", exc) from None
        return info

    def _add_film(self, data: bytes, name: str) -> dict:
        """Check an uploaded film as `clipstyle apply` reads one (clipstyle.video): it opens, its
        first frame decodes, its frames are within the pixel limit, and it holds the frames it states
        (a film cut short is refused here, not after a long job). The bytes are checked in a
        temporary file inside the upload budget; kept as ``<id><suffix>`` with a view of its first
        frame. Without PyAV: one line saying how to install it."""
        try:
            video.require_av()
        except ClipstyleError as exc:
            raise ClipstyleError(f"{name}: {exc}") from None
        suffix = Path(name).suffix.lower()
        digest = bytes_sha256(data)
        upload_id = bytes_sha256(f"{digest}\0{name}".encode())[:16]
        paths = [self.uploads / f"{upload_id}.{s}" for s in (suffix[1:], "jpg", "json")]
        with self._uploading:
            if all(p.is_file() for p in paths):
                return self.upload_info(upload_id)  # the same bytes under the same name: already kept
            self._make_room(len(data))
            # a temporary name a restart removes (TEMPORARY) if the server dies while checking
            tmp = self.uploads / f".{upload_id}{suffix}.{os.getpid()}-0.tmp"
            try:
                try:
                    tmp.write_bytes(data)
                except OSError as exc:
                    raise self._refusal(f"cannot keep {name}", ClipstyleError(exc.strerror or str(exc))) from None
                info = self._check_film(tmp, name)
                info.update(id=upload_id, name=name, sha256=digest)
                view = io.BytesIO()
                info.pop("view").save(view, format="JPEG", quality=88)
                record = json.dumps(info, ensure_ascii=False).encode("utf-8")
                self._make_room(len(view.getvalue()) + len(record))
                try:
                    os.replace(tmp, paths[0])
                    for path, content in zip(paths[1:], (view.getvalue(), record)):
                        write_atomic(path, lambda fh, c=content: fh.write(c), overwrite=True)
                except (OSError, ClipstyleError) as exc:
                    for path in paths:  # all three or none: no orphan files
                        path.unlink(missing_ok=True)
                    if isinstance(exc, OSError):
                        exc = ClipstyleError(exc.strerror or str(exc))
                    raise self._refusal(f"cannot keep {name}", exc) from None
            finally:
                tmp.unlink(missing_ok=True)
        return info

    def _check_film(self, path: Path, name: str) -> dict:
        """What the page shows of a film (size, frames, rate, duration, audio) and a view of its first
        frame (a PIL image, under "view"); one line naming ``name`` for anything unusable."""
        from PIL import Image

        try:
            try:
                info = video.probe(path)
                counted = video.count_frames(path)
                if info.width * info.height > self.max_pixels:
                    raise ClipstyleError(
                        f"frames of {info.width}x{info.height} pixels, over the limit of {self.max_pixels:,}"
                    )
                if info.frames and info.frames - counted > max(2, info.frames // 100):
                    raise ClipstyleError(f"is truncated or damaged: {counted} of its {info.frames} frames are there")
                frames = video.rgb_frames(path)
                try:
                    first = next(frames, None)
                finally:
                    frames.close()
            except ClipstyleError:
                raise
            except Exception as exc:  # noqa: BLE001 - FFmpeg's errors on a hostile file, in one line
                raise ClipstyleError(f"cannot read it as a video ({type(exc).__name__})") from None
            if first is None:
                raise ClipstyleError("holds no frame that can be decoded")
        except ClipstyleError as exc:
            raise ClipstyleError(f"{name}: {exc.reason}") from None
        view = Image.fromarray(video.upright(first, info.rotation)).resize(info.display_size, Image.Resampling.BILINEAR)
        view.thumbnail((VIEW_SIDE, VIEW_SIDE))
        width, height = info.display_size
        return {
            "width": width,
            "height": height,
            "notes": [],
            "film": {
                "suffix": Path(name).suffix.lower(),
                "frames": info.frames or counted,
                "fps": round(float(info.fps), 3) if info.fps else None,
                "duration": round(info.duration, 3),
                "audio_streams": info.audio_streams,
            },
            "view": view,
        }

    def _refusal(self, what: str, exc: ClipstyleError) -> ClipstyleError:
        """A write that failed, as one line for the page: NoSpace when the disk is full, no server path."""
        reason = self.public(exc.reason)
        if "space" in reason.lower() or "quota" in reason.lower():
            return NoSpace(f"{what}: the server's disk is full ({reason})")
        return ClipstyleError(f"{what}: {reason}")

    def upload_bytes(self) -> int:
        """Bytes the uploads take on disk."""
        total = 0
        for path in self.uploads.iterdir():
            try:
                total += path.stat().st_size
            except OSError:
                pass
        return total

    def _make_room(self, need: int) -> None:
        """Remove uploads no job refers to, oldest first, until ``need`` more bytes fit in the budget;
        NoSpace if they still do not."""
        used = self.upload_bytes()
        if used + need <= self.upload_space:
            return
        for upload_id in self._unreferenced_uploads():
            used -= self._remove_upload(upload_id)
            if used + need <= self.upload_space:
                return
        mb = self.upload_space / 1024**2
        raise NoSpace(f"the server's upload space ({mb:.0f} MB) is full: delete results to free the photos they keep")

    def _unreferenced_uploads(self) -> list[str]:
        """Ids of uploads no job (waiting, running or in the gallery) refers to, oldest first."""
        with self._lock:
            used = {job.upload for job in self.jobs.values()}
            used |= {job.region["mask"] for job in self.jobs.values() if job.region and job.region["mask"]}
            used |= {
                p["image"] for job in self.jobs.values() if job.target for p in job.target["targets"] if "image" in p
            }
        found = {}
        for path in self.uploads.glob("*.json"):
            if UPLOAD_ID.fullmatch(path.stem) and path.stem not in used:
                try:
                    found[path.stem] = path.stat().st_mtime
                except OSError:
                    pass
        return sorted(found, key=found.get)

    def _remove_upload(self, upload_id: str) -> int:
        freed = 0
        for suffix in ("json", "jpg", "bin", *(s[1:] for s in FILM_SUFFIXES)):  # the record first: an upload
            # without it is not offered
            path = self.uploads / f"{upload_id}.{suffix}"
            try:
                size = path.stat().st_size
                path.unlink()
                freed += size
            except OSError:
                pass
        return freed

    def upload_info(self, upload_id: str) -> dict:
        if not isinstance(upload_id, str) or not UPLOAD_ID.fullmatch(upload_id):
            raise ClipstyleError("no such upload: upload the photo again")
        try:
            info = json.loads((self.uploads / f"{upload_id}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise ClipstyleError("no such upload: upload the photo again") from None
        if (
            not isinstance(info, dict)
            or info.get("id") != upload_id
            or not isinstance(info.get("name"), str)
            or info["name"] != clean_name(info["name"])
            or not all(_whole(info.get(k)) and info[k] > 0 for k in ("width", "height"))
            or not _film_ok(info.get("film"))
            or not self.upload_path(upload_id, info).is_file()
        ):
            raise ClipstyleError("no such upload: upload the photo again")
        return info

    def upload_path(self, upload_id: str, info: dict) -> Path:
        """The upload's bytes: ``<id>.bin`` for a photo, ``<id><suffix>`` for a film."""
        film = info.get("film")
        return self.uploads / (f"{upload_id}{film['suffix']}" if film else f"{upload_id}.bin")

    def region_for(self, form: dict) -> dict | None:
        """The form's region (region_from_form) with its mask upload checked: an image upload of
        this server, readable as a mask (clipstyle.regions.masks.read_mask)."""
        region = region_from_form(form)
        if region is None or region["mask"] is None:
            return region
        info = self.upload_info(region["mask"])
        if info.get("film"):
            raise ClipstyleError(f"{info['name']}: a mask is an image, not a film")
        region["mask_name"] = info["name"]
        path = self.upload_path(region["mask"], info)
        try:
            self._region(region).check()
        except ClipstyleError as exc:
            raise ClipstyleError(describe_error(exc, path, info["name"])) from None
        return region

    def targets_for(self, prompts: list[str], form: dict) -> dict[str, dict | None]:
        """The form's jobs (targets_from_form) by label, as `clipstyle run` plans them: each style
        image an image upload of this server, read with the checks every input gets, and named by
        the name it was uploaded under; weights and phrases checked by clipstyle.method.targets;
        every text CLIP reads checked as a prompt; two different targets under one label refused."""
        wanted: dict[str, dict | None] = {}
        for label, record in targets_from_form(prompts, form):
            if record is not None:
                for part in record["targets"]:
                    if "image" in part:
                        info = self.upload_info(part["image"])
                        if info.get("film"):
                            raise ClipstyleError(f"{info['name']}: a style image is an image, not a film")
                        part["name"] = info["name"]
                spec = self._targets(record)
                label = spec.label()
                check_prompts(spec.texts())
            if label in wanted and wanted[label] != record:
                raise ClipstyleError(f"two targets are both named {label!r}; rename a file or reword a prompt")
            wanted[label] = record
        return wanted

    def _targets(self, record: dict | None) -> Targets | None:
        """The library's Targets for a job's target record (None for a plain prompt): style images
        read again from their uploads (ImageError names the upload by its name)."""
        if record is None:
            return None
        parts = []
        for part in record["targets"]:
            if "text" in part:
                parts.append(Target(part["text"], weight=part["weight"]))
                continue
            info = self.upload_info(part["image"])
            path = self.upload_path(part["image"], info)
            try:
                image = StyleImage.open(path, self.max_pixels)
            except ClipstyleError as exc:
                raise ClipstyleError(describe_error(exc, path, part["name"])) from None
            parts.append(Target(image=replace(image, name=part["name"]), weight=part["weight"]))
        return Targets(tuple(parts), tuple(record["avoid"]), record["avoid_weight"])

    def _region(self, region: dict | None) -> ServedRegion | None:
        """The library's Region for a job's region record."""
        if region is None:
            return None
        mask = region["mask"]
        return ServedRegion(
            mask=self.uploads / f"{mask}.bin" if mask else None,
            where=region["where"],
            invert=region["invert_mask"],
            feather=region["feather"],
            preserve_colour=region["preserve_color"],
            mask_name=region["mask_name"],
        )

    # --- submitting -------------------------------------------------------------------------------------

    def submit_stylize(self, upload_id: str, prompts: list[str], form: dict) -> list[Job]:
        """One job per prompt; every value is checked before any job is queued."""
        info = self.upload_info(upload_id)
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ClipstyleError("prompts must be a list of texts")
        prompts = [p.strip() for p in prompts if p.strip()]
        if len(prompts) > MAX_PROMPTS:
            raise ClipstyleError(f"{len(prompts)} prompts: at most {MAX_PROMPTS} at a time")
        for p in prompts:
            if len(p) > MAX_PROMPT_CHARS:
                raise ClipstyleError(f"a prompt has {len(p):,} characters: at most {MAX_PROMPT_CHARS:,}")
        check_prompts(prompts)
        if not isinstance(form, dict):
            raise ClipstyleError("form must be an object")
        if info.get("film"):
            raise ClipstyleError(
                f"{info['name']}: a film is restyled with a saved style: use Apply on a finished result"
            )
        settings = settings_from_form(form)
        region = self.region_for(form)
        wanted = self.targets_for(prompts, form)  # label -> target record (None: the prompt alone)
        self._check_size(settings, info)
        base_seed = _seed(form)
        preset = form.get("preset") or "paper"
        jobs = [
            Job(
                id=uuid.uuid4().hex[:12],
                kind="stylize",
                upload=upload_id,
                input_name=info["name"],
                prompt=label,  # as run names a job: the prompt, "[style.jpg]", or a blend's parts and weights
                settings=settings.to_dict(),
                preset=preset,
                base_seed=base_seed,
                seed=pair_seed(base_seed, info["name"], label),
                steps=settings.steps,
                created=time.time(),
                region=dict(region) if region else None,
                target=target,
            )
            for label, target in wanted.items()
        ]
        self._enqueue(jobs, {job.id: settings for job in jobs})
        return jobs

    def _check_size(self, settings: Settings, info: dict) -> None:
        """Refuse settings the device cannot hold, as `clipstyle run` does before it starts (the size,
        then this photo at that size): a job that cannot fit is refused here, never queued."""
        device = self.models.device
        check_run_size(settings, device)
        w, h = fit_size(int(info["width"]), int(info["height"]), settings.size)
        check_fits(
            run_bytes(w, h, settings.crops, settings.crop_batch),
            device,
            f"size {settings.size}: optimising at {w}x{h} px with {settings.crops} crops",
            "lower the size or the crops",
        )

    def submit_apply(self, style_of: str, upload_id: str, strength: float = 1.0, form: dict | None = None) -> Job:
        """Apply a finished job's style to an upload; ``form`` may hold the region and colour
        controls (REGION_FIELDS), as `clipstyle apply --where/--mask/--preserve-color` takes them."""
        info = self.upload_info(upload_id)
        if form is not None and not isinstance(form, dict):
            raise ClipstyleError("form: not a JSON object")
        region = self.region_for({k: v for k, v in (form or {}).items() if k in REGION_FIELDS})
        if region is not None and info.get("film"):
            raise ClipstyleError(f"{info['name']}: the region and colour controls work on photos, not on films")
        with self._lock:
            source = self.jobs.get(style_of) if isinstance(style_of, str) else None
        if source is None or not source.style:
            raise ClipstyleError("that result has no style file (only finished runs keep one)")
        strength = _form_number(strength, "strength")
        if not 0.0 <= strength <= 1.0:  # false for nan too
            raise ClipstyleError("strength must be between 0 and 1")
        film = info.get("film")
        job = Job(
            id=uuid.uuid4().hex[:12],
            kind="apply",
            upload=upload_id,
            input_name=info["name"],
            prompt=source.prompt,
            style_of=style_of,
            strength=strength,
            steps=film["frames"] if film else 1,
            created=time.time(),
            film=bool(film),
            region=region,
        )
        self._enqueue([job])
        return job

    def _enqueue(self, jobs: list[Job], settings: dict[str, Settings] | None = None) -> None:
        with self._wake:
            if self._closing:
                raise ClipstyleError("the server is stopping")
            if len(self._queue) + len(jobs) > self.max_queued:
                raise QueueFull(
                    f"{len(self._queue)} jobs are waiting, at most {self.max_queued}: try again when some have run"
                )
            for job in jobs:
                self.jobs[job.id] = job
                self._queue.append(job.id)
            self._settings.update(settings or {})
            self._changed()

    # --- changing ---------------------------------------------------------------------------------------

    def stop(self, job_id: str) -> Job:
        """A queued job is cancelled; a running one ends after its current step, keeping its last image."""
        with self._wake:
            job = self._get(job_id)
            if job.status == "queued":
                self._queue.remove(job_id)
                self._settings.pop(job_id, None)
                job.status = "cancelled"
                job.finished = time.time()
                self._forget_unkept()
            elif job.status == "running":
                self._stop.add(job_id)
            self._changed()
            return job

    def _forget_unkept(self) -> None:
        """Keep at most ``max_queued`` of the finished jobs that have no result (cancelled, failed,
        interrupted): dropping the oldest, so that submitting and cancelling in a loop cannot grow
        the state every page reads without bound, nor hold uploads. Call with the lock held."""
        unkept = [j for j in self.jobs.values() if j.status in FINISHED and j.status not in KEPT]
        if len(unkept) > self.max_queued:
            unkept.sort(key=lambda j: j.finished or j.created)
            for job in unkept[: len(unkept) - self.max_queued]:
                del self.jobs[job.id]
                self._previews.pop(job.id, None)

    def delete(self, job_id: str) -> None:
        """Remove a finished job and its files from the gallery. Its files go first: when they cannot
        (a read-only folder), the job stays, with its files, and the error says why."""
        with self._wake:
            job = self._get(job_id)
            if job.status in ("queued", "running"):
                raise ClipstyleError("stop the job first")
            users = [j.id for j in self.jobs.values() if j.style_of == job_id and j.status in ("queued", "running")]
            if users:
                raise ClipstyleError(f"a waiting job ({users[0]}) uses its style: cancel it first")
            # the record first: once it is gone, the job is not reloaded, whatever else stays
            for name in (f"{job_id}.json", f"{job_id}.png", f"{job_id}.style", f"{job_id}.mp4"):
                try:
                    (self.results / name).unlink(missing_ok=True)
                except OSError as exc:
                    if name.endswith(".json"):
                        raise ClipstyleError(f"cannot delete the result: {exc.strerror or exc}") from None
            del self.jobs[job_id]
            self._previews.pop(job_id, None)
            self._changed()

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
            job = self.jobs.get(job_id) if isinstance(job_id, str) else None
            data = self._previews.get(job_id) if job is not None else None
        if job is None:
            return None
        if data is not None:
            return data, "image/jpeg"
        if job.png:
            path = self.served_file("results", f"{job.id}.png")  # the job's own name, whatever its record says
            try:
                return (path.read_bytes(), "image/png") if path is not None else None
            except OSError:
                return None
        return None

    def served_file(self, folder: str, name: str) -> Path | None:
        """A file the server may hand out, or None: only known names in its own folders (no traversal)."""
        pattern = SERVED.get(folder)
        if pattern is None or not isinstance(name, str) or not pattern.fullmatch(name):
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
                job.error = self.public(describe_error(exc, self._source(job), job.input_name))
            if status not in KEPT:
                self._remove_results(job.id)  # a failed write (a full disk) leaves nothing behind
            with self._wake:
                job.status = status
                job.finished = time.time()
                self._previews.pop(job.id, None)
                if job.kind == "apply":
                    job.seconds = round(time.perf_counter() - started, 3)
                self._stop.discard(job.id)
                self._running = None
                if status in KEPT:
                    self._save_record(job)  # before anyone sees it finished (and may delete it)
                else:
                    self._forget_unkept()
                self._changed()

    def _source(self, job: Job) -> Path:
        """Where a job's upload is (``<id>.bin``, or a film's own suffix)."""
        try:
            return self.upload_path(job.upload, self.upload_info(job.upload))
        except ClipstyleError:
            return self.uploads / f"{job.upload}.bin"

    def _remove_results(self, job_id: str) -> None:
        for name in (f"{job_id}.png", f"{job_id}.style", f"{job_id}.mp4", f"{job_id}.json"):
            try:
                (self.results / name).unlink(missing_ok=True)
            except OSError:
                pass

    def _stylize(self, job: Job) -> str:
        """The job as a one-pair plan, executed as `clipstyle run` executes its plans (clipstyle.jobs.plan):
        the same checks, the same files. Stop keeps the last image (no style file)."""
        with self._lock:
            settings = self._settings.pop(job.id)
        source = self.uploads / f"{job.upload}.bin"
        target = self._targets(job.target)
        pair = RunJob(
            InputFile(source, job.input_name, label=job.input_name),
            job.prompt,
            self.results / f"{job.id}.png",
            job.seed,
            style=self.results / f"{job.id}.style",
            target=None if target is None or target.plain else target,  # as plan_run sets it
        )
        # the form's region and colour values, as `clipstyle run --where/--mask/--preserve-color` takes them
        options = RunOptions(base_seed=job.base_seed, max_pixels=self.max_pixels, region=self._region(job.region))
        plan = RunPlan([pair], settings, options, models=self.models)
        events = _JobEvents(self, job)
        try:
            execute(plan, Report(None), events)
        except _Stopped:
            if self._closing or events.last is None:  # nothing to keep
                return "interrupted" if self._closing else "cancelled"
            compute = compute_info(self.models.device)  # as a finished job's PNG records it
            meta = output_metadata(pair, settings, self.models.info, options, file_sha256(source), compute)
            meta["clipstyle"]["stopped_at_step"] = job.step
            try:
                self._finish(job, events.last, meta)
            except ClipstyleError as exc:
                job.error = str(self._refusal("cannot keep the image", exc))
                return "failed"
            return "stopped"
        (record,) = events.records
        if record["status"] != "ok":
            job.error = self.public((record["error"] or "failed").replace(str(source), job.input_name))
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
        """`clipstyle apply`'s work (apply_files, as that command calls it) on one upload."""
        with self._lock:
            source_job = self.jobs.get(job.style_of)
        style_path = self.results / f"{job.style_of}.style"
        if source_job is None or not source_job.style or not style_path.is_file():
            job.error = "the style was deleted before this job ran"
            return "failed"
        style = load_style(style_path)
        upload = self._source(job)
        out = self.results / (f"{job.id}.mp4" if job.film else f"{job.id}.png")
        records = []
        started = time.perf_counter()

        queue = self

        class Events(BatchEvents):
            def progress(self, _job, info):
                # after each tile, or each frame of a film: Stop ends the job there, keeping nothing
                if isinstance(info, FrameProgress):
                    with queue._wake:
                        job.step, job.steps = info.done, max(info.total, info.done)
                        job.seconds = round(time.perf_counter() - started, 3)
                        queue._changed()
                if job.id in queue._stop or queue._closing:
                    raise _Stopped()

            def note(self, _job, message):
                job.notes.append(message)

            def finished(self, _job, record):
                records.append(record)

        try:
            apply_files(
                [ApplyJob(InputFile(upload, job.input_name, label=job.input_name), out)],
                [style],
                ApplyOptions(
                    strength=job.strength,
                    max_pixels=self.max_pixels,
                    region=self._region(job.region),
                    region_clip=self.models.clip,
                ),
                Report(None),
                Events(),
                device=self.models.device,
            )
        except _Stopped:
            return "interrupted" if self._closing else "cancelled"
        (record,) = records
        if record["status"] != "ok":
            job.error = self.public((record["error"] or "failed").replace(str(upload), job.input_name))
            return "failed"
        job.size = record["size"]
        if job.film:
            # the film's record (container metadata), as the PNG's text chunks are shown: JSON as text
            kept = video.read_record(out)
            job.metadata = {"clipstyle": json.dumps(kept)} if kept is not None else {}
            job.video = out.name
            job.step = job.steps = record["frames"]
            return "done"
        job.metadata = _png_text(out)
        job.png = out.name
        job.step = 1
        return "done"

    # --- the gallery on disk ----------------------------------------------------------------------------

    def _save_record(self, job: Job) -> None:
        data = json.dumps(asdict(job), ensure_ascii=False).encode("utf-8")
        try:
            write_atomic(self.results / f"{job.id}.json", lambda fh: fh.write(data), overwrite=True)
        except ClipstyleError as exc:
            job.notes.append(f"not kept for the next start: {self.public(exc.reason)}")

    def _load_gallery(self) -> None:
        """The records in results/, each checked field by field (Job.from_record); others are skipped."""
        for path in sorted(self.results.glob("*.json")):
            try:
                if not path.is_file() or path.stat().st_size > 1024**2:
                    raise ValueError
                job = Job.from_record(json.loads(path.read_text(encoding="utf-8")), path.stem)
            except (OSError, ValueError, RecursionError):
                job = None
            if job is None or not (self.results / (job.png or job.video)).is_file():
                self.skipped.append(path.name)
                continue
            self.jobs[job.id] = job

    def _tidy(self) -> None:
        """At start: remove what a server that was killed left: temporary files (of writers that are
        gone), results of a job that had not finished (a PNG or style file without a record: the record
        is written last), and uploads no job refers to (a page open across the restart uploads its
        photo again). A result whose record was skipped stays: the record may be a newer server's."""
        for folder in (self.uploads, self.results):
            for path in folder.glob(".*.tmp"):
                match = TEMPORARY.fullmatch(path.name)
                if match and not _alive(int(match.group(1))):
                    path.unlink(missing_ok=True)
        for path in self.results.iterdir():
            if SERVED["results"].fullmatch(path.name) and not path.with_suffix(".json").exists():
                path.unlink(missing_ok=True)
        for upload_id in self._unreferenced_uploads():
            self._remove_upload(upload_id)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (a temporary file of a live writer is left alone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


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
