"""Timing optimisation steps against the compute floor, on the real architectures.

The compute floor of one step (docs/performance.md) is one CLIP forward and backward
pass over the crops plus the whole image (crops + 1 images at 224x224) and one
VGG-19 forward and backward pass up to relu5_2 at the output size, in fp32,
with frozen weights (only input gradients), run the plain way: open_clip's own
``encode_image`` and a contiguous (NCHW) VGG trunk. Everything a step does
beyond that is overhead; a step can go below the floor by computing less than
the plain passes do (see ClipEncoder's fast path) or in a faster layout or
precision.

Steps and floor passes alternate in one process (step, floor, step, floor...)
and the medians are compared, so that load from other processes and the
machine's clock affect both alike. The weights are random: timing does not
depend on them, and nothing is downloaded.
"""

from __future__ import annotations

import copy
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from clipstyle.config import CLIP_MODEL, Settings
from clipstyle.device import (
    autocast_dtype,
    peak_memory_bytes,
    precision_name,
    reset_peak_memory,
    synchronize,
    use_channels_last,
)
from clipstyle.method import losses as L
from clipstyle.method.counting import OpCounter
from clipstyle.method.loop import make_network, stylize_many
from clipstyle.method.rejection import Rejection
from clipstyle.method.text import text_embedding
from clipstyle.method.unet import InstanceNorm
from clipstyle.models.encoders import Models
from clipstyle.models.loading import load_models
from clipstyle.prompts import NO_TEMPLATES

PROMPT = "an oil painting with thick brush strokes"


@dataclass
class Timing:
    """Seconds of repeated runs of one thing: every run, and their median."""

    runs: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.runs) if self.runs else float("nan")

    def add(self, seconds: float) -> None:
        self.runs.append(seconds)


@dataclass
class BenchResult:
    """What ``bench`` measured. Seconds are medians over ``repeats`` alternating runs."""

    device: str
    processor: str
    threads: int
    precision: str
    memory_format: str
    compile: str  # torch.compile's mode, "" when off
    size: tuple[int, int]  # (width, height) of the output
    crops: int
    crop_size: int
    crop_batch: int
    batch: int
    steps: int  # steps per image, for images per minute
    repeats: int
    seconds_per_step: float
    floor_seconds: float
    floor_clip_seconds: float
    floor_vgg_seconds: float
    ratio: float  # seconds_per_step / floor_seconds
    paired_ratio: float  # median over repeats of (step / the floor pass right after it): steadier under load
    step_runs: list[float]
    floor_runs: list[float]
    peak_memory_bytes: int | None
    peak_memory_kind: str  # "device" (CUDA: the steps alone; MPS) or "process" (CPU: peak RSS of the process)
    images_per_minute: float  # at this batch: 60 / (seconds_per_step * steps / batch)
    first_step_seconds: float  # the first step (warm-up; with --compile, the compilation)
    baseline_seconds: float | None = None  # the reference-style step, plain fp32
    baseline_runs: list[float] | None = None
    speedup: float | None = None  # baseline_seconds / seconds_per_step
    batch1: dict | None = None  # with batch > 1: seconds_per_step, images_per_minute at batch 1
    load_seconds: float | None = None  # loading the models, when loaded from files or caches
    load_from: str | None = None  # "local files" or "caches"
    import_seconds: float | None = None  # importing open_clip and torchvision, just before loading
    rejected_runs: list[float] = field(default_factory=list)  # fraction of crops rejected, each timed step
    forced: list[dict] = field(default_factory=list)  # per forced rejected fraction: see forced_rejection
    # Operators of one step (count_operators): calls, launches, host_reads. ``ops``: the path
    # this device takes; ``ops_accelerator``: on the CPU, the path a GPU takes (no host reads).
    ops: dict | None = None
    ops_accelerator: dict | None = None
    cuda_graph: bool = False
    batch_auto: bool = False  # the batch was --batch auto's choice (clipstyle.jobs.memory.auto_batch)
    torch_version: str = torch.__version__

    def to_dict(self) -> dict:
        return asdict(self)


def processor_name(device: torch.device) -> str:
    """The CPU's model name (as lscpu prints it) or the accelerator's name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bench_models(device: torch.device, clip_model: str = CLIP_MODEL) -> Models:
    """The real architectures with random weights (nothing downloaded).

    OpenAI's ViT-B/32 weights run with QuickGELU, so without weights the
    ``-quickgelu`` variant is built: the network ``run`` uses, op for op.
    """
    import open_clip

    name = clip_model
    if not name.endswith("-quickgelu") and f"{name}-quickgelu" in open_clip.list_models():
        name = f"{name}-quickgelu"
    return load_models(clip_model=name, device=device, random_init=True)


def bench_images(size: int, batch: int = 1, seed: int = 0) -> list[torch.Tensor]:
    """``batch`` square (1, 3, s, s) images in [0, 1], s = size rounded to a multiple of 8."""
    side = max(8, round(size / 8) * 8)
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, side)
    base = torch.stack(
        [ramp.view(1, -1).expand(side, side), ramp.view(-1, 1).expand(side, side), torch.full((side, side), 0.5)]
    )
    return [(0.8 * base + 0.2 * torch.rand(3, side, side, generator=g)).unsqueeze(0) for _ in range(batch)]


class Floor:
    """The compute floor: plain fp32 CLIP and VGG passes with input gradients only.

    The VGG trunk is a contiguous copy, so that the step's layout choice
    (channels-last) does not leak into the floor.
    """

    def __init__(self, models: Models, n_clip: int, vgg_shape: tuple[int, ...]):
        self.device = models.device
        self.clip = models.clip.model  # open_clip's CLIP: its own, unmodified encode_image
        self.vgg = copy.deepcopy(models.vgg).use_channels_last(False)
        side = models.clip.image_size
        g = torch.Generator().manual_seed(1)
        self.clip_input = torch.rand(n_clip, 3, *side, generator=g).to(self.device)
        self.vgg_input = torch.rand(*vgg_shape, generator=g).to(self.device)

    def clip_pass(self) -> None:
        x = self.clip_input.clone().requires_grad_()
        self.clip.encode_image(x).sum().backward()

    def vgg_pass(self) -> None:
        x = self.vgg_input.clone().requires_grad_()
        feats = self.vgg(x)
        sum(f.sum() for f in feats.values()).backward()

    def measure(self, clip_t: Timing, vgg_t: Timing, total: Timing) -> None:
        synchronize(self.device)
        t0 = time.perf_counter()
        self.clip_pass()
        synchronize(self.device)
        t1 = time.perf_counter()
        self.vgg_pass()
        synchronize(self.device)
        t2 = time.perf_counter()
        clip_t.add(t1 - t0)
        vgg_t.add(t2 - t1)
        total.add(t2 - t0)


def _reference_network(seed: int, device: torch.device):
    """A StyleNet as a plain implementation has it: nn.InstanceNorm2d, contiguous."""

    net = make_network(seed, device)
    for module in net.modules():
        if isinstance(module, nn.Sequential):
            for i, layer in enumerate(module):
                if isinstance(layer, InstanceNorm):
                    module[i] = nn.InstanceNorm2d(layer.num_features)
    return net.to(device)


class ReferenceStep:
    """The step as the reference code runs it: plain fp32, one crop at a time.

    Each crop is cut with torchvision's RandomCrop, warped with
    RandomPerspective and resized with Resize in a Python loop, the crops and
    the whole image go through open_clip's own encode_image, the losses are
    summed and one backward pass and a plain Adam step follow. Used only as a
    baseline for timing.
    """

    def __init__(self, models: Models, content: torch.Tensor, settings: Settings, floor: Floor):
        from torchvision import transforms

        device = models.device
        self.device, self.settings = device, settings
        self.content = content.to(device)
        self.clip, self.vgg = models.clip, floor.vgg  # plain VGG trunk: contiguous
        self.net = _reference_network(0, device)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=settings.lr)
        side = models.clip.image_size[0]
        self.cropper = transforms.RandomCrop(min(settings.crop_size, *content.shape[-2:]))
        self.augment = transforms.Compose(
            [
                transforms.RandomPerspective(fill=0, p=1, distortion_scale=settings.distortion),
                transforms.Resize(side, antialias=True),
            ]
        )
        with torch.no_grad():
            style = text_embedding(models, PROMPT, settings.templates)
            source = text_embedding(models, settings.source, settings.templates)
            self.text_dir = L.text_direction(style, source)
            self.source_emb = F.normalize(self._encode(self.clip.resize(self.content)), dim=-1)[0]
            self.content_feats = self.vgg(self.content)

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        x = (images - self.clip.mean) / self.clip.std
        return self.clip.model.encode_image(x)

    def __call__(self) -> None:
        s = self.settings
        out = self.net(self.content)
        patches = torch.cat([self.augment(self.cropper(out)) for _ in range(s.crops)])
        per_patch = L.directional_loss(self._encode(patches), self.source_emb, self.text_dir)
        patch = L.reject_below(per_patch, s.threshold).mean()
        size = self.clip.image_size
        whole = F.interpolate(out, size=size, mode="bicubic", align_corners=False)
        direction = L.directional_loss(self._encode(whole), self.source_emb, self.text_dir).mean()
        content = L.content_loss(self.vgg(out), self.content_feats).sum()
        tv = L.total_variation(out).sum()
        loss = s.lambda_patch * patch + s.lambda_dir * direction + s.lambda_content * content + s.lambda_tv * tv
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()


def _time_steps(
    models: Models,
    settings: Settings,
    batch: int,
    warmup: int,
    repeats: int,
    between: Callable[[], None] | None,
    rejection: Rejection | None = None,
    steps_seen: list | None = None,
) -> tuple[Timing, float, int | None]:
    """Time ``repeats`` steps of stylize_many on ``batch`` pairs after ``warmup`` steps.

    ``between`` runs after every timed step (the floor, alternating with the
    steps). Returns the step timings, the first step's seconds, and the peak
    device memory of the steps alone (CUDA; None elsewhere). ``steps_seen``
    receives the StepInfo of pair 0 at every timed step.
    """

    device = models.device
    steps = warmup + repeats
    run_settings = settings.replace(steps=steps, log_every=1)  # losses read every step: each step ends synced
    timing, first, peak = Timing(), [], [None]

    def on_step(info) -> None:
        if info.pair != 0:
            return
        if info.step == 1:
            first.append(info.step_seconds)
        if device.type == "cuda":
            peak[0] = max(peak[0] or 0, peak_memory_bytes(device))
        if info.step > warmup:
            timing.add(info.step_seconds)
            if steps_seen is not None:
                steps_seen.append(info)
            if between is not None:
                between()
        synchronize(device)
        reset_peak_memory(device)

    contents = bench_images(settings.size, batch)
    results = stylize_many(
        contents,
        [PROMPT] * batch,
        list(range(batch)),
        models=models,
        settings=run_settings,
        callback=on_step,
        rejection=rejection,
    )
    failed = [r.error for r in results if r.error is not None]
    if failed:
        raise failed[0]
    return timing, first[0], peak[0]


# Images are this side when operators are counted: the same operators run at any
# size (but CLIP's input size, where the resize is skipped), much faster here.
COUNT_SIZE = 64
COUNT_STEPS = 5


def count_operators(models: Models, settings: Settings, batch: int = 1, host_reads: bool | None = None) -> dict:
    """Operators of one step at ``settings`` (clipstyle.method.counting): the fourth of
    COUNT_STEPS steps, after Adam's state is made and, on the graph path, after the step
    was recorded. host_reads: as stylize_many's (False: the accelerator's path on any device)."""
    counter = OpCounter()
    run_settings = settings.replace(steps=COUNT_STEPS, log_every=COUNT_STEPS, size=COUNT_SIZE)
    stylize_many(
        bench_images(COUNT_SIZE, batch),
        [PROMPT] * batch,
        list(range(batch)),
        models=models,
        settings=run_settings,
        host_reads=host_reads,
        watch=counter,
    )
    return counter.steps[-2].to_dict()


def forced_rejection(
    models: Models, settings: Settings, rate: float, *, batch: int, warmup: int, repeats: int, floor: Floor
) -> dict:
    """Steps with ``rate`` of each pair's crops forced to count as rejected, before and after the two-pass path.

    One loop alternates the single pass ("before": every row through CLIP's
    forward and backward, as without the two-pass path) and the automatic
    choice ("after"), step by step, with a floor pass after each "after" step:
    ``repeats`` of each. Returns the medians, the per-repeat ratios after /
    before and after / floor, the rejected fraction of every timed step and how
    many "after" steps took the two-pass path.
    """
    seen: list = []
    clip_t, vgg_t, floor_t = Timing(), Timing(), Timing()

    def between() -> None:
        if seen and seen[-1].step % 2 == 0:  # steps 2, 4, ... ran the automatic choice
            floor.measure(clip_t, vgg_t, floor_t)

    # path cycles per step index (0-based): even "single", odd "auto"; warm-up keeps the pairing
    rejection = Rejection(path=("single", "auto"), force=rate)
    _time_steps(models, settings, batch, 2 * ((warmup + 1) // 2), 2 * repeats, between, rejection, seen)
    before = [i.step_seconds for i in seen if i.step % 2 == 1]
    after = [i.step_seconds for i in seen if i.step % 2 == 0]
    return {
        "rate": rate,
        "before_seconds": statistics.median(before),
        "after_seconds": statistics.median(after),
        "after_over_before": statistics.median(a / b for a, b in zip(after, before)),
        "floor_seconds": floor_t.median,
        "before_over_floor": statistics.median(b / f for b, f in zip(before, floor_t.runs)),
        "after_over_floor": statistics.median(a / f for a, f in zip(after, floor_t.runs)),
        "two_pass_steps": sum(i.two_pass for i in seen if i.step % 2 == 0),
        "after_steps": len(after),
        "rejected_per_step": [i.rejected for i in seen],
        "before_runs": before,
        "after_runs": after,
        "floor_runs": floor_t.runs,
    }


def run_bench(
    models: Models,
    settings: Settings,
    *,
    batch: int = 1,
    warmup: int = 2,
    repeats: int = 5,
    baseline: bool = False,
    force_reject: tuple[float, ...] = (),
    load_seconds: float | None = None,
    progress: Callable[[str], None] | None = None,
) -> BenchResult:
    """Time steps at ``settings`` and the compute floor, alternating, on ``models``' device.

    settings.steps is not run: it sets only how many steps an image takes for
    images per minute. Prompt templates are replaced by one template (the text
    encoder runs once per prompt, before the first step, so that does not
    change the steps). With ``baseline``, the reference-style step is timed too,
    alternating with the others. With ``batch`` > 1, batch 1 is timed as well.
    ``force_reject``: rejected fractions at which the step is timed before and
    after the two-pass CLIP path (forced_rejection).
    """
    say = progress or (lambda message: None)
    settings = settings.replace(templates=NO_TEMPLATES)
    device = models.device
    amp = autocast_dtype(settings.precision, device)
    channels_last = use_channels_last(settings.memory_format, device, amp)
    side = bench_images(settings.size)[0].shape[-1]

    def floor_for(n_pairs: int) -> Floor:
        return Floor(models, n_pairs * (settings.crops + 1), (n_pairs, 3, side, side))

    floor = floor_for(batch)
    clip_t, vgg_t, floor_t = Timing(), Timing(), Timing()
    reference = ReferenceStep(models, bench_images(settings.size)[0], settings, floor) if baseline else None
    base_t = Timing()

    def between() -> None:
        floor.measure(clip_t, vgg_t, floor_t)
        if reference is not None:
            synchronize(device)
            t = time.perf_counter()
            reference()
            synchronize(device)
            base_t.add(time.perf_counter() - t)

    # One floor pass (and reference step) before timing: first calls set up kernels.
    floor.clip_pass()
    floor.vgg_pass()
    if reference is not None:
        reference()
    say(f"timing {repeats} steps at batch {batch} after {warmup} warm-up steps")
    seen: list = []
    steps_t, first, peak = _time_steps(models, settings, batch, warmup, repeats, between, steps_seen=seen)
    peak_kind = "device"
    if peak is None:  # MPS: the driver's memory now; the CPU: the process's peak
        peak, peak_kind = peak_memory_bytes(device), "process" if device.type == "cpu" else "device"

    batch1 = None
    if batch > 1:
        say(f"timing {repeats} steps at batch 1")
        one_t, _, _ = _time_steps(models, settings, 1, warmup, repeats, None)
        batch1 = {
            "seconds_per_step": one_t.median,
            "images_per_minute": 60.0 / (one_t.median * settings.steps),
            "step_runs": one_t.runs,
        }

    step = steps_t.median
    result = BenchResult(
        device=str(device),
        processor=processor_name(device),
        threads=torch.get_num_threads(),
        precision=precision_name(amp),
        memory_format="channels_last" if channels_last else "contiguous",
        compile=settings.compile,
        size=(side, side),
        crops=settings.crops,
        crop_size=min(settings.crop_size, side),
        crop_batch=settings.crop_batch,
        batch=batch,
        steps=settings.steps,
        repeats=repeats,
        seconds_per_step=step,
        floor_seconds=floor_t.median,
        floor_clip_seconds=clip_t.median,
        floor_vgg_seconds=vgg_t.median,
        ratio=step / floor_t.median,
        paired_ratio=statistics.median(a / b for a, b in zip(steps_t.runs, floor_t.runs)),
        step_runs=steps_t.runs,
        floor_runs=floor_t.runs,
        peak_memory_bytes=peak,
        peak_memory_kind=peak_kind,
        images_per_minute=60.0 * batch / (step * settings.steps),
        first_step_seconds=first,
        batch1=batch1,
        load_seconds=load_seconds,
        rejected_runs=[i.rejected for i in seen],
        cuda_graph=settings.cuda_graph,
    )
    say("counting the operators of a step")
    result.ops = count_operators(models, settings, batch)
    if device.type == "cpu":
        result.ops_accelerator = count_operators(models, settings, batch, host_reads=False)
    for rate in force_reject:
        say(f"timing {repeats} steps before and after the two-pass path, {rate:g} of the crops rejected")
        result.forced.append(
            forced_rejection(models, settings, rate, batch=batch, warmup=warmup, repeats=repeats, floor=floor)
        )
    if reference is not None:
        result.baseline_seconds = base_t.median
        result.baseline_runs = base_t.runs
        result.speedup = base_t.median / step
    return result
