"""Quality metrics of a stylized image: does it show the prompt, is the content still there.

Style (CLIP, higher is better):
- ``clip_score``: cos(E_text(prompt), E_image(output)), the whole output squashed
  to CLIP's input size like the loss does. Papers often print it x100.
- ``patch_clip_score``: the same cosine averaged over random crops of the
  output at 512 px (CLIPstyler, Kwon & Ye 2022, appendix B.3: 64 crops of
  64 to 224 px); the crops come from a fixed seed, so the score repeats.
- ``directional_similarity``: cos(normalise(E(output) - E(content)),
  normalise(T(prompt) - T(source))), i.e. 1 - the global directional loss
  (paper eq. 2).

Content (against the content image resized to the output's size):
- ``content_distance``: the VGG-19 content loss of the method (relu4_2 and
  relu5_2 mean squared error, summed); 0 for identical images. Lower is better.
- ``ssim``: structural similarity (Wang et al. 2004) on luma; 1 for identical images.
- ``lpips``: LPIPS (Zhang et al. 2018, AlexNet) when the optional ``lpips``
  package and its weights are installed; lower is better.

Every function is pure: encoders and tensors in, numbers out. Everything runs
in fp32 without autocast, so a score does not depend on the device's precision.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from clipstyle.config import PATCH_SCORE_CROPS, Settings
from clipstyle.device import wide_dtype
from clipstyle.method import losses as L
from clipstyle.method.text import text_embedding
from clipstyle.regions.colour import luma

# CLIPstyler appendix B.3: 64 random crops of 64 to 224 px from the 512 px output.
PATCH_CROPS = PATCH_SCORE_CROPS
PATCH_MIN, PATCH_MAX = 64, 224
PATCH_IMAGE_SIZE = 512
# Crops encoded per CLIP batch: bounds the memory, does not change the score.
_CLIP_CHUNK = 16
# Below this distance between unit embeddings, image and content count as the same image.
_NO_DIRECTION = 1e-6

METRIC_NAMES = ("clip_score", "patch_clip_score", "directional_similarity", "content_distance", "ssim", "lpips")


def _image_embedding(clip, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, D) L2-normalised CLIP embeddings, fp32."""
    with torch.no_grad():
        return F.normalize(clip.encode_image(images.float()).float(), dim=-1)


def clip_score(clip, image: torch.Tensor, text_emb: torch.Tensor) -> float:
    """Cosine of the whole image's embedding and a normalised text embedding (D,)."""
    emb = _image_embedding(clip, image.to(text_emb.device))[0]
    return float(F.cosine_similarity(emb, text_emb.float(), dim=0))


def patch_boxes(
    height: int, width: int, n: int = PATCH_CROPS, min_size: int = PATCH_MIN, max_size: int = PATCH_MAX, seed: int = 0
) -> list[tuple[int, int, int]]:
    """``n`` random square crops (top, left, side) of an image of height x width.

    Sides are uniform integers in [min_size, max_size], capped by the image's
    shorter side; positions uniform. A CPU generator seeded with ``seed`` makes
    the boxes the same on every machine and every device.
    """
    generator = torch.Generator().manual_seed(seed)
    limit = min(height, width)
    lo, hi = min(min_size, limit), min(max_size, limit)
    boxes = []
    for _ in range(n):
        side = int(torch.randint(lo, hi + 1, (1,), generator=generator))
        top = int(torch.randint(0, height - side + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - side + 1, (1,), generator=generator))
        boxes.append((top, left, side))
    return boxes


def resize_longest(image: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) resized (bicubic, antialiased) so that its longest side is ``size``."""
    h, w = image.shape[-2:]
    scale = size / max(h, w)
    new = (max(1, round(h * scale)), max(1, round(w * scale)))
    if new == (h, w):
        return image
    return F.interpolate(image, size=new, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)


def patch_clip_score(
    clip,
    image: torch.Tensor,
    text_emb: torch.Tensor,
    n: int = PATCH_CROPS,
    seed: int = 0,
    image_size: int = PATCH_IMAGE_SIZE,
    min_size: int = PATCH_MIN,
    max_size: int = PATCH_MAX,
) -> float:
    """Mean cosine of the text embedding and ``n`` random crops of the image (appendix B.3).

    The image is first brought to ``image_size`` on its longest side, so an
    output made at 256 px is cropped at the same scale as the paper's 512 px
    outputs. Crops are plain (no perspective warp, unlike the loss's crops)
    and each is resized to CLIP's input.
    """
    x = resize_longest(image.float().to(text_emb.device), image_size)  # (1, 3, h, w)
    boxes = patch_boxes(x.shape[-2], x.shape[-1], n, min_size, max_size, seed)
    scores = []
    for start in range(0, len(boxes), _CLIP_CHUNK):
        crops = torch.cat(
            [
                clip.resize(x[..., top : top + side, left : left + side])
                for top, left, side in boxes[start : start + _CLIP_CHUNK]
            ]
        )  # (chunk, 3, S, S)
        emb = _image_embedding(clip, crops)  # (chunk, D)
        scores.append(emb @ text_emb.float())
    return float(torch.cat(scores).mean())


def directional_similarity(clip, image: torch.Tensor, content: torch.Tensor, text_dir: torch.Tensor) -> float:
    """cos(CLIP direction content -> image, text direction): 1 - the global directional loss.

    0 when the image equals the content (no direction at all).
    """
    out = _image_embedding(clip, image.to(text_dir.device))  # (1, D)
    src = _image_embedding(clip, content.to(text_dir.device))[0]  # (D,)
    if float((out[0] - src).norm()) < _NO_DIRECTION:
        # The direction of a difference this small is rounding noise, not a change of style.
        return 0.0
    return float(1 - L.directional_loss(out, src, text_dir.float())[0])


def content_distance(vgg, image: torch.Tensor, content: torch.Tensor) -> float:
    """The method's VGG content loss between image and content (same size): 0 when identical."""
    device = vgg.mean.device
    with torch.no_grad():
        feats = vgg(image.float().to(device))
        target = vgg(content.float().to(device))
    return float(L.content_loss(feats, target)[0])


def _gaussian_window(size: int, sigma: float, device, dtype) -> torch.Tensor:
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()  # (size,)


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> float:
    """Mean structural similarity of two RGB images (B=1, 3, H, W) in [0, 1].

    As Wang et al. (2004) define it for colour images: computed on luma (the
    grey image), with an 11x11 Gaussian window of sigma 1.5, C1 = (0.01 L)^2,
    C2 = (0.03 L)^2 for data range L = 1, over the 'valid' part of the image
    (no padding), averaged over the SSIM map. The reference code's automatic
    downsampling of large images is not done, so values for big images are
    somewhat higher than that code gives. Images smaller than the window use a
    window of their shorter side (made odd).
    """
    wide = wide_dtype(a.device)
    x, y = luma(a.to(wide)), luma(b.to(a.device, wide))
    size = min(window, x.shape[-2], x.shape[-1])
    size -= 1 - size % 2  # odd
    g = _gaussian_window(size, sigma, x.device, x.dtype)

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable valid convolution
        t = F.conv2d(t, g.view(1, 1, 1, -1))
        return F.conv2d(t, g.view(1, 1, -1, 1))

    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    ssim_map = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(ssim_map.mean())


# --- LPIPS: optional, never a dependency -----------------------------------


def _alexnet_weights_file() -> str:
    """Where torchvision keeps AlexNet's ImageNet weights, which LPIPS (net='alex') loads."""
    from torchvision.models import AlexNet_Weights

    name = os.path.basename(AlexNet_Weights.IMAGENET1K_V1.url)
    return os.path.join(torch.hub.get_dir(), "checkpoints", name)


def load_lpips(device: torch.device | str = "cpu") -> tuple[Callable | None, str | None]:
    """An LPIPS function ``(a, b) -> float`` on [0, 1] images, or None and the reason why not.

    Uses the ``lpips`` package (AlexNet, v0.1, the variant papers report) only
    when it is installed and the AlexNet weights are already in torch hub's
    cache: constructing it would otherwise download them, and scoring never
    uses the network.
    """
    try:
        import lpips  # noqa: F401  (optional)
    except ImportError:
        return None, "lpips not computed: the optional 'lpips' package is not installed (pip install lpips)"
    weights = _alexnet_weights_file()
    if not os.path.isfile(weights):
        return None, (
            f"lpips not computed: AlexNet weights are not in the cache ({weights}); "
            "they are downloaded once by torchvision's AlexNet_Weights.IMAGENET1K_V1"
        )
    sink = io.StringIO()
    try:
        # the package prints while it loads; the library never prints
        with contextlib.redirect_stdout(sink):
            model = lpips.LPIPS(net="alex", verbose=False).to(device).eval()
    except Exception as exc:  # noqa: BLE001 - an optional extra must not stop scoring
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return None, f"lpips not computed: the lpips model could not be loaded ({reason[:160]})"
    for p in model.parameters():
        p.requires_grad_(False)

    def distance(a: torch.Tensor, b: torch.Tensor) -> float:
        with torch.no_grad():
            # normalize=True: inputs in [0, 1], the package maps them to [-1, 1]
            return float(model(a.float().to(device), b.float().to(device), normalize=True).flatten()[0])

    return distance, None


# --- all metrics of one image ------------------------------------------------


@dataclass
class ImageScores:
    """Every metric of one stylized image against its content image and prompt."""

    clip_score: float
    patch_clip_score: float
    directional_similarity: float
    content_distance: float
    ssim: float
    lpips: float | None = None  # None when LPIPS is unavailable (see ``notes``)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def finite(self) -> bool:
        values = [getattr(self, name) for name in METRIC_NAMES]
        return all(v is None or math.isfinite(v) for v in values)


def score_image(
    models,
    image: torch.Tensor,
    content: torch.Tensor,
    prompt: str,
    *,
    templates: tuple[str, ...],
    source: str = Settings.source,
    patch_crops: int = PATCH_CROPS,
    patch_seed: int = 0,
    patch_image_size: int = PATCH_IMAGE_SIZE,
    lpips_fn: Callable | None = None,
    lpips_note: str | None = None,
) -> ImageScores:
    """All metrics of ``image`` (1, 3, H, W) in [0, 1] for ``prompt``, against ``content``.

    ``content`` must already have the image's size (the CLI resizes it). Text
    embeddings are averaged over ``templates`` as the loss does (pass
    ``NO_TEMPLATES`` to encode the prompt as it is). ``lpips_fn`` comes from
    :func:`load_lpips`; without it ``lpips`` is None and ``lpips_note`` says why.
    """
    if tuple(image.shape[-2:]) != tuple(content.shape[-2:]):
        raise ValueError(f"image {tuple(image.shape[-2:])} and content {tuple(content.shape[-2:])} differ in size")
    device = models.device
    image, content = image.float().to(device), content.float().to(device)
    style = text_embedding(models, prompt, templates)  # (D,), normalised
    text_dir = L.text_direction(style, text_embedding(models, source, templates))
    scores = ImageScores(
        clip_score=clip_score(models.clip, image, style),
        patch_clip_score=patch_clip_score(models.clip, image, style, patch_crops, patch_seed, patch_image_size),
        directional_similarity=directional_similarity(models.clip, image, content, text_dir),
        content_distance=content_distance(models.vgg, image, content),
        ssim=ssim(image, content),
    )
    if lpips_fn is not None:
        scores.lpips = lpips_fn(image, content)
    elif lpips_note:
        scores.notes.append(lpips_note)
    return scores
