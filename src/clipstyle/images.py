"""Image input and output: reading any file Pillow reads, sizing, safe PNG writing.

What happens to odd files (documented in README, "What clipstyle does with odd files"):
- EXIF orientation is applied, so the image is used the way viewers show it.
- Greyscale, palette, CMYK, 16-bit and float images are converted to 8-bit RGB;
  16-bit values are scaled from 0..65535, float values are taken as 0..1.
- Transparency is composited over white; the output has no alpha channel.
- Animated files use their first frame (a note says so).
- Empty, truncated, corrupt and non-image files, and images over the pixel
  limit (decompression bombs), are refused with one line naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from clipstyle.errors import ImageError, OutputError

IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff",
    ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".jp2", ".j2k", ".ico", ".dib", ".pcx", ".sgi",
    ".heic", ".heif", ".avif",
})
DEFAULT_MAX_PIXELS = 100_000_000  # 100 megapixels; --max-pixels changes it
MAX_ASPECT = 20.0  # images thinner than 1:20 are refused


@dataclass
class LoadedImage:
    image: "object"  # PIL.Image.Image in mode RGB
    notes: list[str] = field(default_factory=list)


def open_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Read ``path`` as an 8-bit RGB PIL image, or raise ImageError with one reason."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise ImageError("file not found", path)
    if path.is_dir():
        raise ImageError("is a folder, not an image", path)
    try:
        if path.stat().st_size == 0:
            raise ImageError("empty file", path)
    except OSError as exc:
        raise ImageError(f"cannot read: {exc.strerror}", path) from None

    # Our own pixel limit replaces Pillow's (which warns, then fails at twice its default).
    Image.MAX_IMAGE_PIXELS = None
    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(path)
            w, h = img.size
            if w <= 0 or h <= 0:
                raise ImageError("image has no pixels", path)
            if w * h > max_pixels:
                raise ImageError(f"image has {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,}"
                                 " (raise it with --max-pixels if the file is trusted)", path)
            if getattr(img, "n_frames", 1) > 1:
                notes.append(f"animated image with {img.n_frames} frames: using the first")
                img.seek(0)
            img.load()
            img = ImageOps.exif_transpose(img) or img
            rgb = _to_rgb(img)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image, or a format Pillow cannot read", path) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, MemoryError,
            ZeroDivisionError, KeyError, AttributeError, RuntimeError, struct.error) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "truncated" in reason.lower():
            reason = "truncated file"
        raise ImageError(f"cannot decode image ({reason[:120]})", path) from None
    rw, rh = rgb.size
    if max(rw, rh) / min(rw, rh) > MAX_ASPECT:
        raise ImageError(f"image is {rw}x{rh}: aspect ratios beyond {MAX_ASPECT:g}:1 are not supported", path)
    return LoadedImage(rgb, notes)


def _to_rgb(img):
    """Any Pillow mode -> 8-bit RGB; transparency over white."""
    import numpy as np
    from PIL import Image

    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if mode == "F":
            hi = float(np.nanmax(a)) if a.size else 1.0
            a = np.nan_to_num(a) / (hi if hi > 1.0 else 1.0)
        elif mode == "I" and a.size and a.max() <= 255:
            a = a / 255.0
        else:
            a = a / 65535.0
        a = (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)
        return Image.fromarray(a, mode="L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "RGB":
        return img.copy()
    return img.convert("RGB")


def fit_size(width: int, height: int, size: int, multiple: int = 8) -> tuple[int, int]:
    """(w, h) with the longest side ``size`` (rounded to ``multiple``), aspect ratio kept."""
    scale = size / max(width, height)

    def snap(v: float) -> int:
        return max(multiple, int(round(v * scale / multiple)) * multiple)

    return snap(width), snap(height)


def to_tensor(image, size: tuple[int, int] | None = None):
    """PIL RGB image -> (1, 3, H, W) float tensor in [0, 1], resized (Lanczos) to ``size`` = (w, h)."""
    import numpy as np
    import torch
    from PIL import Image

    if size is not None and tuple(image.size) != tuple(size):
        image = image.resize(size, Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.uint8).copy()
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).float().div(255)


def to_pil(tensor):
    """(1, 3, H, W) or (3, H, W) tensor in [0, 1] -> PIL RGB image (rounded, deterministic)."""
    from PIL import Image

    t = tensor.detach().float().cpu()
    if t.dim() == 4:
        t = t[0]
    array = t.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(array, mode="RGB")


def enhance_contrast(tensor, factor: float = 1.5):
    """The reference code's hidden post-processing, made explicit (``--contrast``):
    contrast x1.5 around the mean grey (as torchvision's adjust_contrast), then
    min-max rescaling to [0, 1]. (B, 3, H, W) -> same."""
    grey = (0.299 * tensor[:, 0] + 0.587 * tensor[:, 1] + 0.114 * tensor[:, 2]).mean(dim=(1, 2))
    x = ((tensor - grey.view(-1, 1, 1, 1)) * factor + grey.view(-1, 1, 1, 1)).clamp(0, 1)
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-8)


def slugify(text: str, max_bytes: int = 60) -> str:
    """A file-name-safe slug of ``text``: Unicode letters and digits kept, the rest
    as '-', no leading dot, at most ``max_bytes`` UTF-8 bytes, never empty."""
    s = unicodedata.normalize("NFKC", text).lower()
    s = "".join(ch if ch.isalnum() else "-" for ch in s)
    s = re.sub(r"-+", "-", s).strip("-")
    encoded = s.encode("utf-8")[:max_bytes]
    s = encoded.decode("utf-8", errors="ignore").strip("-")
    if not s:
        s = "prompt-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]
    return s


def png_metadata(values: dict) -> "object":
    """PNG text chunks: strings as they are, everything else as JSON."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in values.items():
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)
        info.add_itxt(key, text)
    return info


def write_atomic(path: str | Path, write, overwrite: bool = False) -> None:
    """Write a file through ``write(file_object)`` into a temporary file beside
    ``path``, then move it into place. An interrupted or failed write leaves no
    partial file; an existing file is kept unless ``overwrite``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder: {exc.strerror}", path.parent) from None
    if path.exists() and not overwrite:
        raise OutputError("exists (use --overwrite to replace it)", path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if something appeared meanwhile
            except FileExistsError:
                raise OutputError("exists (use --overwrite to replace it)", path) from None
            except OSError:
                os.replace(tmp, path)  # file systems without hard links
    except OSError as exc:
        raise OutputError(f"cannot write: {exc.strerror or exc}", path) from None
    finally:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass


def save_png(image, path: str | Path, metadata: dict | None = None, overwrite: bool = False) -> None:
    """Save a PIL image or [0, 1] tensor as PNG, atomically, with text metadata."""
    pil = image if hasattr(image, "save") else to_pil(image)
    info = png_metadata(metadata or {})
    write_atomic(path, lambda fh: pil.save(fh, format="PNG", pnginfo=info), overwrite=overwrite)
