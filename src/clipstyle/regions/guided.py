"""Edge-aware upsampling of coarse masks: the guided filter (He et al. 2010; fast variant He & Sun 2015).

A few box filters: the output is a local linear function of the guide (the
photo's luma), so a coarse mask's edges move onto the photo's edges.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipstyle.regions.colour import luma


def box_filter(x: torch.Tensor, r: int) -> torch.Tensor:
    """Mean over a (2r+1)^2 window, counting only pixels inside the image."""
    if r <= 0:
        return x
    return F.avg_pool2d(x, 2 * r + 1, stride=1, padding=r, count_include_pad=False)


def guided_coefficients(guide: torch.Tensor, src: torch.Tensor, radius: int, eps: float):
    """The guided filter's smoothed linear coefficients (He et al., "Guided Image Filtering", 2010):
    the output is A * guide + B. guide, src: (1, 1, H, W)."""
    r = min(radius, (min(guide.shape[-2:]) - 1) // 2)
    mean_i, mean_p = box_filter(guide, r), box_filter(src, r)
    var_i = box_filter(guide * guide, r) - mean_i * mean_i
    cov_ip = box_filter(guide * src, r) - mean_i * mean_p
    a = cov_ip / (var_i + eps)
    b = mean_p - a * mean_i
    return box_filter(a, r), box_filter(b, r)


def guided_filter(guide: torch.Tensor, src: torch.Tensor, radius: int, eps: float) -> torch.Tensor:
    a, b = guided_coefficients(guide, src, radius, eps)
    return a * guide + b


def guided_upsample(
    src: torch.Tensor, guide_small: torch.Tensor, guide: torch.Tensor, radius: int, eps: float
) -> torch.Tensor:
    """Edge-aware upsampling (the fast guided filter, He & Sun 2015): filter ``src`` at the small size
    with ``guide_small``, upsample the coefficients bilinearly, apply them to the full-size ``guide``.
    The result's edges follow the guide's. All (1, 1, h, w); returns guide's size, in [0, 1]."""
    a, b = guided_coefficients(guide_small, src, radius, eps)
    size = guide.shape[-2:]
    a = F.interpolate(a, size=size, mode="bilinear", align_corners=False)
    b = F.interpolate(b, size=size, mode="bilinear", align_corners=False)
    return (a * guide + b).clamp(0, 1)


def grey(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma (ITU-R 601, as JPEG's Y): the guide."""
    return luma(images)
