"""Saved styles: the trained StyleNet kept as a file (format, writing, reading).

CLIPstyler trains a small, fully convolutional network per image (paper, Sec. 3);
the network itself is the style. Kept, it restyles any other photo or video
frame, at any resolution, in one forward pass - no CLIP, no VGG, no optimisation.

File format (``.style``, documented in docs/styles.md): a safetensors file
holding the StyleNet state dict in fp32, and in its header metadata (strings
only) the keys

- ``clipstyle.style``: the format version, ``"1"``;
- ``clipstyle.width``: the StyleNet base width;
- ``clipstyle.version``: the clipstyle version that wrote it;
- ``clipstyle.metadata``: a JSON object (prompt, settings, seed, the image it
  was trained on, models).

safetensors is raw tensor bytes plus a JSON header: loading it cannot run
code. Pickles and ``torch.save`` files are refused without being unpickled.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from clipstyle import __version__
from clipstyle.config import STYLE_SUFFIXES
from clipstyle.errors import ClipstyleError, require_file
from clipstyle.images import slugify, write_atomic
from clipstyle.method.unet import StyleNet
from clipstyle.models.weights import describe_mismatch
from clipstyle.provenance import file_sha256

FORMAT_KEY = "clipstyle.style"
FORMAT_VERSION = "1"
SUFFIXES = STYLE_SUFFIXES
MAX_WIDTH = 256  # a width beyond this is a hostile or foreign header, not a StyleNet
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class StyleError(ClipstyleError):
    """A style file that is missing, unsafe, foreign or corrupt."""


@dataclass
class Style:
    network: StyleNet  # in eval mode, on the CPU until moved
    metadata: dict  # what the writer recorded: prompt, settings, seed, input, models
    path: Path
    width: int = 16
    version: str = ""  # clipstyle version that wrote the file

    @property
    def name(self) -> str:
        """The file's stem, safe as part of an output file name."""
        return style_label(self.path)


def style_label(path: str | Path) -> str:
    stem = Path(path).stem
    if re.fullmatch(r"[\w\-]+", stem) and not stem.startswith("-"):
        return stem
    return slugify(stem)


def is_style_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() in SUFFIXES


# --- writing -----------------------------------------------------------------------------------------------


def style_metadata(
    *,
    prompt: str,
    settings=None,
    seed: int | None = None,
    input_path: str | Path | None = None,
    trained_size: Sequence[int] | None = None,
    models_info: dict | None = None,
    input_sha256: str | None = None,
    input_name: str | None = None,
) -> dict:
    """The metadata ``run --save-style`` records: enough to know what the style is
    and to repeat its training. The input is identified by name and SHA-256, not
    by its full path (which would leak the user's folder layout); ``input_sha256``
    when known (the file is read for it otherwise); ``input_name`` when the file is known by
    another name than its own (a web upload, stored under its hash)."""
    meta: dict = {"prompt": prompt}
    if settings is not None:
        meta["settings"] = settings.to_dict() if hasattr(settings, "to_dict") else dict(settings)
    if seed is not None:
        meta["seed"] = int(seed)
    if input_path is not None:
        p = Path(input_path)
        meta["input"] = input_name or p.name
        if input_sha256 is not None:
            meta["input_sha256"] = input_sha256
        else:
            try:
                meta["input_sha256"] = file_sha256(p)
            except OSError:
                pass
    if trained_size is not None:
        meta["trained_size"] = [int(v) for v in trained_size]  # (w, h) the network was optimised at
    if models_info is not None:
        meta["models"] = models_info
    return meta


def save_style(path: str | Path, network: StyleNet, metadata: dict | None = None, overwrite: bool = False) -> None:
    """Write ``network`` and ``metadata`` to ``path`` as a style file, atomically.

    An existing file is kept (OutputError) unless ``overwrite``. ``metadata``
    must be JSON-serialisable.
    """
    data = style_bytes(network, metadata)
    write_atomic(path, lambda fh: fh.write(data), overwrite=overwrite)


def style_bytes(network: StyleNet, metadata: dict | None = None) -> bytes:
    """``network`` and ``metadata`` as the bytes of a style file, the same for the same network and metadata."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in network.state_dict().items()}
    header = {
        FORMAT_KEY: FORMAT_VERSION,
        "clipstyle.width": str(network.stem.out_channels),
        "clipstyle.version": __version__,
        "clipstyle.metadata": json.dumps(metadata or {}, sort_keys=True, ensure_ascii=False),
    }
    data = save(tensors, metadata=header)
    # safetensors writes its JSON header in hash order, which changes from process to process:
    # sorted, the same network and metadata give the same bytes (on another machine too).
    size = int.from_bytes(data[:8], "little")
    sorted_header = json.dumps(
        json.loads(data[8 : 8 + size]), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")
    sorted_header += b" " * (-len(sorted_header) % 8)  # padded to 8 bytes, as safetensors pads
    return len(sorted_header).to_bytes(8, "little") + sorted_header + data[8 + size :]


# --- reading -----------------------------------------------------------------------------------------------


def _sniff(path: Path) -> None:
    """Refuse by content, before any parser runs: pickles and torch.save zips
    are never opened, whatever the file is called."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        raise StyleError(f"cannot read: {exc.strerror or exc}", path) from None
    if len(head) >= 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= 100_000_000:
        return  # safetensors: an 8-byte little-endian header length, then a JSON object
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5 or head[:1] in (b"(", b"}", b"]"):
        # 0x80 + protocol starts every binary pickle; '(' (MARK), '}' and ']' start older ones
        raise StyleError(
            "refused: this is a Python pickle, which could run code when loaded; "
            "style files are safetensors written by clipstyle",
            path,
        )
    if head[:4] == b"PK\x03\x04":
        raise StyleError(
            "refused: this is a torch.save/zip archive (pickled Python objects, which could run "
            "code when loaded); style files are safetensors written by clipstyle",
            path,
        )
    raise StyleError("not a clipstyle style file (expected a safetensors file)", path)


def load_style(path: str | Path) -> Style:
    """Read a style file; every problem is a StyleError naming the file."""
    from safetensors import safe_open

    path = Path(path)
    require_file(path, "style", StyleError)
    _sniff(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            width, meta = _check_header(header, path)
            _check_shapes(shapes, width, path)
            state = {k: f.get_tensor(k) for k in shapes}
    except StyleError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types on untrusted bytes
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise StyleError(f"not a readable safetensors file ({first})", path) from None
    for name, tensor in state.items():
        if tensor.dtype not in _FLOAT_DTYPES:
            raise StyleError(f"tensor {name} has dtype {tensor.dtype}, expected floating point", path)
        if not torch.isfinite(tensor).all():
            raise StyleError(f"tensor {name} holds NaN or infinite values", path)
    net = StyleNet(width)
    net.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
    net.eval().requires_grad_(False)
    return Style(net, meta, path, width, header.get("clipstyle.version", ""))


def _check_header(header: dict, path: Path) -> tuple[int, dict]:
    version = header.get(FORMAT_KEY)
    if version is None:
        raise StyleError(f"a safetensors file, but not a clipstyle style (no {FORMAT_KEY!r} key in its header)", path)
    if version != FORMAT_VERSION:
        raise StyleError(
            f"style format {version!r} is not supported by clipstyle {__version__} (it reads format {FORMAT_VERSION})",
            path,
        )
    text = header.get("clipstyle.width", "").strip()
    if len(text) > 6:  # int() of thousands of digits is refused by Python (or slow): no width is that long
        raise StyleError(f"style width is a {len(text)}-character value, not a width in 1..{MAX_WIDTH}", path)
    try:
        width = int(text)
    except ValueError:
        raise StyleError("style header has no valid clipstyle.width", path) from None
    if not 1 <= width <= MAX_WIDTH:
        raise StyleError(f"style width {width} is outside 1..{MAX_WIDTH}", path)
    try:
        meta = json.loads(header.get("clipstyle.metadata", "{}"), parse_int=_metadata_int)
    except StyleError as exc:
        raise StyleError(exc.reason, path) from None
    except RecursionError:
        raise StyleError("style metadata is nested too deeply to read (thousands of levels)", path) from None
    except ValueError:
        raise StyleError("style metadata is not valid JSON", path) from None
    if not isinstance(meta, dict):
        raise StyleError("style metadata is not a JSON object", path)
    return width, meta


def _metadata_int(digits: str) -> int:
    """A JSON integer of the metadata: Python refuses to read ones over 4300 digits, with a
    message about conversion limits; say what is wrong with the file instead."""
    if len(digits) > 100:
        raise StyleError(f"style metadata holds a {len(digits)}-digit number, too long to be a setting")
    return int(digits)


def _check_shapes(shapes: dict, width: int, path: Path) -> None:
    """Names and shapes against a StyleNet of ``width`` built on the meta device
    (no memory), before any tensor is read."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in StyleNet(width).state_dict().items()}
    mismatch = describe_mismatch(expected, shapes)
    if mismatch:
        raise StyleError(f"not StyleNet weights: {mismatch}", path)
