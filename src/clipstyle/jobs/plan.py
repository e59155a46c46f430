"""A run planned once and executed one way, whoever submits it: ``clipstyle run``, ``clipstyle serve``
or a script.

:class:`ModelSpec` names the encoders as the options do (and loads them, in
this process or in a worker); :class:`Executor` says where the pairs run;
:func:`plan_run` turns inputs, prompts and options into a :class:`RunPlan`,
checking everything a user can get wrong before anything is read, loaded or
written; :func:`execute` runs a plan through the executor it names. What is
shared by every executor (skipping what is done, the records, the summary,
the finishing of a pair) lives in clipstyle.jobs.batch.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from clipstyle.config import AVOID_WEIGHT, CLIP_MODEL, CLIP_PRETRAINED, Settings
from clipstyle.errors import ClipstyleError
from clipstyle.jobs.batch import Events, Summary
from clipstyle.jobs.pairs import RunJob
from clipstyle.prompts import is_blank

if TYPE_CHECKING:
    from clipstyle.jobs.run import RunOptions

# torch is imported by what runs a plan, not by planning: a command can be stopped at
# once while it starts (clipstyle.interrupts), and its plan is made before torch loads.

EXECUTORS = ("local", "devices", "ray")


@dataclass(frozen=True)
class ModelSpec:
    """Which CLIP and VGG-19 a run uses, as ``--clip-model``, ``--clip-pretrained``, ``--clip-weights`` and
    ``--vgg-weights`` name them. Picklable: a worker process or a Ray actor loads its own copy."""

    clip_model: str = CLIP_MODEL
    clip_pretrained: str = CLIP_PRETRAINED
    clip_weights: Path | None = None
    vgg_weights: Path | None = None

    def load(self, device="auto", progress: bool = True):
        """The models on ``device`` (a name or torch.device; auto: cuda, then mps, then cpu)."""
        from clipstyle.device import resolve_device
        from clipstyle.models.loading import load_models

        return load_models(
            clip_model=self.clip_model,
            clip_pretrained=self.clip_pretrained,
            clip_weights=self.clip_weights,
            vgg_weights=self.vgg_weights,
            device=resolve_device(str(device)),
            progress=progress,
        )

    def info(self) -> dict:
        """What outputs record about the models, known without loading them (reruns compare it)."""
        from clipstyle.models.loading import models_info

        return models_info(self.clip_model, self.clip_pretrained, self.clip_weights, self.vgg_weights)


@dataclass(frozen=True)
class Executor:
    """Where a plan's pairs run: ``local`` (this process, on ``device``), ``devices`` (one worker
    process per device of ``devices``) or ``ray`` (the actors of a Ray cluster)."""

    kind: str = "local"
    device: str = "auto"
    devices: tuple[str, ...] = ()
    ray_address: str | None = None
    ray_workers: int | None = None
    ray_cpus_per_worker: int = 1

    def __post_init__(self) -> None:
        if self.kind not in EXECUTORS:
            raise ClipstyleError(f"executor must be one of {', '.join(EXECUTORS)}, not {self.kind!r}")
        if self.kind == "devices" and not self.devices:
            raise ClipstyleError("the devices executor needs at least one device")

    def local_devices(self) -> list[str]:
        """The devices of this machine the plan will use (none for Ray: the cluster's)."""
        return {"local": [self.device], "devices": list(self.devices), "ray": []}[self.kind]


@dataclass
class RunPlan:
    """Everything a run does: its pairs (inputs x prompts, each with its output, seed and style file),
    the optimisation settings, what happens to outputs, the models and the executor.

    ``models``: a ModelSpec (loaded where the pairs run, only if a pair needs them), or models already
    loaded (a clipstyle.models.encoders.Models, as a server keeps them), or a callable returning them.
    """

    pairs: list[RunJob]
    settings: Settings = field(default_factory=Settings)
    options: RunOptions | None = None  # None: RunOptions()
    models: ModelSpec | object = field(default_factory=ModelSpec)
    executor: Executor = field(default_factory=Executor)

    def __post_init__(self) -> None:
        if self.options is None:
            from clipstyle.jobs.run import RunOptions

            self.options = RunOptions()


def check_prompts(prompts: list[str]) -> None:
    """Every prompt usable as text: not empty, encodable as UTF-8."""
    if any(is_blank(p) for p in prompts):
        raise ClipstyleError("the prompt is empty")
    for p in prompts:
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:
            raise ClipstyleError("the prompt is not valid UTF-8 (check the terminal's encoding)") from None


def check_sizes(settings: Settings, options: RunOptions, executor: Executor) -> None:
    """Each local device exists and can hold the run's sizes (checked before any input is read)."""
    from clipstyle.device import resolve_device
    from clipstyle.jobs.memory import check_render_size, check_run_size

    for name in executor.local_devices():
        device = resolve_device(name)
        check_run_size(settings, device)
        if options.output_longest:
            check_render_size(options.output_longest, device, "--output-size")


def plan_run(
    sources: list[str],
    prompts: list[str],
    *,
    output: Path | None = None,
    settings: Settings | None = None,
    options: RunOptions | None = None,
    models: ModelSpec | object | None = None,
    executor: Executor | None = None,
    recursive: bool = False,
    from_file: str | None = None,
    stdin=None,
    shard: tuple[int, int] | None = None,
    save_style: Path | None = None,
    report: Path | None = None,
    videos: bool = False,
    train_on: list[str] | None = None,
    targets: list = (),
    avoid: tuple[str, ...] = (),
    avoid_weight: float = AVOID_WEIGHT,
) -> RunPlan:
    """Plan a run of every image of ``sources`` (files, folders, globs; ``from_file``: a list of
    paths, '-' for ``stdin``) with every prompt. Raises ClipstyleError, naming the file, for the
    first thing that cannot work: an empty prompt, an absent device, a size that cannot fit, no
    input image, outputs that clash with each other, with an input or with ``report``.

    ``videos``: folders give their films too, and a film trains its style on its own frames and
    is rendered whole. ``train_on``: files, folders or globs of one set that one style per target
    is trained over, saved to ``save_style`` (then ``sources`` must be empty).
    ``targets``: more jobs per image beside the prompts, each a clipstyle.method.targets.Targets
    (a style image, or a blend of texts and style images with weights: one network each).
    ``avoid``: phrases every job's patches are pushed away from, with ``avoid_weight``. Each
    pair carries its full Targets (RunJob.target) wherever it runs."""
    from clipstyle.jobs.inputs import InputFile, check_outputs, collect_inputs
    from clipstyle.jobs.pairs import plan_pairs, plan_set
    from clipstyle.jobs.run import RunOptions
    from clipstyle.method.targets import Targets

    settings = settings or Settings()
    options = options or RunOptions()
    executor = executor or Executor()
    check_prompts(prompts)
    if options.batch == "auto" and executor.kind != "local":  # chosen where the models load, per device
        raise ClipstyleError("--batch auto needs one device (--device); with --devices or Ray give a number")
    specs = {}  # job label -> its Targets, for every job that is more than a prompt
    for spec in [*(Targets.of(p) for p in dict.fromkeys(prompts)), *targets]:
        spec = spec.with_avoid(avoid, avoid_weight) if avoid else spec
        label = spec.label()
        if label in specs and specs[label] != spec:
            raise ClipstyleError(f"two targets are both named {label!r}; rename a file or reword a prompt")
        specs[label] = spec
    check_prompts([t for spec in specs.values() for t in spec.texts()])
    check_sizes(settings, options, executor)
    if executor.kind == "ray":  # a cluster address nothing (or not Ray) answers at, before folders are made
        from clipstyle.jobs.ray_executor import check_address

        check_address(executor.ray_address or os.environ.get("RAY_ADDRESS"))
    labels = list(specs)
    if train_on:
        if save_style is None:
            raise ClipstyleError("training on a set (--train-on) needs --save-style FILE.style for the style")
        members = collect_inputs(list(train_on), recursive=recursive, videos=True)
        if not members:
            raise ClipstyleError("no images to train on found", train_on[0])
        name = InputFile(Path(train_on[0]), Path(train_on[0].rstrip("/\\")).name or "set")
        pairs = plan_set(name, members, labels, save_style, options.base_seed)
        inputs = members
    else:
        inputs = collect_inputs(list(sources), recursive=recursive, from_file=from_file, stdin=stdin, videos=videos)
        if not inputs:
            raise ClipstyleError("no input images found")
        pairs = plan_pairs(inputs, labels, output, options.base_seed, shard, save_style)
    for pair in pairs:
        pair.target = None if specs[pair.prompt].plain else specs[pair.prompt]
    several = [p for p in pairs if p.film or p.train_on is not None]
    if several and executor.kind != "local":
        raise ClipstyleError("films and --train-on run on this machine's device (--device), not with --devices or Ray")
    if options.contrast and any(p.film for p in pairs):
        raise ClipstyleError("--contrast (a per-image rescaling, which would flicker) works on images, not on films")
    if several and options.region is not None:
        raise ClipstyleError("--mask, --where and --preserve-color work on images, not on films or --train-on sets")
    check_outputs(pairs, report)
    return RunPlan(pairs, settings, options, ModelSpec() if models is None else models, executor)


def load_models(spec: ModelSpec, device="auto", progress: bool = True):
    """What every executor calls to load a plan's models (a module-level function: workers unpickle
    it by name, and a test or an embedding program may put its own models here)."""
    return spec.load(device, progress)


def _loader(models, **fixed) -> Callable | object:
    """How an executor gets the plan's models: ``loader(device=...)``, picklable for a ModelSpec;
    models already loaded (or a callable of the caller's) as they are."""
    if isinstance(models, ModelSpec):
        return functools.partial(load_models, models, **fixed)
    return models


def execute(plan: RunPlan, report, events: Events | None = None, summary: Summary | None = None) -> Summary:
    """Run ``plan`` through its executor. ``report``: a clipstyle.jobs.report.Report; ``summary``:
    filled in as pairs end (give one to read the counts after an interruption)."""
    from clipstyle.jobs.run import run_pairs

    ex, spec = plan.executor, plan.models
    info = spec.info() if isinstance(spec, ModelSpec) else None  # else the loaded models' own
    summary = Summary() if summary is None else summary
    if ex.kind == "ray":
        from clipstyle.jobs.ray_executor import run_with_ray

        return run_with_ray(
            plan.pairs,
            _loader(spec, progress=False),
            plan.settings,
            plan.options,
            report,
            events,
            address=ex.ray_address,
            workers=ex.ray_workers,
            cpus_per_worker=ex.ray_cpus_per_worker,
            device=ex.device,
            models_info=info,
            summary=summary,
        )
    if ex.kind == "devices":
        from clipstyle.jobs.devices import run_on_devices

        loader = _loader(spec, progress=False)
        return run_on_devices(
            plan.pairs, list(ex.devices), loader, plan.settings, plan.options, report, events, info, summary
        )
    loader = _loader(spec, device=ex.device)
    return run_pairs(plan.pairs, loader, plan.settings, plan.options, report, events, info, summary)
