"""StyleNet: the small U-Net that CLIPstyler optimises per image (paper, Fig. 2).

About 0.6 M parameters at base width 16. Input and output are RGB in [0, 1];
the input is not normalised. Fully convolutional: a trained network applies to
any image size. Sizes that are not multiples of 8 are reflect-padded and
cropped back, so any height and width work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class InstanceNorm(nn.Module):
    """InstanceNorm without affine parameters (nn.InstanceNorm2d's maths and eps).

    Computed as a GroupNorm with one group per channel, which is the same
    normalisation: PyTorch's instance norm reshapes to a batch norm over
    (1, B*C, H, W) and, on the CPU, runs about twice as slow forwards and
    backwards, and cannot keep channels-last tensors in that layout.
    """

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.num_features, self.eps = channels, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] * x.shape[-2] == 1:
            # One value per channel (tiny inputs reach the bottleneck at 1x1):
            # x minus its own mean is exactly 0; torch's norms refuse this case.
            return x - x
        return F.group_norm(x, self.num_features, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class ResBlock(nn.Module):
    """conv3x3 - InstanceNorm - ReLU - conv3x3 - InstanceNorm - ReLU, plus a 1x1 skip."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1),
            InstanceNorm(cout),
            nn.ReLU(),
            nn.Conv2d(cout, cout, 3, padding=1),
            InstanceNorm(cout),
            nn.ReLU(),
        )
        self.skip = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.skip(x)


class StyleNet(nn.Module):
    """U-Net with three down and three up stages; widths 16-32-64, bottleneck 128."""

    multiple = 8  # 2 ** number of down stages

    def __init__(self, width: int = 16):
        super().__init__()
        w = width
        self.stem = nn.Conv2d(3, w, 1)
        self.head_block = ResBlock(w, w)
        down = [(w, w), (w, 2 * w), (2 * w, 4 * w)]
        self.down_blocks = nn.ModuleList(ResBlock(a, b) for a, b in down)
        self.down_convs = nn.ModuleList(nn.Conv2d(b, b, 4, stride=2, padding=1) for _, b in down)
        self.bottleneck = ResBlock(4 * w, 8 * w)
        # up stage i: upsample, concat the skip of the same level, residual block
        up = [(8 * w + 4 * w, 4 * w), (4 * w + 2 * w, 2 * w), (2 * w + w, w)]
        self.up_blocks = nn.ModuleList(ResBlock(a, b) for a, b in up)
        self.tail_block = ResBlock(2 * w, w)
        self.to_rgb = nn.Conv2d(w, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = self.multiple
        pad_h, pad_w = (-h) % m, (-w) % m
        if pad_h or pad_w:
            # reflect needs pad < size; replicate covers tiny images
            mode = "reflect" if pad_h < h and pad_w < w else "replicate"
            x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
        first = self.head_block(self.stem(x))  # (B, w, H, W)
        y, skips = first, []
        for block, conv in zip(self.down_blocks, self.down_convs):
            y = block(y)
            skips.append(y)  # (B, c, H/2^i, W/2^i)
            y = conv(y)
        y = self.bottleneck(y)  # (B, 8w, H/8, W/8)
        for block, skip in zip(self.up_blocks, reversed(skips)):
            y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = block(torch.cat([y, skip], dim=1))
        y = self.tail_block(torch.cat([y, first], dim=1))
        y = torch.sigmoid(self.to_rgb(y))  # (B, 3, H, W) in (0, 1)
        return y[..., :h, :w]
