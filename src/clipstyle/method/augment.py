"""Random perspective-warped crops for the patch loss, for a whole batch at once.

The reference code crops N patches, warps each with torchvision's
RandomPerspective and resizes it to CLIP's input size, one patch at a time.
Here crop, warp and resize are one sampling grid per patch, and all patches are
sampled from the image in a single ``grid_sample`` call: the same operation,
without a Python loop or intermediate images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class CropGrids:
    """Sampling grids of ``n`` crops of one image.

    grid: (n, out, out, 2) in grid_sample's normalised coordinates of the image.
    mask: (n, 1, out, out), 1 where the warped patch has content, 0 where the
    perspective warp leaves the fill value (0, as in the reference).
    """

    grid: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return self.grid.shape[0]

    def slice(self, start: int, stop: int) -> CropGrids:
        return CropGrids(self.grid[start:stop], self.mask[start:stop])


def _homographies(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """3x3 matrices H with H(src_i) = dst_i for four point pairs; (n, 4, 2) -> (n, 3, 3)."""
    n = src.shape[0]
    x, y = src[..., 0], src[..., 1]  # (n, 4)
    u, v = dst[..., 0], dst[..., 1]
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    rows_u = torch.stack([x, y, one, zero, zero, zero, -u * x, -u * y], dim=-1)  # (n, 4, 8)
    rows_v = torch.stack([zero, zero, zero, x, y, one, -v * x, -v * y], dim=-1)
    a = torch.cat([rows_u, rows_v], dim=1)  # (n, 8, 8)
    b = torch.cat([u, v], dim=1).unsqueeze(-1)  # (n, 8, 1)
    h = torch.linalg.solve(a, b).squeeze(-1)  # (n, 8)
    return torch.cat([h, torch.ones(n, 1, dtype=h.dtype)], dim=1).view(n, 3, 3)


@dataclass
class CropDraw:
    """The random part of ``n`` crops, drawn on the CPU: where each crop is and how it is warped.

    hom: (n, 3, 3) maps output pixels (in crop pixels) to source crop pixels;
    offset: (n, 2) each crop's left and top in image pixels; crop: side in pixels.
    """

    hom: torch.Tensor
    offset: torch.Tensor
    crop: int

    def to(self, device: torch.device | str, non_blocking: bool = False) -> CropDraw:
        return CropDraw(
            self.hom.to(device, non_blocking=non_blocking), self.offset.to(device, non_blocking=non_blocking), self.crop
        )


def draw_crops(
    height: int, width: int, n: int, crop_size: int, distortion: float, generator: torch.Generator
) -> CropDraw:
    """Draw ``n`` random crops of ``crop_size`` from an image of height x width (on the CPU).

    Each crop is perspective-warped as torchvision's RandomPerspective does:
    every corner moves inwards by up to ``distortion`` times half the side and
    the patch's content shrinks into that quadrilateral.
    """
    crop = min(crop_size, height, width)
    # Top-left corner of each crop, in pixels.
    top = torch.randint(0, height - crop + 1, (n,), generator=generator)
    left = torch.randint(0, width - crop + 1, (n,), generator=generator)
    # Destination corners: each corner of the crop moved inwards.
    c = float(crop - 1)
    corners = torch.tensor([[0.0, 0.0], [c, 0.0], [c, c], [0.0, c]], dtype=torch.float64)
    inward = torch.tensor([[1, 1], [-1, 1], [-1, -1], [1, -1]], dtype=torch.float64)
    shift = torch.rand(n, 4, 2, generator=generator, dtype=torch.float64) * (distortion * crop / 2)
    moved = corners + inward * shift  # (n, 4, 2)
    # Output pixel -> source pixel of the crop: the map from moved corners back
    # to the corners. Solved in float64 on the CPU (n small 8x8 systems).
    hom = _homographies(moved, corners.expand(n, 4, 2)).float()  # (n, 3, 3)
    offset = torch.stack([left, top], dim=-1).float()  # (n, 2)
    return CropDraw(hom, offset, crop)


def crop_grids(draw: CropDraw, height: int, width: int, out_size: int) -> CropGrids:
    """Sampling grids of drawn crops, computed on the device of ``draw`` (no host transfer).

    Output pixels are resized to ``out_size`` with half-pixel centres; pixels
    that the warp maps outside the crop get mask 0 (the fill value, as in the
    reference).
    """
    hom, offset, crop = draw.hom, draw.offset, draw.crop
    n, device = hom.shape[0], hom.device
    c = float(crop - 1)
    # Centres of the output pixels in crop pixel coordinates (resize with half-pixel centres).
    t = (torch.arange(out_size, device=device, dtype=torch.float32) + 0.5) * (crop / out_size) - 0.5
    gy, gx = torch.meshgrid(t, t, indexing="ij")
    pts = torch.stack([gx, gy, torch.ones_like(gx)], dim=-1).view(1, -1, 3)  # (1, P, 3)
    src = pts @ hom.transpose(1, 2)  # (n, P, 3)
    xy = src[..., :2] / src[..., 2:]  # (n, P, 2) in crop pixels
    inside = ((xy >= -0.5) & (xy <= c + 0.5)).all(dim=-1)  # (n, P)
    # Crop pixels -> normalised image coordinates (grid_sample, align_corners=False).
    pixels = xy + offset[:, None, :] + 0.5
    grid = torch.stack([pixels[..., 0] * (2.0 / width), pixels[..., 1] * (2.0 / height)], dim=-1) - 1
    return CropGrids(grid.view(n, out_size, out_size, 2), inside.view(n, 1, out_size, out_size).float())


def random_crop_grids(
    height: int,
    width: int,
    n: int,
    crop_size: int,
    out_size: int,
    distortion: float,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> CropGrids:
    """Draw ``n`` random crops of ``crop_size`` from an image of height x width.

    Each crop is perspective-warped as torchvision's RandomPerspective does
    (every corner moves inwards by up to ``distortion`` times half the side,
    the patch's content shrinks into that quadrilateral, the rest is filled
    with 0) and resized to ``out_size``. The random numbers come from
    ``generator`` on the CPU, so the crops are the same on every device; the
    grids themselves are computed on ``device``.
    """
    draw = draw_crops(height, width, n, crop_size, distortion, generator)
    return crop_grids(draw.to(device), height, width, out_size)


def sample_crops(image: torch.Tensor, grids: CropGrids) -> torch.Tensor:
    """Sample the crops of ``grids`` from one image (1, C, H, W) -> (n, C, out, out).

    One ``grid_sample`` call: the n grids are stacked along the height, so the
    image is never copied n times.
    """
    n, out = grids.grid.shape[0], grids.grid.shape[1]
    if n == 0:
        return image.new_zeros(0, image.shape[1], out, out)
    stacked = grids.grid.reshape(1, n * out, out, 2).to(image.dtype)
    patches = F.grid_sample(image, stacked, mode="bilinear", padding_mode="zeros", align_corners=False)
    patches = patches.view(image.shape[1], n, out, out).transpose(0, 1)  # (n, C, out, out)
    return patches * grids.mask.to(image.dtype)
