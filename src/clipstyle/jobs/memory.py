"""How much memory a size needs, and refusing sizes that cannot fit before allocating anything.

An optimisation keeps, for the backward pass, the activations of VGG-19 (to
relu5_2) and of the U-Net at the training size, and CLIP's for every crop
encoded at once; a render (``apply``, ``--output-size``) keeps the input, the
output and the tile sums at the output size. The figures below are lower
bounds (measured and counted in docs/performance.md, "Memory"):
a size they refuse cannot fit on that device whatever else is free; a size they
pass can still run out, and that pair then fails with one line (batch.py).
"""

from __future__ import annotations

import os

from clipstyle.config import AUTO_BATCH_MAX, AUTO_BATCH_SHARE, MAX_SIDE
from clipstyle.errors import ClipstyleError

# Optimisation: bytes per pixel of the training size (measured 4.1 to 5.3 KB at
# 256 to 768 px, fp32, PyTorch 2.x CPU), and per crop encoded at once (CLIP
# ViT-B/32 forward and backward at 224 px: measured 27 MB).
RUN_BYTES_PER_PIXEL = 4_000
RUN_BYTES_PER_CROP = 25_000_000
# Rendering (rendering.render): the input, the weighted tile sum, the sum of the
# weights and their quotient, all fp32 at the output size: 3 + 3 + 1 + 3 floats,
# 40 bytes per output pixel at least.
RENDER_BYTES_PER_PIXEL = 40


class MemoryNeedError(ClipstyleError):
    """A size that needs more memory than the device has."""


def run_bytes(width: int, height: int, crops: int, crop_batch: int = 0) -> int:
    """At least the bytes optimising one pair at ``width`` x ``height`` needs."""
    at_once = min(crops, crop_batch) if crop_batch else crops
    return width * height * RUN_BYTES_PER_PIXEL + at_once * RUN_BYTES_PER_CROP


def free_memory(device) -> int | None:
    """Bytes a GPU can still give (free on the card, plus what PyTorch's allocator holds
    unused); None on other devices."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def auto_batch(settings, device, free: int | None = None) -> int:
    """``--batch auto``: pairs optimised together on ``device``.

    On a GPU, as many as AUTO_BATCH_SHARE of its free memory (``free``; default:
    measured now, after the models are loaded) holds at run_bytes per pair for a
    square image at ``settings.size`` (the most pixels a size allows), from 1 to
    AUTO_BATCH_MAX. Elsewhere 1: on a CPU the cores are busy at batch 1 and a
    batch gains little (docs/performance.md), and MPS was not measured.
    """
    import torch

    if torch.device(device).type != "cuda":
        return 1
    free = free_memory(device) if free is None else free
    if free is None:
        return 1
    per_pair = run_bytes(settings.size, settings.size, settings.crops, settings.crop_batch)
    return max(1, min(AUTO_BATCH_MAX, int(free * AUTO_BATCH_SHARE // per_pair)))


def render_bytes(width: int, height: int) -> int:
    """At least the bytes rendering one image at ``width`` x ``height`` needs."""
    return width * height * RENDER_BYTES_PER_PIXEL


def device_memory(device) -> int | None:
    """Bytes of memory ``device`` has in all (None when unknown): a GPU's own memory,
    else the machine's RAM, or the process's memory limit (cgroup: containers,
    SLURM jobs) when that is lower."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device.index or 0).total_memory
    if device.type == "mps" and hasattr(torch.mps, "recommended_max_memory"):
        return int(torch.mps.recommended_max_memory())
    return host_memory()


def host_memory() -> int | None:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not a POSIX system
        return None
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit_file) as fh:
                text = fh.read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def check_fits(need: int, device, what: str, hint: str, path=None) -> None:
    """Raise MemoryNeedError (about ``path``) when ``need`` bytes are more than ``device`` has.

    ``what`` says what needs them ("optimising at 4096x2731 px with 64 crops"),
    ``hint`` what to lower.
    """
    have = device_memory(device)
    if have is not None and need > have:
        raise MemoryNeedError(
            f"{what} needs at least {_gb(need)} of memory, more than the {_gb(have)} "
            f"this {'GPU' if str(device).startswith('cuda') else 'machine'} has; {hint}",
            path,
        )


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n < 1e12 else f"{n / 1e12:.1f} TB"


def check_run_size(settings, device) -> None:
    """Refuse, before any work, a ``settings.size`` at which not even the thinnest image
    allowed (1:20) can be optimised on ``device``."""
    from clipstyle.images import MAX_ASPECT, fit_size

    w, h = fit_size(int(MAX_ASPECT), 1, settings.size)
    check_fits(
        run_bytes(w, h, settings.crops, settings.crop_batch),
        device,
        f"--size {settings.size}: optimising even the thinnest image ({w}x{h} px) with {settings.crops} crops",
        "lower --size",
    )


def check_render_size(longest: int, device, option: str = "--size") -> None:
    """Refuse, before any work, a longest side ``longest`` at which not even the thinnest image
    can be rendered on ``device``."""
    from clipstyle.images import MAX_ASPECT

    if longest > MAX_SIDE:
        raise ClipstyleError(f"{option} {longest}: at most {MAX_SIDE:,} pixels a side")
    w, h = longest, max(1, round(longest / MAX_ASPECT))
    check_fits(
        render_bytes(w, h),
        device,
        f"{option} {longest}: rendering even the thinnest image ({w}x{h} px)",
        f"lower {option}",
    )
