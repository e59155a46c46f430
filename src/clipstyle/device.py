"""Choosing the device and the precision, once, at the edge."""

from __future__ import annotations

import contextlib

import torch

from clipstyle.errors import DeviceError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu. An absent device is a DeviceError."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise DeviceError(f"unknown device {name!r} (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name} was requested but CUDA is not available here (use --device cpu)")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise DeviceError(f"device {name} was requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif device.type == "mps":
        if not _mps_available():
            raise DeviceError(f"device {name} was requested but Apple MPS is not available here (use --device cpu)")
    elif device.type != "cpu":
        raise DeviceError(f"unsupported device {name!r} (use auto, cpu, cuda, cuda:N or mps)")
    return device


def compute_info(device: torch.device) -> dict:
    """What decides a result's last bits besides its settings and seed, recorded beside them: the
    device's kind, the torch build, and the CPU's thread count (a sum split over another number of
    threads is added in another order) or the accelerator's name."""
    device = torch.device(device)
    info: dict = {"device": device.type, "torch": torch.__version__}
    if device.type == "cpu":
        info["threads"] = torch.get_num_threads()
    elif device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
    return info


def same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` are the same device."""
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype the frozen encoders run in, or None for plain fp32.

    ``auto``: fp32 on the CPU (bf16 matmuls are slower than fp32 on most CPUs),
    bf16 on CUDA cards that compute it natively (compute capability 8.0,
    Ampere, and later; fp16 on older ones, where bf16 is emulated and slow),
    fp16 on MPS. The U-Net, its optimiser and the loss sums always stay fp32.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        # not torch.cuda.is_bf16_supported(): it counts emulation, and asks the current card
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    if device.type == "mps":
        return torch.float16
    return None


def use_channels_last(memory_format: str, device: torch.device, dtype: torch.dtype | None) -> bool:
    """Whether VGG-19 runs channels-last (NHWC).

    ``auto``: on the CPU, where oneDNN's NHWC convolutions measured about twice
    as fast forwards and backwards (docs/performance.md); on CUDA
    with bf16/fp16 autocast, whose tensor-core convolutions want NHWC; not on
    MPS or in plain fp32 on CUDA, where it was not measured to help.
    """
    if memory_format == "channels_last":
        return True
    if memory_format == "contiguous":
        return False
    if device.type == "cpu":
        return True
    return device.type == "cuda" and dtype is not None


def wide_dtype(device: torch.device) -> torch.dtype:
    """The dtype for sums that must not lose precision: float64, or float32 on MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def release_cached_memory(device: torch.device) -> None:
    """Give the allocator's cached blocks back to the GPU (after running out of memory)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int | None:
    """Peak device memory on CUDA; on the CPU the process's peak resident size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if device.type == "mps":
        return int(torch.mps.driver_allocated_memory())
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)
    except (ImportError, OSError):
        return None
