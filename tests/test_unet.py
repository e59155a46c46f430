"""StyleNet: shape, range, size and parameter count (CLIPstyler, Fig. 2)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clipstyle.method.unet import StyleNet

from conftest import DEVICE


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return StyleNet().to(DEVICE)


def test_about_0_6_million_parameters(net):
    n = sum(p.numel() for p in net.parameters())
    assert 0.55e6 < n < 0.65e6


@pytest.mark.device
@pytest.mark.parametrize("height,width", [(32, 48), (7, 13), (37, 51), (13, 7), (3, 50), (9, 9)])
def test_keeps_shape_and_range_for_any_size(net, height, width):
    x = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(height * width)).to(DEVICE)
    y = net(x)
    assert y.shape == (1, 3, height, width)
    assert torch.isfinite(y).all()
    assert 0 < y.min() and y.max() < 1  # sigmoid output


@pytest.mark.device
@pytest.mark.parametrize("height,width", [(1, 1), (8, 8), (5, 8)])
def test_tiny_images_work(net, height, width):
    # Inputs padded to 8x8 reach the bottleneck at 1x1, where InstanceNorm has
    # a single value per channel; size 8 is a valid setting, so this must work.
    y = net(torch.rand(1, 3, height, width).to(DEVICE))
    assert y.shape == (1, 3, height, width)
    assert torch.isfinite(y).all()


@pytest.mark.device
def test_each_image_of_a_batch_is_independent(net):
    # InstanceNorm, no batch statistics: batching pairs does not mix them.
    x = torch.rand(3, 3, 24, 40, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    together = net(x)
    alone = torch.cat([net(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.device
def test_output_depends_on_the_input_and_gradients_reach_every_parameter(net):
    x = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    assert not torch.allclose(net(x), net(x.flip(-1)))
    net.zero_grad()
    net(x).mean().backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    net.zero_grad()
    assert missing == []


def test_three_channels_in_and_out_and_the_papers_widths():
    net = StyleNet()
    assert net.stem.in_channels == 3 and net.to_rgb.out_channels == 3
    # widths 16-32-64 and a 128-channel bottleneck at base width 16
    assert [b.skip.out_channels for b in net.down_blocks] == [16, 32, 64]
    assert net.bottleneck.skip.out_channels == 128


@pytest.mark.device
def test_unet_instance_norm_is_torchs_instance_norm():
    from clipstyle.method.unet import InstanceNorm

    x = torch.randn(2, 16, 12, 20).to(DEVICE)
    torch.testing.assert_close(InstanceNorm(16)(x), nn.InstanceNorm2d(16)(x), atol=1e-5, rtol=1e-5)
    nhwc = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(InstanceNorm(16)(nhwc), nn.InstanceNorm2d(16)(x), atol=1e-5, rtol=1e-5)
