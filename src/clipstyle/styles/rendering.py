"""Rendering images with trained StyleNets: whole, or in overlapping tiles; mixes and strength.

CLIPstyler's network is fully convolutional (paper, Sec. 3), so a trained one
restyles any image at any size in one forward pass - no CLIP, no VGG.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from clipstyle.config import TILE_OVERLAP
from clipstyle.device import release_cached_memory, wide_dtype
from clipstyle.errors import is_out_of_memory
from clipstyle.method import unet as _unet
from clipstyle.method.unet import StyleNet
from clipstyle.styles.stylefile import Style

# Whole-image rendering up to this many pixels, tiles above it. A StyleNet
# forward pass at width 16 keeps roughly 0.5 kB per pixel alive at its peak
# (fp32, no gradients), so 4 megapixels is about 2 GB: safe on a laptop CPU
# and on any GPU clipstyle supports.
WHOLE_IMAGE_PIXELS = 4_000_000
DEFAULT_TILE = 1024
DEFAULT_OVERLAP = TILE_OVERLAP
MIN_TILE = 64  # three stride-2 stages: smaller tiles leave InstanceNorm a few numbers per channel
# StyleNet's instance norms (our own class, or torch's in older versions of unet.py)
_NORM_TYPES = tuple(t for t in (nn.InstanceNorm2d, getattr(_unet, "InstanceNorm", None)) if t is not None)


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


def plan_tiles(
    height: int,
    width: int,
    tile: int | None = None,
    overlap: int = DEFAULT_OVERLAP,
    max_pixels: int = WHOLE_IMAGE_PIXELS,
) -> tuple[int, int] | None:
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


@torch.no_grad()
def render(
    networks,
    image: torch.Tensor,
    *,
    tile: int | None = None,
    overlap: int = DEFAULT_OVERLAP,
    strength: float = 1.0,
    mix: Sequence[float] | None = None,
    max_pixels: int = WHOLE_IMAGE_PIXELS,
    tile_stats: str = "image",
    device: torch.device | str | None = None,
    callback: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
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
    - ``device``: where the networks run (they are moved there; default: that
      of the first network's parameters); the image and the result stay on
      the image's device, so a huge image can sit in CPU memory while tiles go
      through a GPU.
    - ``callback(done, total)`` after each network pass over a tile.

    Returns (1, 3, H, W) float32 in [0, 1] on ``image``'s device.
    """
    nets = [
        n.network if isinstance(n, Style) else n
        for n in (networks if isinstance(networks, (list, tuple)) else [networks])
    ]
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
    used = [(n.eval().to(dev), wt) for n, wt in zip(nets, weights) if wt != 0.0]
    nets, weights = [n for n, _ in used], [wt for _, wt in used]
    plan = plan_tiles(h, w, tile, overlap, max_pixels)
    if plan is None:
        styled = None
        try:
            styled = _blend(nets, weights, x.to(dev)).to(x.device)
            if callback is not None:
                callback(1, 1)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if tile is not None or not is_out_of_memory(exc) or max(h, w) <= 256:
                raise
        if styled is None:
            # Retried after the except block: inside it, the traceback would keep
            # the failed pass's tensors alive, and the tiles would run out too.
            styled = _render_tiles_shrinking(nets, weights, x, dev, overlap, tile_stats, callback)
    else:
        styled = _render_tiles(nets, weights, x, dev, plan[0], plan[1], tile_stats, callback)
    if strength == 1.0:
        return styled
    return torch.lerp(x, styled, strength)


@torch.no_grad()
def render_batch(
    networks,
    images: torch.Tensor,
    *,
    strength: float = 1.0,
    mix: Sequence[float] | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Restyle a batch of same-size images (N, 3, H, W) in [0, 1] in one pass of each network,
    whole images only (the frames of a film on a GPU). StyleNet's InstanceNorm normalises each
    image by its own statistics, so each result equals :func:`render`'s up to rounding.
    Returns (N, 3, H, W) float32 on ``images``' device."""
    nets = [
        n.network if isinstance(n, Style) else n
        for n in (networks if isinstance(networks, (list, tuple)) else [networks])
    ]
    weights = mix_weights(len(nets), mix)
    dev = torch.device(device) if device is not None else next(nets[0].parameters()).device
    x = images.float()
    if strength == 0.0:
        return x.clone()
    used = [(n.eval().to(dev), wt) for n, wt in zip(nets, weights) if wt != 0.0]
    styled = _blend([n for n, _ in used], [wt for _, wt in used], x.to(dev)).to(x.device)
    return styled if strength == 1.0 else torch.lerp(x, styled, strength)


def _render_tiles_shrinking(nets, weights, x, dev, overlap, tile_stats, callback):
    """After an out-of-memory whole pass: tiles of 1024, then 512, then 256."""
    tile = DEFAULT_TILE
    while True:
        release_cached_memory(dev)
        try:
            return _render_tiles(nets, weights, x, dev, tile, min(overlap, tile // 2 - 8), tile_stats, callback)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not is_out_of_memory(exc) or tile <= 256:
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
        total = [0.0, 0.0, 0]  # sum, sum of squares ((C,), float64; float32 on MPS), count

        def measure(t, core=None):
            # the tile was padded to a multiple of 8; scale core bounds to this level
            (py, px), (y0, y1, x0, x1) = core
            fy, fx = t.shape[-2] / py, t.shape[-1] / px
            region = t[..., int(y0 * fy) : math.ceil(y1 * fy), int(x0 * fx) : math.ceil(x1 * fx)]
            region = region.to(wide_dtype(region.device))
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
