"""What the optimisation does with a region's mask (``--mask``, ``--where``; clipstyle.regions makes it).

The patch crops are drawn where the mask is (:func:`crop_sampler`), and CLIP
sees the output composited over the photo outside it (:func:`composite`), so
all of a step's CLIP work goes where the style will show.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipstyle.errors import MaskError
from clipstyle.method.augment import CropDraw, draw_crops


def composite(styled: torch.Tensor, photo: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``m * styled + (1 - m) * photo``: exactly the photo where m = 0 and exactly styled where m = 1."""
    return torch.lerp(photo, styled, mask.to(styled.dtype))


def crop_sampler(mask: torch.Tensor, crop_size: int):
    """``draw_crops`` for a masked region: each crop's position is drawn with probability
    proportional to how much of the crop the mask covers (its mean over the crop).

    A crop wholly outside the region is never drawn. The warp is drawn as
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
