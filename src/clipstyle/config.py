"""Every default, written once: the settings of one stylization and the tool's limits.

Defaults equal the CLIPstyler paper's (Kwon & Ye, CVPR 2022, section 4 and
appendix A). The CLI's options read their defaults from here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace

from clipstyle.errors import ClipstyleError
from clipstyle.prompts import IMAGENET_TEMPLATES, is_blank

# The models: OpenAI's CLIP ViT-B/32 (the paper's) through open_clip.
CLIP_MODEL = "ViT-B-32"
CLIP_PRETRAINED = "openai"
# Input images with more pixels than this are refused (decompression bombs).
MAX_PIXELS = 100_000_000
# Overlap of neighbouring tiles when a saved style renders a large image in tiles.
TILE_OVERLAP = 64
# Saved styles: file name endings read as style files.
STYLE_SUFFIXES = (".style", ".safetensors")
# Crops of the patch CLIP score (CLIPstyler appendix B.3: 64 crops of 64 to 224 px).
PATCH_SCORE_CROPS = 64

# --batch auto (GPUs, clipstyle.jobs.memory.auto_batch): pairs planned in this
# share of the free memory (the rest: fragmentation, cuDNN's workspaces), and
# at most this many. Images per minute: batch 8 gave 2.4x batch 1's on an H200
# (docs/performance.md); where they stop rising above that is what
# benchmarks/gpu.sh's auto row measures.
AUTO_BATCH_SHARE = 0.8
AUTO_BATCH_MAX = 16

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
# torch.compile's modes; "reduce-overhead" replays CUDA graphs on a GPU.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


# Upper bounds that stop a typo before it exhausts memory: every step's crop draws are
# made before the first step (about 3 KB a step at 64 crops: 1e8 steps would need
# 280 GB and minutes before any progress), and the memory estimate's arithmetic
# overflows on sides of hundreds of digits. Far above any useful run (the paper: 200
# steps, 64 crops, 512 px).
MAX_STEPS = 100_000
MAX_CROPS = 4_096
MAX_SIDE = 65_536


@dataclass(frozen=True)
class Settings:
    # Optimisation length. More steps: stronger style, linear cost.
    steps: int = 200
    # Longest side of the image the network is trained on, rounded to a
    # multiple of 8 (three down/up-sampling stages). Memory and time grow with
    # its square.
    size: int = 512
    # Random crops per step for the patch loss, and their side in pixels of
    # the output. More crops: smoother style signal, proportionally more CLIP work.
    crops: int = 64
    crop_size: int = 128
    # Patches whose directional loss is already under this stop pulling (the
    # paper's threshold rejection, tau).
    threshold: float = 0.7
    # Perspective distortion of each crop (0 = none, 1 = corners may move to the centre).
    distortion: float = 0.5
    # Adam learning rate; halved once at the middle of the run.
    lr: float = 5e-4
    # Loss weights: patch directional, global directional, VGG content, total variation.
    lambda_patch: float = 9000.0
    lambda_dir: float = 500.0
    lambda_content: float = 150.0
    lambda_tv: float = 2e-3
    # Neutral text the style direction starts from.
    source: str = "a Photo"
    # Prompt templates; each prompt is encoded in all of them and averaged.
    templates: tuple[str, ...] = field(default=IMAGENET_TEMPLATES, repr=False)
    # Numeric precision of the frozen encoders: "auto" is fp32 on the CPU and
    # bf16 autocast on CUDA (fp16 on MPS); the U-Net and loss sums stay fp32.
    precision: str = "auto"
    # Crops encoded per CLIP batch; 0 encodes all at once. Lower it when
    # memory is short: the result is the same, the peak memory smaller.
    crop_batch: int = 0
    # Read the losses back to the host every this many steps (and at the last
    # step). Each read waits for the device, so rarer reads run faster.
    log_every: int = 10
    # Memory layout of VGG-19's activations: "auto" is channels-last (NHWC)
    # where it was measured faster (the CPU; CUDA with bf16/fp16), contiguous
    # (NCHW) elsewhere. The same maths either way.
    memory_format: str = "auto"
    # torch.compile the U-Net, the CLIP image tower and VGG-19 in this mode of
    # torch.compile ("" is off; True means "default"; "reduce-overhead" adds
    # CUDA graphs on a GPU). The first steps pay the compilation (tens of
    # seconds to minutes), so it pays off only over long runs and many images;
    # see docs/performance.md.
    compile: str = ""
    # Record each step once as CUDA graphs and replay them (the step's host
    # work paid once; CUDA only, elsewhere the same step runs eagerly). Same
    # crops and maths as without; see docs/performance.md.
    cuda_graph: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.compile, bool) or self.compile is None:  # True/False as before modes existed
            object.__setattr__(self, "compile", "default" if self.compile else "")
        for name in ("threshold", "distortion", "lr", "lambda_patch", "lambda_dir", "lambda_content", "lambda_tv"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value)):  # NaN passes every comparison
                raise ClipstyleError(f"{name.replace('_', ' ')} must be a number, not {value!r}")
        try:
            self.source.encode("utf-8")
        except (AttributeError, UnicodeEncodeError):
            raise ClipstyleError("the source text is not valid UTF-8 text (--source)") from None
        if is_blank(self.source):
            raise ClipstyleError("the source text is empty (--source: what the photo is, e.g. 'a Photo')")
        checks = [
            (1 <= self.steps <= MAX_STEPS, f"steps must be between 1 and {MAX_STEPS:,}"),
            (8 <= self.size <= MAX_SIDE, f"size must be between 8 and {MAX_SIDE:,}"),
            (0 <= self.crops <= MAX_CROPS, f"crops must be between 0 and {MAX_CROPS:,}"),
            (self.crop_size >= 8, "crop size must be at least 8"),
            # the patch loss is 1 - cos, in [0, 2]: a threshold of 2 or more drops every patch
            (0.0 <= self.threshold < 2.0, "threshold must be at least 0 and under 2"),
            (0.0 <= self.distortion <= 1.0, "distortion must be between 0 and 1"),
            (self.lr > 0, "learning rate must be positive"),
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}"),
            (self.crop_batch >= 0, "crop batch must be 0 or more"),
            (self.log_every >= 1, "log_every must be at least 1"),
            (self.memory_format in MEMORY_FORMATS, f"memory format must be one of {', '.join(MEMORY_FORMATS)}"),
            (len(self.templates) > 0, "at least one template is needed"),
            (self.compile in ("", *COMPILE_MODES), f"compile must be off or one of {', '.join(COMPILE_MODES)}"),
            (not (self.cuda_graph and self.compile), "--cuda-graph and --compile do not combine: choose one"),
        ]
        for lam in ("lambda_patch", "lambda_dir", "lambda_content", "lambda_tv"):
            checks.append((getattr(self, lam) >= 0, f"{lam.replace('_', ' ')} must be 0 or more"))
        for ok, message in checks:
            if not ok:
                raise ClipstyleError(message)

    def to_dict(self) -> dict:
        """Plain, JSON-ready values (templates included only when not the default)."""
        data = asdict(self)
        if not self.cuda_graph:  # off: not recorded, so outputs made before it existed stay as they were
            del data["cuda_graph"]
        if self.templates == IMAGENET_TEMPLATES:
            data["templates"] = "imagenet-79"
        else:
            data["templates"] = list(self.templates)
        return data

    def replace(self, **changes) -> Settings:
        return replace(self, **changes)


# Presets for machines without a GPU. The defaults stay the paper's; a preset
# trades quality for time and says so in its name.
PRESETS: dict[str, dict] = {
    "paper": {},
    "draft": {"steps": 100, "size": 256, "crops": 16, "crop_size": 64},
}


def field_names() -> list[str]:
    return [f.name for f in fields(Settings)]


def settings_for(preset: str = "paper", **values) -> Settings:
    """The settings of ``preset``, with every value that is not None in ``values`` over it."""
    if preset not in PRESETS:
        raise ClipstyleError(f"unknown preset {preset!r} (known: {', '.join(sorted(PRESETS))})")
    return Settings(**{**PRESETS[preset], **{k: v for k, v in values.items() if v is not None}})


# --- targets (--style-image, --blend, --avoid: clipstyle.method.targets) ------------------------------

# Weight of --avoid against the directional loss of the same rows. Below 1, the
# direction that minimises style + avoid terms stays within arcsin(weight) of the
# style target (30 degrees at 0.5): the avoided concept tilts the style, never
# outweighs it (docs/method-extensions.md).
AVOID_WEIGHT = 0.5
# A style image's embedding: the mean over this many perspective-warped crops of
# it (drawn as the patch crops are, at the run's --size and --crop-size), so that
# no single crop's content dominates; and the seed of those crops (fixed: the
# same image gives the same target in every run).
STYLE_IMAGE_CROPS = 64
STYLE_IMAGE_SEED = 0


# --- regions (--mask, --where, --preserve-color: clipstyle.regions) ---------------------------------------

# Width in output pixels of the soft edge that --feather gives a mask (a tent
# filter centred on the edge: pixels farther than this from it are untouched).
FEATHER = 4.0
# The widest --feather accepted: wider than any image clipstyle makes (a wider edge than the image
# changes nothing more), and it keeps the filter's size bounded (1e9 would exhaust memory).
MAX_FEATHER = 10_000.0


@dataclass(frozen=True)
class WhereSettings:
    """How ``--where`` turns a phrase into a mask with the run's own CLIP (docs/regions.md)."""

    # The last block's attention as ClearCLIP changes it (q-q attention, no
    # residual, no MLP); "maskclip" (value embeddings) and "vanilla" (the
    # unchanged last block) are kept for measuring.
    method: str = "clearclip"
    # Each patch scores the phrase against these; the mask is where the phrase wins.
    background: tuple[str, ...] = ("background", "a photo", "a thing", "texture", "a surface", "stuff")
    # Sentences the phrase and the background phrases are put in, averaged (few: the text tower costs).
    templates: tuple[str, ...] = ("a photo of {}.", "a photo of the {}.", "a cropped photo of {}.", "{}")
    # CLIP's own logit scale: cosine similarities x 100 before the softmax over phrases.
    temperature: float = 100.0
    # Overlapping square windows: this many along the short side, each moved by
    # this fraction of its side; every window is one CLIP pass at the model's input size.
    windows: int = 3
    stride: float = 0.5
    # The map is assembled and guided-filtered with the longest side this long,
    # then its filter coefficients are upsampled to the photo's size.
    work_size: int = 512
    # Probability of the phrase above which a pixel is in the region.
    threshold: float = 0.5
    # Guided filter (He et al. 2010) that moves the mask's edges onto the
    # photo's: radius in patches of the windows (one patch is about 27 px of a
    # 512 x 384 photo with ViT-B/32: the coarse map's uncertainty), and eps
    # (edge sharpness; the guide is grey in [0, 1]). Only pixels that close to
    # the coarse edge can change.
    guide_radius: float = 1.0
    guide_eps: float = 1e-3

    def __post_init__(self) -> None:
        if self.method not in ("clearclip", "maskclip", "vanilla"):
            raise ClipstyleError(f"unknown --where method {self.method!r}")
        if self.windows < 1 or not 0 < self.stride <= 1 or self.work_size < 16 or self.guide_radius < 0:
            raise ClipstyleError("where settings out of range")


# --- video (clipstyle.video: apply and run on films) -------------------------------------------------------

# The restyled film: H.264 in yuv420p (what every player plays), at a constant
# quality. CRF 18 is about visually lossless for x264; each step of 6 halves or
# doubles the size. "medium" is x264's own default speed/size trade-off.
VIDEO_CODEC = "libx264"
VIDEO_CRF = 18
VIDEO_PRESET = "medium"
VIDEO_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")
# Frames a style is trained on when `run` is given a film, spread evenly over it.
# Each step trains on one of them: with the paper's 200 steps, 8 frames get about
# 25 steps each, and eight evenly spaced samples cover the scenes of a holiday
# clip (one every few seconds of a one-minute film) while their CLIP and VGG
# constants cost eight forward passes once.
TRAIN_FRAMES = 8
# Frames restyled together on a GPU (one network pass over the batch); one at a time on a CPU,
# whose cores one frame already keeps busy.
FRAME_BATCH = 8
