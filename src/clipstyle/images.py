"""Image input and output: reading any file Pillow reads, sizing, safe PNG writing.

What happens to odd files (documented in README, "What clipstyle does with odd files"):
- EXIF orientation is applied, so the image is used the way viewers show it.
- An embedded ICC colour profile (CMYK print files, Display P3 phone photos) is
  converted to sRGB; without one, Pillow's plain conversion is used.
- Greyscale, palette, CMYK, 16-bit and float images are converted to 8-bit RGB;
  16-bit values are scaled from 0..65535, float values are taken as 0..1.
- Transparency (alpha channels and PNG/GIF transparent colours) is composited
  over white; the output has no alpha channel.
- Animated and multi-page files use their first frame (a note says so).
- Empty, truncated, corrupt and non-image files, and images over the pixel
  limit (decompression bombs), are refused with one line naming the file.
- Formats whose decoding runs another program (EPS through Ghostscript, WMF
  through the OS) are never opened, whatever the file is named.

torch is imported inside the few functions that make tensors, so that what
only reads and writes images (``clipstyle sheet``, ``--help``) starts without it.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import re
import stat
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from clipstyle.config import MAX_PIXELS
from clipstyle.errors import ClipstyleError, ImageError, OutputError

IMAGE_EXTENSIONS = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".jpe",
        ".png",
        ".webp",
        ".bmp",
        ".gif",
        ".tif",
        ".tiff",
        ".ppm",
        ".pgm",
        ".pbm",
        ".pnm",
        ".tga",
        ".jp2",
        ".j2k",
        ".ico",
        ".dib",
        ".pcx",
        ".sgi",
        ".heic",
        ".heif",
        ".avif",
    }
)
MAX_ASPECT = 20.0  # images thinner than 1:20 are refused

# Pillow identifies files by content, not name, so these are excluded by format:
# EPS is rendered by running Ghostscript on the file, WMF/EMF by the OS; the
# others are identify-only stubs that can never give pixels.
_REFUSED_FORMATS = frozenset({"EPS", "WMF", "BUFR", "GRIB", "HDF5", "MPEG"})


@dataclass
class LoadedImage:
    image: object  # PIL.Image.Image in mode RGB
    notes: list[str] = field(default_factory=list)


def _allowed_formats() -> list[str]:
    from PIL import Image

    Image.init()
    return [f for f in Image.OPEN if f not in _REFUSED_FORMATS]


def open_image(path: str | Path, max_pixels: int = MAX_PIXELS, data: bytes | None = None) -> LoadedImage:
    """Read ``path`` as an 8-bit RGB PIL image, or raise ImageError with one reason.

    ``data``: the file's bytes, read elsewhere (another machine); errors still name ``path``.
    """
    notes: list[str] = []
    return LoadedImage(decode(path, max_pixels, notes, data=data, convert=lambda img: _to_rgb(img, notes)), notes)


def decode(
    path: str | Path,
    max_pixels: int,
    notes: list[str],
    *,
    data: bytes | None = None,
    convert=None,
    what: str = "image",
    error: type[ClipstyleError] = ImageError,
):
    """The one decoder of untrusted image files (photos, masks): checks, limits, first frame, EXIF
    orientation. Returns ``convert(image)`` (default: the oriented PIL image in its own mode).

    Every failure is ``error(reason, path)``, the reason naming ``what`` the file was meant to be;
    notes (first frame, unreadable EXIF) are appended to ``notes``.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        if data is not None:
            if not data:
                raise error("empty file", path)
            fh = io.BytesIO(data)
        else:
            st = path.stat()
            if stat.S_ISDIR(st.st_mode):
                raise error(f"is a folder, not {'an' if what[0] in 'aeiou' else 'a'} {what}", path)
            if not stat.S_ISREG(st.st_mode):
                raise error("not a regular file", path)
            if st.st_size == 0:
                raise error("empty file", path)
            fh = open(path, "rb")
    except FileNotFoundError:
        raise error("file not found", path) from None
    except OSError as exc:
        raise error(f"cannot read: {exc.strerror or exc}", path) from None

    # Our own pixel limit replaces Pillow's (which warns, then fails at twice its
    # default); Pillow's is restored afterwards.
    pillow_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with fh, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(fh, formats=_allowed_formats()) as img:
                w, h = img.size
                if w <= 0 or h <= 0:
                    raise error(f"{what} has no pixels", path)
                if w * h > max_pixels:
                    raise error(
                        f"{what} has {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,}"
                        " (raise it with --max-pixels if the file is trusted)",
                        path,
                    )
                if max(w, h) / min(w, h) > MAX_ASPECT:  # before decoding; rotation keeps the ratio
                    raise error(f"{what} is {w}x{h}: aspect ratios beyond {MAX_ASPECT:g}:1 are not supported", path)
                frames = getattr(img, "n_frames", 1)
                # MPO: a phone's JPEG with extra pictures (depth map, preview) after the main one
                if frames > 1 and img.format != "MPO":
                    notes.append(f"file has {frames} frames (animated or multi-page): using the first")
                if frames > 1:
                    img.seek(0)
                img.load()
                oriented = _apply_orientation(img, notes)
                return oriented if convert is None else convert(oriented)
    except error:
        raise
    except UnidentifiedImageError:
        raise error("not an image, or a format Pillow cannot read", path) from None
    except Exception as exc:  # noqa: BLE001 - decoders of untrusted bytes fail in many ways
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "truncated" in reason.lower() or isinstance(exc, EOFError):
            reason = "truncated file"
        raise error(f"cannot decode {'the ' if what != 'image' else ''}{what} ({reason[:120]})", path) from None
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit


_ORIENTATION = {  # EXIF orientation -> the transpose that shows the image upright
    2: "FLIP_LEFT_RIGHT",
    3: "ROTATE_180",
    4: "FLIP_TOP_BOTTOM",
    5: "TRANSPOSE",
    6: "ROTATE_270",
    7: "TRANSVERSE",
    8: "ROTATE_90",
}


def _apply_orientation(img, notes: list[str]):
    """The image as viewers show it. Broken EXIF data is not a reason to refuse
    good pixels: the image is then used as stored, with a note."""
    from PIL import Image

    try:
        orientation = img.getexif().get(0x0112, 1)  # 0x0112: Orientation
    except Exception:  # noqa: BLE001 - malformed EXIF blocks raise many error types
        notes.append("unreadable EXIF data: orientation not applied")
        return img
    method = _ORIENTATION.get(orientation) if isinstance(orientation, int) else None
    return img.transpose(Image.Transpose[method]) if method else img


def _icc_to_srgb(img, icc: bytes | None, notes: list[str]):
    """RGB through the ICC profile ``icc`` to sRGB, or None when there is no
    profile or it cannot be used (then Pillow's plain conversion follows)."""
    if not icc or img.mode not in ("RGB", "CMYK", "L"):
        return None
    try:
        import io

        from PIL import ImageCms

        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        return ImageCms.profileToProfile(img, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except Exception:  # noqa: BLE001 - no littlecms, or a broken or mismatched profile
        notes.append("embedded colour profile not usable: colours converted without it")
        return None


def _to_rgb(img, notes: list[str] | None = None):
    """Any Pillow mode -> 8-bit RGB in sRGB; transparency over white."""
    import numpy as np
    from PIL import Image

    notes = [] if notes is None else notes
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if mode == "F":  # floats: 0..1, or 0..max when brighter than 1
            a = np.where(np.isfinite(a), a, 0.0)
            hi = float(a.max()) if a.size else 1.0
            a = a / max(hi, 1.0)
        else:  # 16-bit (PNG, PGM, TIFF) are 0..65535; wider integers are scaled by their maximum
            hi = float(a.max()) if a.size else 0.0
            a = a / max(hi, 65535.0)
        a = (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)
        return Image.fromarray(a, mode="L").convert("RGB")
    icc = img.info.get("icc_profile")
    alpha = None
    if "transparency" in img.info and mode in ("P", "L", "RGB", "1"):
        img = img.convert("RGBA")  # palette alpha or a single transparent colour -> alpha channel
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")  # also undoes premultiplied alpha
        alpha = rgba.getchannel("A")
        img = img.convert("L") if mode in ("LA", "La") else rgba.convert("RGB")
    rgb = _icc_to_srgb(img, icc, notes)
    if rgb is None:
        rgb = img.copy() if img.mode == "RGB" else img.convert("RGB")
    if alpha is not None and alpha.getextrema() != (255, 255):
        rgb = Image.composite(rgb, Image.new("RGB", rgb.size, (255, 255, 255)), alpha)
    return rgb


# VGG-19 pools four times before relu5_2 (the content loss), so a side under
# 16 px would vanish; the U-Net needs multiples of 8.
MIN_SIDE = 16


def fit_size(width: int, height: int, size: int, multiple: int = 8, min_side: int = MIN_SIDE) -> tuple[int, int]:
    """(w, h) with the longest side ``size`` (rounded to ``multiple``), aspect ratio kept.

    Neither side is below ``min_side`` (rounded up to ``multiple``): very thin
    images and tiny ``size`` values get a slightly wider short side instead of
    a network input too small to use.
    """
    scale = size / max(width, height)
    floor = max(multiple, -(-min_side // multiple) * multiple)

    def snap(v: float) -> int:
        return max(floor, int(round(v * scale / multiple)) * multiple)

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


def prepare_content(image, size: int):
    """A path, PIL image or tensor -> (1, 3, h, w) in [0, 1], longest side ``size``, sides multiples of 8."""
    import torch
    import torch.nn.functional as F

    if isinstance(image, torch.Tensor):
        t = image if image.dim() == 4 else image.unsqueeze(0)
        w, h = fit_size(t.shape[-1], t.shape[-2], size)
        return F.interpolate(t.float(), size=(h, w), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    if not hasattr(image, "size"):
        image = open_image(image).image
    return to_tensor(image.convert("RGB"), fit_size(*image.size, size))


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
    as '-', no leading dot, at most ``max_bytes`` UTF-8 bytes, never empty.

    Only characters for which ``str.isalnum`` holds survive, so no path
    separator, dot, control, format (bidi) or space character can appear.
    """
    s = unicodedata.normalize("NFKC", text).lower()
    s = "".join(ch if ch.isalnum() else "-" for ch in s)
    s = re.sub(r"-+", "-", s).strip("-")
    encoded = s.encode("utf-8")[:max_bytes]
    s = encoded.decode("utf-8", errors="ignore").strip("-")
    if not s:
        # surrogatepass: a command line with undecodable bytes still gives a name
        s = "prompt-" + hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()[:8]
    return s


_SURROGATES = re.compile("[\ud800-\udfff]")


def png_metadata(values: dict) -> object:
    """PNG text chunks: strings as they are, everything else as JSON."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in values.items():
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)
        # Lone surrogates (undecodable command-line bytes) cannot be UTF-8: shown as U+FFFD, not fatal.
        info.add_itxt(key, _SURROGATES.sub("\ufffd", text))
    return info


_TMP_COUNTER = itertools.count()


def temporary_name(path: Path) -> Path:
    """Where :func:`write_atomic` writes ``path`` first: hidden, unique per process and call."""
    return path.with_name(f".{path.name}.{os.getpid()}-{next(_TMP_COUNTER)}.tmp")


_TEMPORARY = re.compile(r"\.(.+)\.\d+-\d+\.tmp", re.DOTALL)


def temporary_of(name: str) -> str | None:
    """The file name a :func:`temporary_name` was made for (None for any other name)."""
    match = _TEMPORARY.fullmatch(name)
    return match.group(1) if match else None


def write_atomic(path: str | Path, write, overwrite: bool = False) -> None:
    """Write a file through ``write(file_object)`` into a temporary file beside
    ``path``, then move it into place. An interrupted or failed write leaves no
    partial file; an existing file is kept unless ``overwrite``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder: {exc.strerror}", path.parent) from None
    try:
        if path.exists() and not overwrite:
            raise OutputError("exists (use --overwrite to replace it)", path)
    except OSError as exc:  # e.g. a name too long for the file system
        raise OutputError(f"cannot write: {exc.strerror or exc}", path) from None
    tmp = temporary_name(path)  # unique per process and call, so parallel writers never share one
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
        except OSError:  # already moved into place, or the folder went away
            pass


def png_bytes(image, metadata: dict | None = None) -> bytes:
    """A PIL image or [0, 1] tensor as the bytes of a PNG file with text metadata."""
    pil = image if hasattr(image, "save") else to_pil(image)
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG", pnginfo=png_metadata(metadata or {}))
    return buffer.getvalue()


def save_png(image, path: str | Path, metadata: dict | None = None, overwrite: bool = False) -> None:
    """Save a PIL image or [0, 1] tensor as PNG, atomically, with text metadata."""
    data = png_bytes(image, metadata)
    write_atomic(path, lambda fh: fh.write(data), overwrite=overwrite)
