"""Colour preservation (``--preserve-color``): luminance-only transfer.

Gatys et al. 2016 ("Preserving color in neural artistic style transfer"):
keep the photo's colours and take only light and texture from the style. The
output's chroma (Cb and Cr of YCbCr as JPEG/JFIF defines it: ITU-R BT.601
weights, full range) is the photo's, its luminance Y the stylized image's.

In JPEG's YCbCr, Cb and Cr are fixed multiples of B - Y and R - Y, so keeping
them means ``out = Y_styled + (photo - Y_photo)``: the photo's colour offset
from its own grey, moved to the new brightness.

Out of gamut: a dark or bright Y with a saturated photo colour can ask for an
RGB value outside [0, 1]. Then the colour offset is scaled down, per pixel, by
the largest factor in [0, 1] that fits: Y and the hue are kept exactly, only
the saturation of those pixels drops (towards the grey of the same
luminance). Clipping each channel instead would change Y and the hue.
"""

from __future__ import annotations

import torch

# ITU-R BT.601 luma weights, as JPEG (JFIF) uses for Y.
KR, KG, KB = 0.299, 0.587, 0.114


def luma(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W): Y = 0.299 R + 0.587 G + 0.114 B."""
    return KR * rgb[:, 0:1] + KG * rgb[:, 1:2] + KB * rgb[:, 2:3]


def rgb_to_ycbcr(rgb: torch.Tensor) -> torch.Tensor:
    """JPEG's YCbCr, in [0, 1] units (Cb, Cr centred on 0.5). (B, 3, H, W) -> (B, 3, H, W)."""
    y = luma(rgb)
    cb = 0.5 + (rgb[:, 2:3] - y) / (2 * (1 - KB))  # 1.772
    cr = 0.5 + (rgb[:, 0:1] - y) / (2 * (1 - KR))  # 1.402
    return torch.cat([y, cb, cr], dim=1)


def preserve_colour(styled: torch.Tensor, photo: torch.Tensor) -> torch.Tensor:
    """The photo's chroma with the stylized luminance, in gamut. Both (B, 3, H, W) in [0, 1]."""
    y = luma(styled).clamp(0, 1)  # (B, 1, H, W)
    offset = photo - luma(photo)  # (B, 3, H, W): the photo's colour, Y removed (Cb, Cr only)
    # Largest t <= 1 with 0 <= y + t * offset <= 1 in every channel (y itself is in gamut).
    room = torch.where(
        offset > 0,
        (1 - y) / offset.clamp_min(1e-12),
        torch.where(offset < 0, y / (-offset).clamp_min(1e-12), torch.ones_like(offset)),
    )
    t = room.amin(dim=1, keepdim=True).clamp(0, 1)
    return (y + t * offset).clamp(0, 1)


__all__ = ["KB", "KG", "KR", "luma", "preserve_colour", "rgb_to_ycbcr"]
