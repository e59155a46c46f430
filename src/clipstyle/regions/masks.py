"""Mask maths: where the style goes, as a float map in [0, 1], and the final image made with it.

1 = stylize, 0 = keep the photo, grey values blend. The final image is
``m * styled + (1 - m) * photo`` at the output size, so under a black mask the
output *is* the photo as clipstyle resizes it.

What is here: reading a mask file in any mode Pillow reads (:func:`read_mask`,
through the one image decoder, clipstyle.images.decode); a photo's
full-resolution mask for a :class:`~clipstyle.regions.region.Region`
(:func:`photo_mask`); resizing and feathering (:func:`at_size`); the final
image (:func:`finish`); a mask as an image (:func:`mask_image`). What the
optimisation does with a mask is clipstyle.method.masked.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from clipstyle.config import MAX_PIXELS
from clipstyle.errors import MaskError, require_file
from clipstyle.images import decode, enhance_contrast, to_tensor
from clipstyle.method.masked import composite
from clipstyle.regions.colour import preserve_colour
from clipstyle.regions.where import where_mask

MAX_ASPECT_DIFFERENCE = 0.02  # a mask's aspect ratio may differ from the photo's by this fraction
EMPTY = 0.5 / 255  # a mask whose largest value is under this selects nothing


# --- reading mask files ------------------------------------------------------------------------------------


def read_mask(path: str | Path, max_pixels: int | None = None) -> torch.Tensor:
    """A mask file as a (H, W) float tensor in [0, 1], as viewers show it (EXIF orientation applied).

    Any mode Pillow reads: an alpha channel that is not fully opaque is the
    mask; otherwise the luminance (ITU-R 601, Pillow's "L"). 16-bit values are
    scaled from 0..65535, float values taken as 0..1. Read once per file and kept.
    """
    path = Path(path)
    require_file(path, "mask", MaskError)
    st = path.stat()
    return _read_mask(str(path), st.st_mtime_ns, st.st_size, max_pixels).clone()


@functools.lru_cache(maxsize=2)
def _read_mask(path: str, _mtime: int, _size: int, max_pixels: int | None) -> torch.Tensor:
    import numpy as np

    array = decode(path, max_pixels or MAX_PIXELS, [], convert=_mask_array, what="mask", error=MaskError)
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _mask_array(img):
    """Any Pillow image -> (H, W) float32 numpy array in [0, 1]."""
    import numpy as np

    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if mode == "F":
            a = np.where(np.isfinite(a), a, 0.0)
            return np.clip(a, 0, 1)
        return np.clip(a / max(float(a.max()) if a.size else 0.0, 65535.0), 0, 1)
    if "transparency" in img.info and mode in ("P", "L", "RGB", "1"):
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        alpha = img.convert("RGBA").getchannel("A")
        if alpha.getextrema() != (255, 255):
            return np.asarray(alpha, dtype=np.float32) / 255
    return np.asarray(img.convert("L"), dtype=np.float32) / 255


def fit_mask(mask: torch.Tensor, width: int, height: int, path: str | Path | None = None) -> torch.Tensor:
    """(H, W) mask -> (1, 1, height, width), refusing an aspect ratio more than 2 % off the photo's."""
    mh, mw = mask.shape[-2:]
    if abs((mw / mh) / (width / height) - 1) > MAX_ASPECT_DIFFERENCE:
        raise MaskError(
            f"the mask is {mw}x{mh} but the photo is {width}x{height}: their aspect ratios differ "
            f"by more than {MAX_ASPECT_DIFFERENCE:.0%}",
            path,
        )
    return resize(mask.view(1, 1, mh, mw).float(), height, width)


def resize(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(1, 1, h, w) -> (1, 1, height, width), bilinear (antialiased when shrinking), in [0, 1].
    Far from an edge, 0 stays exactly 0 and 1 exactly 1."""
    if tuple(mask.shape[-2:]) == (height, width):
        return mask
    return _snap(F.interpolate(mask, size=(height, width), mode="bilinear", align_corners=False, antialias=True))


def _snap(x: torch.Tensor) -> torch.Tensor:
    """Clamp to [0, 1] with values within rounding of 0 or 1 made exact: a filter over a
    constant neighbourhood gives its value back, and under a black or white mask the
    output must be exactly the photo or the stylized image."""
    return torch.where(x < 1e-6, torch.zeros_like(x), torch.where(x > 1 - 1e-6, torch.ones_like(x), x))


# --- a photo's mask -------------------------------------------------------------------------------------


def photo_mask(region, photo, clip=None, where_settings=None, allow_empty: bool = False) -> torch.Tensor | None:
    """The region's mask for ``photo`` (a PIL image as clipstyle reads it), (1, 1, H, W) at its own size,
    before feathering; None when the region selects nothing to mask (no file, no phrase).

    ``clip``: the ClipEncoder for ``where``. Raises MaskError for a mask of
    another aspect ratio, or one that selects nothing (unless ``allow_empty``).
    """
    if region is None or not region.selects:
        return None
    width, height = photo.size
    mask = None
    if region.mask is not None:
        mask = fit_mask(read_mask(region.mask), width, height, region.mask)
    if region.where is not None:
        if clip is None:
            raise MaskError("--where needs the CLIP model")
        found = where_mask(clip, to_tensor(photo), region.where, where_settings)
        mask = found if mask is None else mask * found
    if region.invert:
        mask = 1 - mask
    if float(mask.max()) < EMPTY and not allow_empty:
        if region.where is not None and region.mask is None and not region.invert:
            raise MaskError(f"--where {region.where!r} selects nothing in this image")
        raise MaskError(
            "the mask selects nothing (it is black everywhere" + (", after --invert-mask)" if region.invert else ")"),
            region.mask,
        )
    return mask


def feather(mask: torch.Tensor, pixels: float) -> torch.Tensor:
    """Soften edges with a separable tent filter of radius ceil(pixels / 2) (edges replicated).
    Pixels farther than that from any edge keep their value exactly. A radius beyond the mask's
    longest side is taken as that side: the filter stays the image's size, whatever ``pixels``."""
    r = min(math.ceil(pixels / 2), max(mask.shape[-2:]))
    if r <= 0:
        return mask
    d = torch.arange(-r, r + 1, dtype=mask.dtype, device=mask.device)
    k = r + 1 - d.abs()
    k = k / k.sum()
    x = F.pad(mask, (r, r, 0, 0), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, r, r), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, -1, 1))
    return _snap(x)


def at_size(mask: torch.Tensor, height: int, width: int, feather_px: float) -> torch.Tensor:
    """A photo's mask at an image size, feathered there: (1, 1, height, width)."""
    return feather(resize(mask, height, width), feather_px)


def finish(
    styled: torch.Tensor, photo: torch.Tensor, region, mask: torch.Tensor | None, contrast: bool = False
) -> torch.Tensor:
    """The image to save from the stylized one: optional contrast (the reference's post-processing,
    on the styled image only), colour preservation, then compositing over the photo.

    styled, photo: (1, 3, H, W) in [0, 1], the same size; mask: a photo_mask at any size, or None.
    """
    if contrast:
        styled = enhance_contrast(styled)
    if region is None or not region.active:
        return styled
    photo = photo.to(styled.device, styled.dtype)
    if region.preserve_colour:
        styled = preserve_colour(styled, photo)
    if mask is not None:
        h, w = styled.shape[-2:]
        styled = composite(styled, photo, at_size(mask.to(styled.device), h, w, region.feather))
    return styled


# --- writing masks (clipstyle mask) ---------------------------------------------------------------------


def mask_image(mask: torch.Tensor):
    """(1, 1, H, W) in [0, 1] -> 8-bit greyscale PIL image (rounded, deterministic)."""
    from PIL import Image

    array = mask[0, 0].detach().float().cpu().clamp(0, 1).mul(255).round().byte().numpy()
    return Image.fromarray(array, mode="L")


__all__ = [
    "MaskError",
    "at_size",
    "composite",
    "feather",
    "finish",
    "fit_mask",
    "mask_image",
    "photo_mask",
    "read_mask",
    "resize",
]
