"""Regions: where the style goes (``--mask``, ``--where``) and how the final image is made from it.

A mask is a float map in [0, 1]: 1 = stylize, 0 = keep the photo, grey values
blend. The final image is ``m * styled + (1 - m) * photo`` at the output size,
so under a black mask the output *is* the photo as clipstyle resizes it.

What is here:

- :class:`Region`, what the user asked for (mask file, ``--where`` phrase,
  invert, feather, preserve colour); recorded with every output;
- reading a mask file in any mode Pillow reads (:func:`read_mask`);
- a photo's full-resolution mask (:func:`photo_mask`), resizing and feathering
  (:func:`at_size`), compositing (:func:`composite`) and the final image
  (:func:`finish`);
- where the optimisation's patch crops go (:func:`crop_sampler`);
- :class:`Regions`, the per-run cache the runner uses.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from clipstyle import __version__
from clipstyle.augment import CropDraw, draw_crops
from clipstyle.batch import Events, Summary, Work, job_error, run_jobs
from clipstyle.colour import preserve_colour
from clipstyle.config import FEATHER, MAX_PIXELS
from clipstyle.errors import ClipstyleError, require_file
from clipstyle.images import _allowed_formats, _apply_orientation, enhance_contrast, open_image, save_png, to_tensor
from clipstyle.where import where_mask

MAX_ASPECT_DIFFERENCE = 0.02  # a mask's aspect ratio may differ from the photo's by this fraction
EMPTY = 0.5 / 255  # a mask whose largest value is under this selects nothing


class MaskError(ClipstyleError):
    """A mask that is missing, unreadable, of the wrong shape, or selects nothing."""


@dataclass(frozen=True)
class Region:
    """Where and how the style applies. Combination rules (docs/regions.md):

    - ``mask`` and ``where`` together: their product, i.e. the phrase's region
      inside the painted mask;
    - ``invert`` flips the combined mask (``where="the sky", invert=True``:
      everything but the sky);
    - ``feather``: soft edge in output pixels (a tent filter of radius
      ceil(feather / 2) centred on the edge); 0 keeps edges as they are;
    - ``preserve_color``: the output keeps the photo's chroma (clipstyle.colour),
      inside the region; outside, the output is the photo anyway.
    """

    mask: Path | None = None
    where: str | None = None
    invert: bool = False
    feather: float = FEATHER
    preserve_color: bool = False

    @property
    def selects(self) -> bool:
        """Whether a mask is made (a file or a phrase)."""
        return self.mask is not None or self.where is not None

    @property
    def active(self) -> bool:
        return self.selects or self.preserve_color

    def check(self) -> None:
        """Every problem a user can cause, before anything is computed or written."""
        if self.where is not None and not self.where.strip():
            raise MaskError("the --where phrase is empty")
        if not (math.isfinite(self.feather) and self.feather >= 0):
            raise MaskError(f"feather must be 0 or more pixels (got {self.feather})")
        if self.invert and not self.selects:
            raise MaskError("--invert-mask needs --mask or --where")
        if self.mask is not None:
            read_mask(self.mask)

    def record(self) -> dict:
        """What goes into PNG metadata, reports and style files: enough to repeat it.
        The mask file is named by its name and SHA-256, not its path."""
        out: dict = {}
        if self.mask is not None:
            out["mask"] = Path(self.mask).name
            st = os.stat(self.mask)
            out["mask_sha256"] = _sha256(str(self.mask), st.st_mtime_ns, st.st_size)
        if self.where is not None:
            out["where"] = self.where
        if self.selects:
            out["invert"] = self.invert
            out["feather"] = self.feather
        out["preserve_color"] = self.preserve_color
        return out


@functools.lru_cache(maxsize=4)
def _sha256(path: str, _mtime: int, _size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
    import warnings

    import numpy as np
    from PIL import Image, UnidentifiedImageError

    limit = max_pixels or MAX_PIXELS
    pillow_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with open(path, "rb") as fh, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(fh, formats=_allowed_formats()) as img:
                w, h = img.size
                if w * h > limit:
                    raise MaskError(f"mask has {w}x{h} pixels, over the limit of {limit:,}", path)
                if getattr(img, "n_frames", 1) > 1:
                    img.seek(0)
                img.load()
                img = _apply_orientation(img, [])
                array = _mask_array(img)
    except MaskError:
        raise
    except UnidentifiedImageError:
        raise MaskError("not an image, or a format Pillow cannot read", path) from None
    except OSError as exc:
        if isinstance(exc, FileNotFoundError) or exc.errno is not None:
            raise MaskError(f"cannot read: {exc.strerror or exc}", path) from None
        raise MaskError(
            f"cannot decode the mask ({str(exc).splitlines()[0][:120] if str(exc) else 'OSError'})", path
        ) from None
    except Exception as exc:  # noqa: BLE001 - decoders of untrusted bytes fail in many ways
        raise MaskError(f"cannot decode the mask ({type(exc).__name__})", path) from None
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit
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


def photo_mask(region: Region | None, photo, clip=None, where_settings=None) -> torch.Tensor | None:
    """The region's mask for ``photo`` (a PIL image as clipstyle reads it), (1, 1, H, W) at its own size,
    before feathering; None when the region selects nothing to mask (no file, no phrase).

    ``clip``: the ClipEncoder for ``where``. Raises MaskError for a mask of
    another aspect ratio, or one that selects nothing.
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
    if float(mask.max()) < EMPTY:
        if region.where is not None and region.mask is None and not region.invert:
            raise MaskError(f"--where {region.where!r} selects nothing in this image")
        raise MaskError(
            "the mask selects nothing (it is black everywhere" + (", after --invert-mask)" if region.invert else ")"),
            region.mask,
        )
    return mask


def feather(mask: torch.Tensor, pixels: float) -> torch.Tensor:
    """Soften edges with a separable tent filter of radius ceil(pixels / 2) (edges replicated).
    Pixels farther than that from any edge keep their value exactly."""
    r = math.ceil(pixels / 2)
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


def composite(styled: torch.Tensor, photo: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``m * styled + (1 - m) * photo``: exactly the photo where m = 0 and exactly styled where m = 1."""
    return torch.lerp(photo, styled, mask.to(styled.dtype))


def finish(
    styled: torch.Tensor, photo: torch.Tensor, region: Region | None, mask: torch.Tensor | None, contrast: bool = False
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
    if region.preserve_color:
        styled = preserve_colour(styled, photo)
    if mask is not None:
        h, w = styled.shape[-2:]
        styled = composite(styled, photo, at_size(mask.to(styled.device), h, w, region.feather))
    return styled


# --- the optimisation's crops ---------------------------------------------------------------------------


def crop_sampler(mask: torch.Tensor, crop_size: int):
    """``draw_crops`` for a masked region: each crop's position is drawn with probability
    proportional to how much of the crop the mask covers (its mean over the crop).

    So all of a step's crops, and all of its CLIP work, go where the style will
    show; a crop wholly outside the region is never drawn. The warp is drawn as
    ``draw_crops`` draws it. mask: (1, 1, H, W) at the training size.
    """

    h, w = mask.shape[-2:]
    crop = min(crop_size, h, w)
    # Mean of the mask over every crop position, from an integral image: (h - crop + 1, w - crop + 1).
    m = mask[0, 0].detach().cpu().double()  # on the CPU first: MPS has no float64
    s = F.pad(m.cumsum(0).cumsum(1), (1, 0, 1, 0))
    coverage = (s[crop:, crop:] - s[:-crop, crop:] - s[crop:, :-crop] + s[:-crop, :-crop]) / (crop * crop)
    weights = coverage.clamp_min(0).flatten()
    if float(weights.sum()) <= 0:
        raise MaskError("the mask selects nothing at the training size")
    cols = w - crop + 1

    def draw(height: int, width: int, n: int, crop_size: int, distortion: float, generator) -> CropDraw:
        base = draw_crops(height, width, n, crop_size, distortion, generator)  # the warps
        index = (
            torch.multinomial(weights, n, replacement=True, generator=generator)
            if n
            else torch.zeros(0, dtype=torch.long)
        )
        offset = torch.stack([index % cols, index // cols], dim=-1).float()  # (n, 2) left, top
        return CropDraw(base.hom, offset, base.crop)

    return draw


# --- the runner's cache ---------------------------------------------------------------------------------


class Regions:
    """The masks of a run's photos: made once per photo, kept for the few photos a batch holds.

    ``prepare(key, photo)`` when a photo is read (raises MaskError for that
    photo); ``training_mask(key, content)`` for the optimisation;
    ``finish(key, image, contrast)`` for the image to save, at any size.
    With no active region every method is a no-op (``finish`` only applies contrast).
    """

    def __init__(self, region: Region | None, clip=None, keep: int = 2, where_settings=None):
        self.region = region if region is not None and region.active else None
        self.clip = clip
        self.keep = max(1, keep)
        self.where_settings = where_settings
        self._kept: OrderedDict = OrderedDict()  # key -> (photo PIL image, full-size mask or None)

    def prepare(self, key: str, photo) -> None:
        if self.region is None:
            return
        mask = photo_mask(self.region, photo, self.clip, self.where_settings)
        self._kept[key] = (photo, mask)
        self._kept.move_to_end(key)
        while len(self._kept) > self.keep:
            self._kept.popitem(last=False)

    def training_mask(self, key: str, content: torch.Tensor) -> torch.Tensor | None:
        """The mask at the training size (content: (1, 3, h, w)), feathered there; None without one."""
        if self.region is None or key not in self._kept or self._kept[key][1] is None:
            return None
        h, w = content.shape[-2:]
        return at_size(self._kept[key][1], h, w, self.region.feather)

    def finish(self, key: str, image: torch.Tensor, contrast: bool = False) -> torch.Tensor:
        if self.region is None:
            return finish(image, image, None, None, contrast)
        photo_image, mask = self._kept[key]
        h, w = image.shape[-2:]
        photo = to_tensor(photo_image, (w, h))  # as clipstyle resizes the photo (prepare_content, render)
        return finish(image, photo, self.region, mask, contrast)


# --- writing masks (clipstyle mask) ---------------------------------------------------------------------


def mask_image(mask: torch.Tensor):
    """(1, 1, H, W) in [0, 1] -> 8-bit greyscale PIL image (rounded, deterministic)."""
    from PIL import Image

    array = mask[0, 0].detach().float().cpu().clamp(0, 1).mul(255).round().byte().numpy()
    return Image.fromarray(array, mode="L")


class _WriteMasks(Work):
    """The mask command's work: each photo's mask as an 8-bit greyscale PNG at the photo's own size."""

    def __init__(self, region: Region, clip, overwrite: bool, max_pixels: int):
        self.region, self.clip, self.overwrite, self.max_pixels = region, clip, overwrite, max_pixels

    def record(self, job, status: str, error: str | None = None) -> dict:
        return {
            "input": str(job.input.path),
            "output": str(job.output),
            "status": status,
            "error": error,
            "region": self.region.record(),
        }

    def process(self, batch: list[tuple], events: Events) -> list[dict]:
        return [self._write(job) for job, _ in batch]

    def _write(self, job) -> dict:
        record = self.record(job, "ok")
        try:
            photo = open_image(job.input.path, self.max_pixels).image
            found = photo_mask(self.region, photo, self.clip)
            meta = {
                "Software": f"clipstyle {__version__}",
                "clipstyle": {
                    "version": __version__,
                    "input": Path(job.input.rel).name,
                    "region": self.region.record(),
                },
            }
            save_png(mask_image(found), job.output, meta, overwrite=self.overwrite)
            record["size"] = list(photo.size)
        except ClipstyleError as exc:
            record.update(status="failed", error=job_error(job, exc))
        return record


def write_masks(
    jobs,
    region: Region,
    clip,
    report,
    overwrite: bool = False,
    max_pixels: int = MAX_PIXELS,
    events: Events | None = None,
) -> Summary:
    """Write each job's mask (``jobs``: anything with ``.input`` and ``.output``, e.g. pairs.RunJob) as an
    8-bit greyscale PNG at the input's own size, through the shared batch loop (batch.py): existing
    outputs skipped unless ``overwrite``, a photo that fails is a failed record. ``report``: report.Report."""
    return run_jobs(jobs, _WriteMasks(region, clip, overwrite, max_pixels), report, events)


__all__ = [
    "MaskError",
    "Region",
    "Regions",
    "at_size",
    "composite",
    "crop_sampler",
    "feather",
    "finish",
    "fit_mask",
    "mask_image",
    "photo_mask",
    "read_mask",
    "write_masks",
]
