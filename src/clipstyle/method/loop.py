"""The optimisation loop (paper, Sec. 3): train a fresh StyleNet per (image, prompt) pair.

    L = lambda_patch * L_patch + lambda_dir * L_dir + lambda_c * L_content + lambda_tv * L_tv

(CLIPstyler, Kwon & Ye, CVPR 2022, eq. 5). Several pairs can be optimised in
one batch; each keeps its own network, optimiser, crops and seed, so a pair's
result does not depend on what it is batched with (up to rounding).

Gradient flow: the U-Net output ``out`` is detached into a leaf; every loss is
computed on the leaf (CLIP rows in chunks of ``crop_batch`` when memory is
short), each chunk back-propagates into the leaf, and one final backward pass
carries the leaf's gradient through the U-Net. When threshold rejection drops
enough patches, a no-grad CLIP pass over the crops first finds them and the
forward and backward pass covers the kept rows only (clipstyle.method.rejection).

A step is two functions (``gradients``, then ``update``: the Adam steps); the
graph path (``Settings.cuda_graph``) runs them on a step counter kept on the
device and, on CUDA, records them once as CUDA graphs and replays them
(_GraphStep, docs/performance.md).
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
import warnings
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from clipstyle.config import Settings
from clipstyle.device import (
    autocast,
    autocast_dtype,
    peak_memory_bytes,
    precision_name,
    reset_peak_memory,
    synchronize,
    use_channels_last,
)
from clipstyle.errors import ClipstyleError, NonFiniteLossError
from clipstyle.images import to_pil
from clipstyle.method import losses as L
from clipstyle.method.augment import CropDraw, crop_grids, draw_crops, sample_crops
from clipstyle.method.masked import composite, crop_sampler
from clipstyle.method.rejection import PathChooser, Rejection, kept_crops, select
from clipstyle.method.targets import Targets, avoid_directions, avoid_penalty, target_direction
from clipstyle.method.unet import StyleNet
from clipstyle.models.encoders import Models

LOSS_NAMES = ("total", "patch", "dir", "content", "tv")


@dataclass
class StepInfo:
    """Progress of one pair after one optimisation step (for callbacks)."""

    pair: int  # index of the pair in the batch
    step: int  # steps done, 1..steps
    steps: int
    losses: dict[str, float] | None  # read back every ``log_every`` steps and at the last step
    seconds: float  # since the first step started
    output: torch.Tensor  # (1, 3, H, W) current output in [0, 1], detached, on the device
    # This step alone, callbacks excluded (exact on an accelerator only when
    # losses were read at this step: otherwise the device may still be working).
    step_seconds: float = 0.0
    rejected: float | None = None  # fraction of this step's crops rejected, read with the losses
    two_pass: bool = False  # whether this step took the two-pass CLIP path


@dataclass
class StylizeResult:
    """One stylized pair. ``error`` is set (and ``image`` None) when the pair failed."""

    prompt: str
    seed: int
    steps: int
    size: tuple[int, int]  # (width, height) trained at
    image: object | None = None  # PIL RGB image
    tensor: torch.Tensor | None = None  # (1, 3, H, W) on the CPU, [0, 1]
    network: StyleNet | None = None  # the trained network: applies to other images and sizes
    losses: dict[str, float] = field(default_factory=dict)
    seconds_total: float = 0.0
    seconds_per_step: float = 0.0  # median over the stretches between loss reads (see _seconds_per_step)
    peak_memory_bytes: int | None = None
    rejected_fraction: float | None = None  # mean over steps of the fraction of crops rejected (None: no crops)
    device: str = ""
    precision: str = ""
    error: ClipstyleError | None = None


def make_network(seed: int, device: torch.device) -> StyleNet:
    """A freshly initialised StyleNet; its weights depend only on ``seed``."""
    # Built on the CPU with the CPU generator alone: torch.manual_seed would
    # also reseed every GPU's generator, which the fork does not restore.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        net = StyleNet()
    return net.to(device)


def _adam(params, lr: float, device: torch.device, graph: bool = False) -> torch.optim.Optimizer:
    """Adam; its fused kernel where PyTorch has one: the same update rule in one
    kernel per step instead of about ten small ones per parameter tensor (on a
    2-core CPU 2-4x faster, as those small ops each wait for every thread).

    graph: for the graph path (--cuda-graph): the learning rate is a 0-d device
    tensor (set on the device at every step, _learning_rate) and, on CUDA, the
    optimiser capturable (its step count and bias corrections stay on the device).
    """
    if graph:
        lr_t = torch.tensor(lr, dtype=_lr_dtype(device), device=device)
        if device.type in ("cpu", "cuda"):
            return torch.optim.Adam(params, lr=lr_t, fused=True, capturable=device.type == "cuda")
        return torch.optim.Adam(params, lr=lr_t, foreach=False)  # MPS: no fused kernel; foreach takes no tensor lr
    if device.type in ("cpu", "cuda"):
        return torch.optim.Adam(params, lr=lr, fused=True)
    return torch.optim.Adam(params, lr=lr)


def _lr_dtype(device: torch.device) -> torch.dtype:
    """The learning rate tensor's dtype: float64 on the CPU, whose fused Adam then computes
    exactly as with a Python float; float32 elsewhere (CUDA's fused kernel reads a float)."""
    return torch.float64 if device.type == "cpu" else torch.float32


def _learning_rate(settings: Settings, step: int | torch.Tensor) -> float | torch.Tensor:
    """Adam's learning rate at ``step`` (an int, or a 0-d step counter on the device): halved
    once at the middle of the run (paper: step 100 of 200)."""
    if isinstance(step, torch.Tensor):  # computed on the device (fills, no copy from the host: recordable)
        dtype = _lr_dtype(step.device)
        full = torch.full((), settings.lr, dtype=dtype, device=step.device)
        half = torch.full((), settings.lr * 0.5, dtype=dtype, device=step.device)
        return torch.where(step >= settings.steps // 2, half, full)
    return settings.lr * (0.5 if step >= settings.steps // 2 else 1.0)


def _set_lr(opt: torch.optim.Optimizer, lr: float | torch.Tensor) -> None:
    for group in opt.param_groups:
        if isinstance(group["lr"], torch.Tensor):  # the graph path's device learning rate
            group["lr"].copy_(lr) if isinstance(lr, torch.Tensor) else group["lr"].fill_(lr)
        else:
            group["lr"] = lr


class _PairState:
    """The optimisation state of one (image, prompt) pair: its network, optimiser, crops and constants."""

    def __init__(self, index, content, prompt, seed, models, vgg, settings, amp, mask=None, target=None):
        device = models.device
        self.index, self.prompt, self.seed = index, prompt, seed
        # A list of contents trains one network over a set (frames of a film): each
        # step draws which one it trains on (see _draw_set); one content draws nothing.
        # Beyond the paper, which trains on one image: so a style holds on unseen frames.
        if isinstance(content, (list, tuple)) and len(content) == 1:
            content = content[0]  # a set of one is that image: the same run
        self.contents = [c.to(device) for c in content] if isinstance(content, (list, tuple)) else None
        self.content = self.contents[0] if self.contents else content.to(device)  # (1, 3, H, W)
        self.generator = torch.Generator().manual_seed(seed)  # crops: CPU generator, same on every device
        # Every step's crops drawn now, in the order the steps would draw them,
        # and moved to the device in one copy: a copy from host memory in the
        # loop would make the host wait for the device at every step.
        h, w = self.content.shape[-2:]
        # With a mask (1, 1, H, W), crops are drawn where it is and CLIP sees the
        # output composited over the photo outside it (clipstyle.method.masked).
        self.mask = None if mask is None else mask.to(device)
        draw = draw_crops if mask is None else crop_sampler(mask, settings.crop_size)
        if self.contents:
            if mask is not None:
                raise ClipstyleError("a region (--mask, --where) cannot be used when training on a set of images")
            draws = self._draw_set(settings)
        else:
            draws = [
                draw(h, w, settings.crops, settings.crop_size, settings.distortion, self.generator)
                for _ in range(settings.steps)
            ]
        self.crop_hom = torch.stack([d.hom for d in draws]).to(device)  # (steps, n, 3, 3)
        self.crop_offset = torch.stack([d.offset for d in draws]).to(device)  # (steps, n, 2)
        self.crop_side = draws[0].crop
        self.crop_sides = [d.crop for d in draws]
        # The U-Net stays NCHW: channels-last was only ~10% faster for it on the
        # CPU and made batch-N results differ from batch 1 by more than rounding
        # after a few Adam steps (different reduction orders per batch size).
        self.net = make_network(seed, device)
        self.opt = _adam(self.net.parameters(), settings.lr, device, graph=settings.cuda_graph)
        self.forward = torch.compile(self.net, mode=settings.compile) if settings.compile else self.net
        with torch.no_grad(), autocast(device, amp):
            # Constant for the whole run: text direction, source embedding, content features.
            # (clipstyle.method.targets: the prompt's text direction, or a blend with style images)
            target = target or Targets.of(prompt)
            self.text_dir = target_direction(models, target, settings, self.content)  # (D,)
            self.avoid_dirs = avoid_directions(models, target, settings)  # (K, D) or None
            self.avoid_weight = target.avoid_weight
            self.source_emb = F.normalize(models.clip.encode_image(self.content).float(), dim=-1)[0]  # (D,)
            self.content_feats = {k: v.float() for k, v in vgg(self.content).items()}
            if self.contents:
                # each content's own source embedding and content features, and, when a style
                # image takes part, its own target direction (a style image's starts from the content)
                images = any(t.image is not None for t in target.targets)
                self.set_constants = [
                    (
                        F.normalize(models.clip.encode_image(c).float(), dim=-1)[0],
                        {k: v.float() for k, v in vgg(c).items()},
                        target_direction(models, target, settings, c) if images and i else self.text_dir,
                    )
                    for i, c in enumerate(self.contents)
                ]
        self.step_times: list[float] = []
        self.rejected: list = []  # rejected crops per step (ints, or 0-d tensors read later)
        self.sums: dict[str, torch.Tensor] = {}
        self.losses: dict[str, float] = {}
        self.output: torch.Tensor | None = None
        self.error: ClipstyleError | None = None

    def crops(self, step: int | torch.Tensor, out_size: int):
        """Sampling grids of this step's crops, computed on the device.

        step: an int, or a 0-d step counter on the device (the graph path: the
        same draws, picked without the host knowing the step; never a set's).
        """
        if isinstance(step, torch.Tensor):
            draw = CropDraw(
                self.crop_hom.index_select(0, step.view(1))[0],
                self.crop_offset.index_select(0, step.view(1))[0],
                self.crop_side,
            )
        else:
            draw = CropDraw(self.crop_hom[step], self.crop_offset[step], self.crop_sides[step])
        return crop_grids(draw, *self.content.shape[-2:], out_size)

    def _draw_set(self, settings) -> list[CropDraw]:
        """A set's steps: which content each trains on, drawn from the pair's generator, then that
        step's crops in that content (contents may differ in size). Unmasked only."""
        self.choice = []
        draws = []
        for _ in range(settings.steps):
            i = int(torch.randint(len(self.contents), (1,), generator=self.generator))
            self.choice.append(i)
            h, w = self.contents[i].shape[-2:]
            draws.append(draw_crops(h, w, settings.crops, settings.crop_size, settings.distortion, self.generator))
        return draws

    def use(self, step: int) -> None:
        """Train this step on the content it drew (a set only; one content stays as it is)."""
        if self.contents:
            i = self.choice[step]
            self.content = self.contents[i]
            self.source_emb, self.content_feats, self.text_dir = self.set_constants[i]


# Per-Models variants that a run needs but must not impose on the shared Models
# object (another caller may use it with other settings): VGG-19 stored
# channels-last, and torch.compile'd encoders. Kept as long as the Models' encoders live.
_CHANNELS_LAST_VGG: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Copies of CLIP's image tower and of VGG-19 that keep autocast's weights in its
# dtype (store_autocast_weights), per encoder, dtype and device.
_IN_PRECISION: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _vgg_for(models: Models, channels_last: bool):
    """models.vgg, or a channels-last copy of it (made once per Models)."""
    if channels_last == models.vgg.channels_last:
        return models.vgg
    variants = _CHANNELS_LAST_VGG.setdefault(models.vgg, {})
    if channels_last not in variants:
        variants[channels_last] = copy.deepcopy(models.vgg).use_channels_last(channels_last)
    return variants[channels_last]


def _in_precision(encoder, dtype: torch.dtype | None, device: torch.device):
    """``encoder`` (a ClipEncoder or VggEncoder), or its copy with the weights autocast casts
    already in ``dtype``, made once per encoder, dtype and device: under autocast the same
    outputs, without casting every frozen weight again at every step."""
    if dtype is None:
        return encoder
    variants = _IN_PRECISION.setdefault(encoder, {})
    key = (dtype, str(device))
    if key not in variants:
        variants[key] = encoder.image_tower_in(dtype) if hasattr(encoder, "image_tower_in") else encoder.in_dtype(dtype)
    return variants[key]


def _compiled(clip, vgg, mode: str) -> tuple[Callable, Callable]:
    """torch.compile'd CLIP image tower and VGG trunk, compiled once per encoder and mode.

    The first steps pay the compilation (see docs/performance.md); later calls
    with the same shapes reuse it.
    """
    compiled = _COMPILED.setdefault(clip, {})
    if (vgg, mode) not in compiled:
        compiled[vgg, mode] = (torch.compile(clip.encode_image, mode=mode), torch.compile(vgg, mode=mode))
    return compiled[vgg, mode]


def _seconds_per_step(step_times: list[float], log_every: int) -> float:
    """Seconds per step: the median, over each stretch of ``log_every`` steps, of
    its mean step. Only a read of the losses waits for a GPU, so between reads
    the host runs ahead and a single step's time is the host's, not the device's;
    the median leaves out a first stretch slowed by warm-up or compilation."""
    stretches = [step_times[i : i + log_every] for i in range(0, len(step_times), log_every)]
    return statistics.median(sum(s) / len(s) for s in stretches) if stretches else 0.0


def _read_losses(pair: _PairState, amp: torch.dtype | None = None) -> dict[str, float]:
    values = {k: float(v) for k, v in pair.sums.items()}
    bad = [k for k, v in values.items() if not torch.isfinite(torch.tensor(v))]
    if bad:
        hint = "a lower --lr" + ("" if amp is None else " or --precision fp32")  # amp None: already fp32
        raise NonFiniteLossError(f"the optimisation diverged ({', '.join(bad)} loss is not finite); try {hint}")
    return values


def _clip_rows(pairs: list[_PairState], n_crops: int | list[int], chunk: int):
    """Row specs (pair, kind, start, stop) in chunks of at most ``chunk`` rows (0: one chunk).

    Row kinds: "g" is the pair's whole output (global loss), "c" its crops [start, stop).
    n_crops: crops per pair, or a list with each pair's count.
    """
    counts = n_crops if isinstance(n_crops, list) else [n_crops] * len(pairs)
    items = []
    for p, count in zip(pairs, counts):
        items.append((p, "g", 0, 1))
        items.extend((p, "c", i, i + 1) for i in range(count))
    if chunk <= 0:
        chunk = len(items)
    for s in range(0, len(items), chunk):
        part = items[s : s + chunk]
        merged = []  # merge consecutive crops of one pair into one slice
        for p, kind, a, b in part:
            if merged and merged[-1][0] is p and merged[-1][1] == "c" == kind and merged[-1][3] == a:
                merged[-1] = (p, kind, merged[-1][2], b)
            else:
                merged.append((p, kind, a, b))
        yield merged


# The graph path (--cuda-graph): eager steps before the step is recorded. The
# first creates Adam's state; CUDA's libraries set themselves up on first use,
# which a recording cannot contain.
GRAPH_WARMUP_STEPS = 2


def _can_capture(device: torch.device) -> bool:
    return device.type == "cuda"


def _capture(function: Callable[[], None], device: torch.device, pool=None):
    """``function``'s kernels recorded as one CUDA graph (nothing runs): replayed with ``.replay()``."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        function()
    return graph


@contextlib.contextmanager
def _side_stream(device: torch.device):
    """The eager steps before a recording run on a side stream (CUDA's rule); nothing elsewhere."""
    if device.type != "cuda":
        yield
        return
    current = torch.cuda.current_stream(device)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        yield
    current.wait_stream(stream)


class _GraphStep:
    """The graph path: a step as functions of static device buffers, recorded once and replayed.

    Its inputs are all on the device before the first step: the photos, every
    step's crop draws (drawn up front, as on the eager path) and a step counter
    that picks this step's draws and the learning rate; Adam is capturable with
    the learning rate a device tensor. Its outputs (the loss sums, the rejected
    count, the output image) are the same tensors at every replay. On CUDA,
    after GRAPH_WARMUP_STEPS eager steps, the step is recorded in two CUDA
    graphs (the gradients, then the Adam steps, which the last step skips) and
    replayed; threshold rejection takes the single masked pass (no data-dependent
    shapes). Elsewhere, or where recording fails (one warning), the same
    functions run eagerly, and the results are those of the eager loop.
    """

    def __init__(self, gradients, update, pairs: list[_PairState], settings: Settings, device: torch.device):
        self.gradients, self.update, self.pairs, self.device = gradients, update, pairs, device
        self.counter = torch.zeros((), dtype=torch.long, device=device)  # the step, on the device
        self.graphs: tuple | None = None
        self.rejected: list[torch.Tensor] = []  # each pair's rejected count, written by every replay
        self.capture = _can_capture(device) and settings.steps > GRAPH_WARMUP_STEPS + 1
        if not _can_capture(device):
            warnings.warn(
                f"CUDA graphs need a CUDA device: on {device} the graph path's step runs eagerly",
                RuntimeWarning,
                stacklevel=3,
            )

    def _eager(self, final: bool) -> bool:
        two_pass = self.gradients(self.counter)
        self.counter.add_(1)
        self.update(final)
        return two_pass

    def _record_gradients(self) -> None:
        self.gradients(self.counter)
        self.counter.add_(1)

    def _record(self) -> None:
        lengths = [len(p.rejected) for p in self.pairs]
        try:
            first = _capture(self._record_gradients, self.device)
            second = _capture(lambda: self.update(False, zero_grad=False), self.device, pool=first.pool())
        except Exception as exc:  # an operator or a card that cannot be recorded: today's path
            for p, length in zip(self.pairs, lengths):
                del p.rejected[length:]
                p.opt.zero_grad(set_to_none=True)
            self.capture = False
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            warnings.warn(
                f"could not record the step as a CUDA graph ({reason}); running it eagerly",
                RuntimeWarning,
                stacklevel=4,
            )
            return
        self.rejected = [p.rejected.pop() for p in self.pairs]  # appended once, while recording
        self.graphs = (first, second)

    def step(self, step: int, final: bool) -> bool:
        """Step ``step`` of the run (the counter on the device follows it); whether it took two passes."""
        if self.capture and self.graphs is None and step >= GRAPH_WARMUP_STEPS and not final:
            self._record()
        if self.graphs is not None:
            self.graphs[0].replay()
            for p, count in zip(self.pairs, self.rejected):
                p.rejected.append(count.clone())
            if not final:
                self.graphs[1].replay()
            return False
        if self.capture:
            with _side_stream(self.device):
                return self._eager(final)
        return self._eager(final)

    def drop(self) -> None:
        """Stop replaying (a pair left the batch): the gradients are given back, later steps run eagerly."""
        for p in self.pairs:
            p.opt.zero_grad(set_to_none=True)
        return None


def stylize_many(
    contents: list[torch.Tensor],
    prompts: list[str],
    seeds: list[int],
    *,
    models: Models,
    settings: Settings | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    masks: list[torch.Tensor | None] | None = None,
    rejection: Rejection | None = None,
    host_reads: bool | None = None,
    watch: AbstractContextManager | None = None,
    targets: list[Targets | None] | None = None,
) -> list[StylizeResult]:
    """Optimise one fresh StyleNet per (content, prompt, seed) triple, all in one batch.

    contents: (1, 3, H, W) tensors in [0, 1] at the training size (multiples of 8); a list of
    such tensors as one pair's content trains its network over the set, one drawn per step.
    masks: per pair None or a (1, 1, H, W) region in [0, 1] (clipstyle.regions.masks):
    the patch crops are drawn in it and CLIP sees the output only there.
    Returns one StylizeResult per pair, in order; a pair whose losses became
    non-finite has ``error`` set and no image, and the others go on.
    rejection: how threshold rejection runs (default: the cheaper CLIP path per
    step; benchmarks and tests force a path or a rejected fraction).
    host_reads: whether a step may read device values (the rejected count that
    chooses the next step's CLIP path). Default: on the CPU only, where a read
    costs nothing; False runs the accelerator's code path on any device (tests
    and ``bench`` count its operators on the CPU). The graph path never reads.
    watch: a re-enterable context manager entered around each step's work
    (not the loss reads every ``log_every`` steps, nor the callbacks), e.g. a
    clipstyle.method.counting.OpCounter.
    targets: per pair None (its prompt) or a clipstyle.method.targets.Targets: style images,
    weighted blends, phrases to avoid (the losses then have an "avoid" part).
    """
    settings = settings or Settings()
    rejection = rejection or Rejection()
    device = models.device
    host_reads = device.type == "cpu" if host_reads is None else host_reads
    host_reads = host_reads and not settings.cuda_graph  # a recorded step cannot read
    chooser = PathChooser(rejection, device, settings.crop_batch, host_reads=host_reads)
    amp = autocast_dtype(settings.precision, device)
    vgg = _vgg_for(models, use_channels_last(settings.memory_format, device, amp))
    clip = models.clip
    # The frozen encoders with their weights already in the run's precision (made once).
    clip_amp, vgg_amp = _in_precision(clip, amp, device), _in_precision(vgg, amp, device)
    encode_image, vgg_features = clip_amp.encode_image, vgg_amp
    if settings.compile:
        encode_image, vgg_features = _compiled(clip_amp, vgg_amp, settings.compile)
    # CUDA graphs (reduce-overhead) reuse their output memory at every replay:
    # each step is marked as a new replay, and the U-Net's output, which
    # outlives its step (callbacks, the result), is copied out of that memory.
    graphs = settings.compile == "reduce-overhead"
    out_size = clip.image_size[0]
    reset_peak_memory(device)
    masks = masks or [None] * len(contents)
    targets = targets or [None] * len(contents)
    pairs = [
        _PairState(i, c, p, s, models, vgg, settings, amp, m, t)
        for i, (c, p, s, m, t) in enumerate(zip(contents, prompts, seeds, masks, targets))
    ]
    active = list(pairs)
    n = settings.crops

    def gradients(step: int | torch.Tensor) -> bool:
        """One step up to the U-Nets' gradients and the loss sums; returns whether it took two passes.

        step: an int, or (the graph path) a 0-d step counter on the device.
        """
        # Adam, lr halved once at the middle of the run (paper: step 100 of 200).
        lr = _learning_rate(settings, step)
        outs, leaves = [], []
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        for p in active:
            _set_lr(p.opt, lr)
            p.use(step)
            out = p.forward(p.content)  # (1, 3, H, W), fp32
            if graphs:
                out = out.clone()
            outs.append(out)
            leaf = out.detach().requires_grad_()
            leaves.append(leaf)
            p.leaf = leaf
            p.seen = leaf if p.mask is None else composite(leaf, p.content, p.mask)  # what CLIP sees
            p.grids = p.crops(step, out_size)
            p.sums = {k: torch.zeros((), device=device) for k in ("patch", "dir")}

        # CLIP terms: global direction (one row per pair) and patch directions (n rows per pair).
        # Two-pass path: a no-grad pass finds the rejected crops, and only the
        # kept ones (renumbered 0..kept-1 in p.grids) go through the pass below.
        two_pass = chooser.two_pass(step if isinstance(step, int) else 0, len(active), n)
        counts: int | list[int] = n
        if two_pass:
            kept = kept_crops(active, n, settings.crop_batch, encode_image, rejection, settings.threshold, amp)
            for p, index in zip(active, kept):
                p.grids = select(p.grids, index)
                p.rejected.append(n - len(index))
            counts = [len(index) for index in kept]
        else:
            for p in active:
                p.rejected.append(torch.zeros((), dtype=torch.long, device=device))
        for chunk in _clip_rows(active, counts, settings.crop_batch):
            images, src, tdir, weight, is_crop, owners, index = [], [], [], [], [], [], []
            for p, kind, a, b in chunk:
                rows = b - a
                if kind == "g":
                    images.append(clip.resize(p.seen))
                    weight.append(torch.full((1,), settings.lambda_dir, device=device))
                else:
                    images.append(sample_crops(p.seen, p.grids.slice(a, b)))
                    weight.append(torch.full((rows,), settings.lambda_patch / n, device=device))
                is_crop.append(torch.full((rows,), kind == "c", device=device))
                if rejection.force is not None:  # crop indices: forced rejection counts the first crops
                    index.append(
                        torch.arange(a, b, device=device) if kind == "c" else torch.full((1,), -1, device=device)
                    )
                src.append(p.source_emb.expand(rows, -1))
                tdir.append(p.text_dir.expand(rows, -1))
                owners.append((p, kind, rows))
            with autocast(device, amp):
                emb = encode_image(torch.cat(images))  # (rows, D)
            per_row = L.directional_loss(emb.float(), torch.cat(src), torch.cat(tdir))  # (rows,)
            is_crop_t = torch.cat(is_crop)
            # threshold rejection applies to patches only (two-pass: done, these rows are kept)
            rejected = None
            if rejection.force is not None and not two_pass:
                rejected = rejection.rejected(per_row.detach(), torch.cat(index), n, settings.threshold)
                per_row = torch.where(rejected, torch.zeros_like(per_row), per_row)
            elif not two_pass:
                rejected = is_crop_t & (per_row.detach() < settings.threshold)
                per_row = torch.where(is_crop_t, L.reject_below(per_row, settings.threshold), per_row)
            row_weight = torch.cat(weight)
            loss = (per_row * row_weight).sum()
            i = 0
            for p, kind, rows in owners:  # --avoid: push the kept rows' directions off the avoided phrases
                if p.avoid_dirs is not None:
                    part = p.avoid_weight * avoid_penalty(emb[i : i + rows], p.source_emb, p.avoid_dirs)
                    if rejected is not None:
                        part = torch.where(rejected[i : i + rows], torch.zeros_like(part), part)
                    part = (part * row_weight[i : i + rows]).sum()
                    loss = loss + part
                    p.sums["avoid"] = p.sums.get("avoid", 0) + part.detach()
                i += rows
            loss.backward()
            detached = per_row.detach()
            i = 0
            for p, kind, rows in owners:
                part = detached[i : i + rows].sum()
                if kind == "g":
                    p.sums["dir"] = p.sums["dir"] + part
                else:
                    p.sums["patch"] = p.sums["patch"] + part / max(n, 1)
                    if rejected is not None:
                        p.rejected[-1] = p.rejected[-1] + rejected[i : i + rows].sum()
                i += rows
        if host_reads or two_pass:  # the host knows the counts without waiting for a device
            chooser.observe(sum(float(p.rejected[-1]) for p in active), n * len(active))

        # Content (VGG-19) and total variation, batched over pairs of the same size.
        by_shape: dict[tuple, list[_PairState]] = {}
        for p in active:
            by_shape.setdefault(tuple(p.leaf.shape), []).append(p)
        for group in by_shape.values():
            x = torch.cat([p.leaf for p in group])  # (B, 3, H, W)
            with autocast(device, amp):
                feats = vgg_features(x)
            target = {k: torch.cat([p.content_feats[k] for p in group]) for k in feats}
            content = L.content_loss(feats, target)  # (B,)
            tv = L.total_variation(x)  # (B,)
            (settings.lambda_content * content + settings.lambda_tv * tv).sum().backward()
            for j, p in enumerate(group):
                p.sums["content"] = content[j].detach()
                p.sums["tv"] = tv[j].detach()

        # Through the U-Nets; the Adam steps follow (update).
        torch.autograd.backward(outs, [leaf.grad for leaf in leaves])
        for p in active:
            s = p.sums
            s["total"] = (
                settings.lambda_patch * s["patch"]
                + settings.lambda_dir * s["dir"]
                + settings.lambda_content * s["content"]
                + settings.lambda_tv * s["tv"]
                + s.get("avoid", 0)  # --avoid: already weighted
            )
            p.output = p.leaf.detach()
        return two_pass

    def update(final: bool, zero_grad: bool = True) -> None:
        """One Adam step per pair (graph path: the gradients stay where the graph writes them)."""
        for p in active:
            # The output is this step's image, as in the reference code, whose last
            # update is never seen; skipping it keeps .network the network that
            # made .tensor (a saved style reproduces the run exactly).
            if not final:
                p.opt.step()
            if zero_grad:
                p.opt.zero_grad(set_to_none=True)

    graph = None
    if settings.cuda_graph and any(p.contents for p in pairs):
        # A set's steps each train on the content they drew, chosen on the host.
        warnings.warn(
            "a style trained on a set of images runs its steps eagerly, not as a CUDA graph",
            RuntimeWarning,
            stacklevel=2,
        )
    elif settings.cuda_graph:
        graph = _GraphStep(gradients, update, active, settings, device)
    watching = watch if watch is not None else contextlib.nullcontext()
    start = time.perf_counter()
    last = start

    for step in range(settings.steps):
        final = step == settings.steps - 1
        with watching:
            if graph is not None:
                two_pass = graph.step(step, final)
            else:
                two_pass = gradients(step)
                update(final)

        done = step + 1
        read = done % settings.log_every == 0 or done == settings.steps
        if read:
            synchronize(device)
        now = time.perf_counter()
        for p in list(active):
            p.step_times.append(now - last)
            values = None
            if read:
                try:
                    values = _read_losses(p, amp)
                    p.losses = values
                except NonFiniteLossError as exc:
                    p.error = exc
                    active.remove(p)
                    if graph is not None:  # recorded for the pairs it had: the others go on eagerly
                        graph = graph.drop()
            if callback is not None and p.error is None:
                fraction = float(p.rejected[-1]) / n if read and n else None
                callback(
                    StepInfo(
                        p.index,
                        done,
                        settings.steps,
                        values,
                        now - start,
                        p.output if graph is None else p.output.clone(),  # a replay overwrites it
                        now - last,
                        rejected=fraction,
                        two_pass=two_pass,
                    )
                )
        # The next step starts after the callbacks: their time (progress bars,
        # snapshots, a benchmark's own measurements) is not the step's.
        last = time.perf_counter()
        if not active:
            break

    total = time.perf_counter() - start
    peak = peak_memory_bytes(device)
    results = []
    for p in pairs:
        h, w = p.content.shape[-2:]
        r = StylizeResult(
            prompt=p.prompt,
            seed=p.seed,
            steps=settings.steps,
            size=(w, h),
            seconds_total=total,
            peak_memory_bytes=peak,
            device=str(device),
            precision=precision_name(amp),
            error=p.error,
            losses=dict(p.losses),
        )
        r.seconds_per_step = _seconds_per_step(p.step_times, settings.log_every)
        if n and p.rejected:
            r.rejected_fraction = sum(float(c) for c in p.rejected) / (n * len(p.rejected))
        if p.error is None:
            r.tensor = p.output.float().cpu()
            r.image = to_pil(r.tensor)
            r.network = p.net.eval()
        results.append(r)
    return results
