"""Saved styles: the trained StyleNet kept as a file, and rendering images with it.

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

import contextlib
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from clipstyle import __version__
from clipstyle.errors import ClipstyleError, require_file
from clipstyle import unet as _unet
from clipstyle.unet import StyleNet
from clipstyle.weights import describe_mismatch

FORMAT_KEY = "clipstyle.style"
FORMAT_VERSION = "1"
SUFFIXES = (".style", ".safetensors")

# Whole-image rendering up to this many pixels, tiles above it. A StyleNet
# forward pass at width 16 keeps roughly 0.5 kB per pixel alive at its peak
# (fp32, no gradients), so 4 megapixels is about 2 GB: safe on a laptop CPU
# and on any GPU clipstyle supports.
WHOLE_IMAGE_PIXELS = 4_000_000
DEFAULT_TILE = 1024
DEFAULT_OVERLAP = 64
MIN_TILE = 64  # three stride-2 stages: smaller tiles leave InstanceNorm a few numbers per channel
MAX_WIDTH = 256  # a width beyond this is a hostile or foreign header, not a StyleNet
# StyleNet's instance norms (our own class, or torch's in older versions of unet.py)
_NORM_TYPES = tuple(t for t in (nn.InstanceNorm2d, getattr(_unet, "InstanceNorm", None)) if t is not None)
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
    from clipstyle.images import slugify

    return slugify(stem)


def is_style_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() in SUFFIXES


# --- writing -----------------------------------------------------------------------------------------------


def style_metadata(*, prompt: str, settings=None, seed: int | None = None, input_path: str | Path | None = None,
                   trained_size: Sequence[int] | None = None, models_info: dict | None = None) -> dict:
    """The metadata ``run --save-style`` records: enough to know what the style is
    and to repeat its training. The input is identified by name and SHA-256, not
    by its full path (which would leak the user's folder layout)."""
    meta: dict = {"prompt": prompt}
    if settings is not None:
        meta["settings"] = settings.to_dict() if hasattr(settings, "to_dict") else dict(settings)
    if seed is not None:
        meta["seed"] = int(seed)
    if input_path is not None:
        import hashlib

        p = Path(input_path)
        meta["input"] = p.name
        try:
            meta["input_sha256"] = hashlib.sha256(p.read_bytes()).hexdigest()
        except OSError:
            pass
    if trained_size is not None:
        meta["trained_size"] = [int(v) for v in trained_size]  # (w, h) the network was optimised at
    if models_info is not None:
        meta["models"] = models_info
    return meta


def save_style(path: str | Path, network: StyleNet, metadata: dict, overwrite: bool = False) -> None:
    """Write ``network`` and ``metadata`` to ``path`` as a style file, atomically.

    An existing file is kept (OutputError) unless ``overwrite``. ``metadata``
    must be JSON-serialisable.
    """
    from clipstyle.images import write_atomic

    data = style_bytes(network, metadata)
    write_atomic(path, lambda fh: fh.write(data), overwrite=overwrite)


def style_bytes(network: StyleNet, metadata: dict) -> bytes:
    """``network`` and ``metadata`` as the bytes of a style file."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in network.state_dict().items()}
    header = {
        FORMAT_KEY: FORMAT_VERSION,
        "clipstyle.width": str(network.stem.out_channels),
        "clipstyle.version": __version__,
        "clipstyle.metadata": json.dumps(metadata, sort_keys=True, ensure_ascii=False),
    }
    data = save(tensors, metadata=header)
    # safetensors writes the header in hash order, which changes from process to process: sorted,
    # the same network and metadata give the same bytes (on another machine too).
    size = int.from_bytes(data[:8], "little")
    sorted_header = json.dumps(json.loads(data[8:8 + size]), sort_keys=True, separators=(",", ":"),
                               ensure_ascii=False).encode("utf-8")
    sorted_header += b" " * (-len(sorted_header) % 8)  # padded as safetensors pads
    return len(sorted_header).to_bytes(8, "little") + sorted_header + data[8 + size:]


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
        raise StyleError("refused: this is a Python pickle, which could run code when loaded; "
                         "style files are safetensors written by clipstyle", path)
    if head[:4] == b"PK\x03\x04":
        raise StyleError("refused: this is a torch.save/zip archive (pickled Python objects, which could run "
                         "code when loaded); style files are safetensors written by clipstyle", path)
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
        raise StyleError(f"style format {version!r} is not supported by clipstyle {__version__} "
                         f"(it reads format {FORMAT_VERSION})", path)
    try:
        width = int(header.get("clipstyle.width", ""))
    except ValueError:
        raise StyleError("style header has no valid clipstyle.width", path) from None
    if not 1 <= width <= MAX_WIDTH:
        raise StyleError(f"style width {width} is outside 1..{MAX_WIDTH}", path)
    try:
        meta = json.loads(header.get("clipstyle.metadata", "{}"))
    except ValueError:
        raise StyleError("style metadata is not valid JSON", path) from None
    if not isinstance(meta, dict):
        raise StyleError("style metadata is not a JSON object", path)
    return width, meta


def _check_shapes(shapes: dict, width: int, path: Path) -> None:
    """Names and shapes against a StyleNet of ``width`` built on the meta device
    (no memory), before any tensor is read."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in StyleNet(width).state_dict().items()}
    mismatch = describe_mismatch(expected, shapes)
    if mismatch:
        raise StyleError(f"not StyleNet weights: {mismatch}", path)


# --- rendering ---------------------------------------------------------------------------------------------


def mix_weights(n: int, mix: Sequence[float] | None) -> list[float]:
    """One weight per network, non-negative, summing to 1. ``None``: equal weights."""
    if n < 1:
        raise ValueError("render needs at least one network")
    if mix is None:
        return [1.0 / n] * n
    weights = [float(m) for m in mix]
    if len(weights) != n:
        raise ValueError(f"mix has {len(weights)} weights for {n} networks")
    if any(not math.isfinite(w) or w < 0 for w in weights) or abs(sum(weights) - 1.0) > 1e-6:
        raise ValueError(f"mix weights must be non-negative and sum to 1 (got {weights})")
    return weights


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of windows of ``tile`` pixels covering ``range(length)``: evenly
    spread, multiples of 8 (so every tile sits on the U-Net's 1/8 grid), neighbours
    overlapping by at least ``overlap``. The last window may be shorter than ``tile``."""
    if length <= tile:
        return [0]
    # spacing (length - tile) / (n - 1) <= tile - overlap - 8 leaves room to round up to 8
    n = math.ceil((length - tile) / (tile - overlap - 8)) + 1
    return [8 * math.ceil(i * (length - tile) / (n - 1) / 8) for i in range(n)]


def _windows(length: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(start, end, core_start, core_end) per window along one axis. The cores
    partition ``range(length)`` (cut at multiples of 8 inside each overlap), so
    statistics summed over cores count every pixel once."""
    starts = tile_starts(length, tile, overlap)
    ends = [min(s + tile, length) for s in starts]
    cuts = [0] + [8 * (((nxt + end) // 2) // 8) for nxt, end in zip(starts[1:], ends[:-1])] + [length]
    return [(s, e, cuts[i], cuts[i + 1]) for i, (s, e) in enumerate(zip(starts, ends))]


def plan_tiles(height: int, width: int, tile: int | None = None, overlap: int = DEFAULT_OVERLAP,
               max_pixels: int = WHOLE_IMAGE_PIXELS) -> tuple[int, int] | None:
    """The (tile, overlap) ``render`` uses for an image of this size, or None for
    one whole-image pass. ``tile=None``: whole up to ``max_pixels``, else tiles of
    DEFAULT_TILE; ``tile=0``: always whole. Tiles are rounded up to multiples of 8."""
    if tile == 0 or (tile is None and height * width <= max_pixels):
        return None
    tile = DEFAULT_TILE if tile is None else 8 * math.ceil(int(tile) / 8)
    if tile < MIN_TILE:
        raise ValueError(f"tile must be at least {MIN_TILE} pixels (got {tile})")
    if not 0 <= overlap <= tile // 2 - 8:
        raise ValueError(f"overlap must be in 0..{tile // 2 - 8} for tiles of {tile} (got {overlap})")
    if height <= tile and width <= tile:
        return None
    return tile, overlap


def count_tiles(height: int, width: int, plan: tuple[int, int] | None) -> int:
    if plan is None:
        return 1
    tile, overlap = plan
    return len(tile_starts(height, tile, overlap)) * len(tile_starts(width, tile, overlap))


def _ramp(length: int, start: int, total: int, overlap: int) -> torch.Tensor:
    """Blend weights along one axis of a window: 1 inside, a sin^2 ramp over
    ``overlap`` pixels at edges that meet another window (not at image borders).
    Where two ramps of equal width meet, sin^2 + cos^2 = 1 (a partition of unity);
    render divides by the summed weights, which is exact where windows overlap
    more. Never zero, so every pixel has weight; a tile's outermost pixels, where
    zero padding replaces the missing context, weigh least."""
    w = torch.ones(length)
    if overlap > 0:
        ramp = torch.sin(0.5 * math.pi * (torch.arange(overlap) + 0.5) / overlap) ** 2
        if start > 0:
            w[:overlap] = ramp
        if start + length < total:
            w[-overlap:] = torch.minimum(w[-overlap:], ramp.flip(0))
    return w


def _blend(networks: list[StyleNet], weights: list[float], x: torch.Tensor) -> torch.Tensor:
    """sum_i w_i f_i(x) over the networks with non-zero weight, in pixel space.
    A weight of 1 returns that network's output bit for bit."""
    out = None
    for net, w in zip(networks, weights):
        if w == 0.0:
            continue
        y = net(x)
        y = y if w == 1.0 else y * w
        out = y if out is None else out + y
    return out


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


@torch.no_grad()
def render(networks, image: torch.Tensor, *, tile: int | None = None, overlap: int = DEFAULT_OVERLAP,
           strength: float = 1.0, mix: Sequence[float] | None = None, max_pixels: int = WHOLE_IMAGE_PIXELS,
           tile_stats: str = "image", device: torch.device | str | None = None,
           callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Restyle ``image`` (1, 3, H, W) in [0, 1] with one or several trained networks.

    - ``networks``: a StyleNet or Style, or a sequence of them.
    - ``mix``: one weight per network (non-negative, sum 1; default equal). The
      outputs are blended in pixel space, ``sum_i mix_i * f_i(x)``: the weights of
      two independently trained networks have no correspondence, so averaging
      them would give neither style.
    - ``strength`` in [0, 1]: ``(1 - s) * x + s * styled``, a linear blend with the
      content image in pixel space. 0 returns the input, 1 the styled image,
      exactly; in between the style's colours and strokes fade evenly. It is
      predictable and free, unlike retraining with a larger content weight,
      which changes what the network paints rather than how much of it shows.
    - ``tile``, ``overlap``, ``max_pixels``: see :func:`plan_tiles`. Overlapping
      tiles are blended with sin^2 ramps.
    - ``tile_stats``: StyleNet normalises every feature map by its own mean and
      variance (InstanceNorm), so a tile normalised by itself gets other
      statistics than the whole image, and tiles of different content (sky,
      ground) disagree: soft seams. ``"image"`` (default) computes each
      InstanceNorm's statistics over the whole image first, one layer at a time
      through the tiles, then renders every tile with them: the result matches a
      whole-image pass up to the tiles' missing context at their edges, at about
      8 times the compute of one pass (18 layers, each needing the layers before
      it). ``"tile"``: one pass, per-tile statistics.
    - When a whole-image pass runs out of GPU memory and ``tile`` is None, it is
      retried in tiles of 1024, 512, then 256.
    - ``device``: where the networks run (default: that of the first network's
      parameters); the image and the result stay on the image's device, so a
      huge image can sit in CPU memory while tiles go through a GPU.
    - ``callback(done, total)`` after each network pass over a tile.

    Returns (1, 3, H, W) float32 in [0, 1] on ``image``'s device.
    """
    nets = [n.network if isinstance(n, Style) else n
            for n in (networks if isinstance(networks, (list, tuple)) else [networks])]
    weights = mix_weights(len(nets), mix)
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1] (got {strength})")
    if tile_stats not in ("image", "tile"):
        raise ValueError(f"tile_stats must be 'image' or 'tile' (got {tile_stats!r})")
    if image.dim() != 4 or tuple(image.shape[:2]) != (1, 3):
        raise ValueError(f"expected an image of shape (1, 3, H, W), got {tuple(image.shape)}")
    dev = torch.device(device) if device is not None else next(nets[0].parameters()).device
    x = image.float()
    h, w = x.shape[-2:]
    if strength == 0.0:
        return x.clone()
    used = [(n.eval(), wt) for n, wt in zip(nets, weights) if wt != 0.0]
    nets, weights = [n for n, _ in used], [wt for _, wt in used]
    plan = plan_tiles(h, w, tile, overlap, max_pixels)
    if plan is None:
        try:
            styled = _blend(nets, weights, x.to(dev)).to(x.device)
            if callback is not None:
                callback(1, 1)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if tile is not None or not _is_oom(exc) or max(h, w) <= 256:
                raise
            styled = _render_tiles_shrinking(nets, weights, x, dev, overlap, tile_stats, callback)
    else:
        styled = _render_tiles(nets, weights, x, dev, plan[0], plan[1], tile_stats, callback)
    if strength == 1.0:
        return styled
    return torch.lerp(x, styled, strength)


def _render_tiles_shrinking(nets, weights, x, dev, overlap, tile_stats, callback):
    """After an out-of-memory whole pass: tiles of 1024, then 512, then 256."""
    tile = DEFAULT_TILE
    while True:
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        try:
            return _render_tiles(nets, weights, x, dev, tile, min(overlap, tile // 2 - 8), tile_stats, callback)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not _is_oom(exc) or tile <= 256:
                raise
            tile //= 2


class _Stop(Exception):
    """Ends a forward pass once the layer being measured has been seen."""


def _norm_layers(net: StyleNet) -> list[nn.Module]:
    """The network's InstanceNorms in the order a forward pass calls them."""
    order: list[nn.Module] = []
    layers = [m for m in net.modules() if isinstance(m, _NORM_TYPES)]
    hooks = [m.register_forward_pre_hook(lambda m, _args: order.append(m)) for m in layers]
    try:
        net(torch.zeros(1, 3, 16, 16, device=next(net.parameters()).device))
    finally:
        for hk in hooks:
            hk.remove()
    return list(dict.fromkeys(order))


@contextlib.contextmanager
def _patched(forwards: dict):
    """Temporarily replace modules' forward functions (module -> function)."""
    for module, fn in forwards.items():
        module.forward = fn
    try:
        yield
    finally:
        for module in forwards:
            module.__dict__.pop("forward", None)


def _fixed_norm(mean: torch.Tensor, var: torch.Tensor, eps: float):
    scale = torch.rsqrt(var + eps)  # (1, C, 1, 1)

    def forward(t: torch.Tensor) -> torch.Tensor:
        return (t - mean) * scale

    return forward


def _image_stats(net, x, dev, rows, cols, tile_size, progress) -> dict:
    """Per-layer InstanceNorm (mean, var) of a whole-image pass, computed through
    tiles: for layer k, every tile runs with layers < k already fixed to their
    whole-image statistics and stops at layer k, which sums its input over the
    tile's core (cores partition the image, so no pixel counts twice)."""
    stats: dict = {}
    for layer in _norm_layers(net):
        total = [0.0, 0.0, 0]  # sum, sum of squares (float64, (C,)), count

        def measure(t, core=None):
            # the tile was padded to a multiple of 8; scale core bounds to this level
            (py, px), (y0, y1, x0, x1) = core
            fy, fx = t.shape[-2] / py, t.shape[-1] / px
            region = t[..., int(y0 * fy):math.ceil(y1 * fy), int(x0 * fx):math.ceil(x1 * fx)].double()
            total[0] = total[0] + region.sum(dim=(0, 2, 3))
            total[1] = total[1] + region.square().sum(dim=(0, 2, 3))
            total[2] += region.shape[-2] * region.shape[-1]
            raise _Stop

        fixed = {m: _fixed_norm(*stats[m], m.eps) for m in stats}
        for ys, ye, cy0, cy1 in rows:
            for xs, xe, cx0, cx1 in cols:
                padded = (8 * math.ceil((ye - ys) / 8), 8 * math.ceil((xe - xs) / 8))
                core = (padded, (cy0 - ys, cy1 - ys, cx0 - xs, cx1 - xs))
                with _patched({**fixed, layer: lambda t, core=core: measure(t, core)}):
                    try:
                        net(x[..., ys:ye, xs:xe].to(dev))
                    except _Stop:
                        pass
                progress()
        mean = total[0] / total[2]
        var = (total[1] / total[2] - mean.square()).clamp_min(0)
        stats[layer] = (mean.float().view(1, -1, 1, 1), var.float().view(1, -1, 1, 1))
    return stats


def _render_tiles(nets, weights, x, dev, tile: int, overlap: int, tile_stats: str, callback) -> torch.Tensor:
    h, w = x.shape[-2:]
    rows, cols = _windows(h, tile, overlap), _windows(w, tile, overlap)
    n_tiles = len(rows) * len(cols)
    n_layers = [len(_norm_layers(n)) if tile_stats == "image" else 0 for n in nets]
    total, done = n_tiles * (len(nets) + sum(n_layers)), 0

    def progress() -> None:
        nonlocal done
        done += 1
        if callback is not None:
            callback(done, total)

    fixed: dict = {}
    if tile_stats == "image":
        for net in nets:
            for m, (mean, var) in _image_stats(net, x, dev, rows, cols, tile, progress).items():
                fixed[m] = _fixed_norm(mean, var, m.eps)
    acc = torch.zeros_like(x)  # (1, 3, H, W) weighted sum of tile outputs
    norm = x.new_zeros(1, 1, h, w)  # (1, 1, H, W) sum of weights
    with _patched(fixed):
        for ys, ye, _, _ in rows:
            wy = _ramp(ye - ys, ys, h, overlap).to(x)
            for xs, xe, _, _ in cols:
                wx = _ramp(xe - xs, xs, w, overlap).to(x)
                weight = (wy[:, None] * wx[None, :])[None, None]  # (1, 1, th, tw)
                out = _blend(nets, weights, x[..., ys:ye, xs:xe].to(dev)).to(x.device)
                acc[..., ys:ye, xs:xe] += out * weight
                norm[..., ys:ye, xs:xe] += weight
                for _ in nets:
                    progress()
    return acc / norm


def target_size(width: int, height: int, size: int | None) -> tuple[int, int]:
    """(w, h) with the longest side ``size``, aspect kept; the image's own size for None.
    No rounding to multiples of 8: StyleNet pads and crops back."""
    if size is None:
        return width, height
    scale = size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


# --- applying styles to files ------------------------------------------------------------------------------


@dataclass
class ApplyJob:
    input: "object"  # clipstyle.runner.InputFile
    output: Path


@dataclass
class ApplyOptions:
    size: int | None = None  # longest side of the output; None: the input's own size
    tile: int | None = None
    overlap: int = DEFAULT_OVERLAP
    strength: float = 1.0
    mix: list[float] | None = None
    overwrite: bool = False
    max_pixels: int = 100_000_000  # inputs over this are refused (decompression bombs)
    whole_pixels: int = WHOLE_IMAGE_PIXELS  # whole-image pass up to this, tiles above
    tile_stats: str = "image"  # see render()


class ApplyEvents:
    """What applying reports as it goes; the CLI overrides these."""

    def started(self, job: ApplyJob, done: int, total: int) -> None: ...

    def tile(self, job: ApplyJob, done: int, total: int) -> None: ...

    def finished(self, job: ApplyJob, record: dict) -> None: ...

    def note(self, job: ApplyJob | None, message: str) -> None: ...


def plan_outputs(inputs: list, styles: Sequence[Style], output: Path | None) -> list[ApplyJob]:
    """One job per input: ``<stem>-<style>.png`` (styles joined by '+') in the
    output folder (default: the current one), under the input's subfolder for
    folder inputs; or ``output`` itself when it is a .png and there is one input."""
    label = "+".join(s.name for s in styles)
    as_file = output is not None and output.suffix.lower() == ".png" and not output.is_dir()
    if as_file and len(inputs) != 1:
        raise ClipstyleError("an output file needs exactly one image; give a folder instead", output)
    if output is not None and output.suffix and not as_file and not output.is_dir() and len(inputs) == 1:
        raise ClipstyleError("output files are PNG: use a name ending in .png, or a folder", output)
    folder = Path(".") if output is None else output
    jobs = []
    for inp in inputs:
        out = output if as_file else folder / Path(inp.rel).parent / f"{Path(inp.rel).stem}-{label}.png"
        jobs.append(ApplyJob(inp, out))
    return jobs


def _record(job: ApplyJob, styles: Sequence[Style], options: ApplyOptions, status: str,
            error: str | None = None) -> dict:
    return {"input": str(job.input.path), "styles": [str(s.path) for s in styles], "output": str(job.output),
            "status": status, "error": error, "seconds": None, "size": None,
            "strength": options.strength, "mix": mix_weights(len(styles), options.mix) if styles else None,
            "tiles": None}


def _output_metadata(job: ApplyJob, styles: Sequence[Style], options: ApplyOptions, size) -> dict:
    meta = {
        "Software": f"clipstyle {__version__}",
        "clipstyle": {
            "version": __version__, "input": Path(job.input.rel).name,
            "styles": [{"file": s.path.name, "prompt": s.metadata.get("prompt")} for s in styles],
            "mix": mix_weights(len(styles), options.mix), "strength": options.strength, "size": list(size),
            "tile": options.tile, "overlap": options.overlap, "tile_stats": options.tile_stats,
        },
    }
    prompts = [s.metadata.get("prompt") for s in styles]
    if len(prompts) == 1 and isinstance(prompts[0], str):
        meta["prompt"] = prompts[0]
    return meta


def apply_files(jobs: list[ApplyJob], styles: Sequence[Style], options: ApplyOptions, report,
                events: ApplyEvents | None = None, device: torch.device | None = None):
    """Restyle every job's input, skipping existing outputs and isolating failures.

    ``report``: a clipstyle.runner.Report. Returns a clipstyle.runner.Summary.
    """
    from clipstyle import images as io
    from clipstyle.runner import Summary

    events = events or ApplyEvents()
    device = device or torch.device("cpu")
    nets = [s.network.to(device) for s in styles]
    summary = Summary()
    start = time.perf_counter()

    def finish(job: ApplyJob, record: dict) -> None:
        summary.add(record)
        report.write(record)
        events.finished(job, record)

    for done, job in enumerate(jobs):
        if job.output.exists() and not options.overwrite:
            finish(job, _record(job, styles, options, "skipped", f"{job.output} exists"))
            continue
        events.started(job, done, len(jobs))
        record = _record(job, styles, options, "ok")
        t0 = time.perf_counter()
        try:
            loaded = io.open_image(job.input.path, options.max_pixels)
            for note in loaded.notes:
                events.note(job, note)
            size = target_size(*loaded.image.size, options.size)
            x = io.to_tensor(loaded.image, size)
            del loaded
            plan = plan_tiles(size[1], size[0], options.tile, options.overlap, options.whole_pixels)
            record["tiles"] = count_tiles(size[1], size[0], plan)
            y = render(nets, x, tile=options.tile, overlap=options.overlap, strength=options.strength,
                       mix=options.mix, max_pixels=options.whole_pixels, tile_stats=options.tile_stats,
                       device=device,
                       callback=lambda d, t, job=job: events.tile(job, d, t))
            io.save_png(y, job.output, _output_metadata(job, styles, options, size), overwrite=options.overwrite)
            record.update(size=list(size))
        except ClipstyleError as exc:
            record.update(status="failed", error=str(exc))
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not _is_oom(exc):
                raise
            if device.type == "cuda":
                torch.cuda.empty_cache()
            record.update(status="failed", error=f"{job.input.path}: out of memory; use smaller tiles "
                                                 "(--tile 512) or a smaller --size")
        record["seconds"] = round(time.perf_counter() - t0, 4)
        finish(job, record)
    summary.seconds = time.perf_counter() - start
    return summary


__all__ = ["Style", "StyleError", "save_style", "load_style", "style_metadata", "render", "plan_tiles",
           "tile_starts", "mix_weights", "target_size", "apply_files", "plan_outputs", "ApplyOptions",
           "ApplyEvents", "ApplyJob", "FORMAT_KEY", "FORMAT_VERSION", "WHOLE_IMAGE_PIXELS"]
