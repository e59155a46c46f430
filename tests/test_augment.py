"""Random perspective crops for the patch loss (CLIPstyler, section 3.2)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipstyle.method.augment import random_crop_grids, sample_crops

from conftest import DEVICE

pytestmark = pytest.mark.device


def coordinate_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """(1, 3, H, W) on the test device: channel 0 is each pixel's column, 1 its row, 2 random values.

    Bilinear sampling of a linear ramp returns the sampled coordinate itself,
    so a crop tells where in the image it came from.
    """
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32), indexing="ij"
    )
    noise = torch.rand(height, width, generator=torch.Generator().manual_seed(seed))
    return torch.stack([xs, ys, noise]).unsqueeze(0).to(DEVICE)


def pixel_coords(grids, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """grid_sample's normalised coordinates back to image pixels (align_corners=False): (n, out, out) each."""
    gx, gy = grids.grid[..., 0], grids.grid[..., 1]
    return (gx + 1) * width / 2 - 0.5, (gy + 1) * height / 2 - 0.5


def grids(height=40, width=56, n=8, crop=16, out=32, distortion=0.5, seed=0):
    return random_crop_grids(height, width, n, crop, out, distortion, torch.Generator().manual_seed(seed), DEVICE)


@pytest.mark.parametrize("crop,out", [(16, 32), (24, 32), (32, 16)])
def test_without_distortion_a_crop_is_a_bilinear_resize_of_its_window(crop, out):
    height, width = 40, 56
    image = coordinate_image(height, width)
    g = grids(height, width, n=6, crop=crop, out=out, distortion=0.0)
    assert torch.equal(g.mask.cpu(), torch.ones(6, 1, out, out))
    patches = sample_crops(image, g)
    assert patches.shape == (6, 3, out, out)
    mid = out // 2
    t_mid = (mid + 0.5) * crop / out - 0.5  # output pixel centre in crop pixels
    for k in range(6):
        left = round(patches[k, 0, mid, mid].item() - t_mid)
        top = round(patches[k, 1, mid, mid].item() - t_mid)
        assert 0 <= left <= width - crop and 0 <= top <= height - crop
        window = image[..., top : top + crop, left : left + crop]
        expected = F.interpolate(window, size=(out, out), mode="bilinear", align_corners=False)[0]
        # away from the borders, where the resize clamps at the window's edge and
        # sampling the image reads the neighbouring pixels
        torch.testing.assert_close(patches[k, :, 1:-1, 1:-1], expected[:, 1:-1, 1:-1], atol=1e-4, rtol=0)


def test_masks_are_full_without_distortion_and_have_holes_with_it():
    assert torch.equal(grids(distortion=0.0).mask.cpu(), torch.ones(8, 1, 32, 32))
    mask = grids(n=16, distortion=0.5).mask
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    covered = mask.mean(dim=(1, 2, 3))  # (16,)
    assert (covered < 1).all()  # every warped patch leaves some fill
    # corners move inwards by at most a quarter of the side: at least the middle half of each side remains
    assert (covered > 0.2).all()


def test_warped_patches_are_filled_with_zero_outside_the_quadrilateral():
    g = grids(n=8, distortion=0.5)
    patches = sample_crops(torch.full((1, 3, 40, 56), 0.8).to(DEVICE), g)
    hole = g.mask.expand_as(patches) == 0
    assert hole.any()
    assert (patches[hole] == 0).all()
    assert (patches[~hole] > 0).all()


@pytest.mark.parametrize("distortion", [0.0, 0.5, 1.0])
def test_crops_never_sample_outside_their_crop_window(distortion):
    height, width, crop = 30, 44, 16
    g = grids(height, width, n=32, crop=crop, out=24, distortion=distortion, seed=3)
    px, py = pixel_coords(g, height, width)
    used = g.mask[:, 0] > 0  # (n, out, out)
    for k in range(32):
        xs, ys = px[k][used[k]], py[k][used[k]]
        # inside the image, and within one crop-sized window (pixel edges at +-0.5)
        assert xs.min() >= -0.5 - 1e-4 and xs.max() <= width - 0.5 + 1e-4
        assert ys.min() >= -0.5 - 1e-4 and ys.max() <= height - 0.5 + 1e-4
        assert xs.max() - xs.min() <= crop + 1e-3
        assert ys.max() - ys.min() <= crop + 1e-3
        if distortion <= 0.5:  # (at 1, corners may meet in the centre and the quadrilateral degenerates)
            # the warp shrinks the whole crop into the quadrilateral: all of the window is seen
            assert xs.max() - xs.min() >= 0.8 * crop
            assert ys.max() - ys.min() >= 0.8 * crop


def test_crop_positions_cover_the_whole_image():
    height, width, crop, out = 20, 26, 16, 4
    g = grids(height, width, n=300, crop=crop, out=out, distortion=0.0, seed=5)
    px, py = pixel_coords(g, height, width)
    t0 = 0.5 * crop / out - 0.5
    left = (px[:, 0, 0] - t0).round().long()
    top = (py[:, 0, 0] - t0).round().long()
    assert set(left.tolist()) == set(range(width - crop + 1))
    assert set(top.tolist()) == set(range(height - crop + 1))


def test_a_crop_larger_than_the_image_is_the_whole_image():
    g = grids(20, 30, n=3, crop=64, out=16, distortion=0.0)
    px, py = pixel_coords(g, 20, 30)
    assert px.min() >= -0.5 and px.max() <= 29.5 and py.min() >= -0.5 and py.max() <= 19.5
    # the window is the largest square that fits: 20 pixels
    assert (px.amax(dim=(1, 2)) - px.amin(dim=(1, 2)) > 18).all()


def test_same_generator_seed_gives_the_same_grids():
    a, b, c = grids(seed=11), grids(seed=11), grids(seed=12)
    assert torch.equal(a.grid, b.grid) and torch.equal(a.mask, b.mask)
    assert not torch.equal(a.grid, c.grid)


def test_zero_crops_and_slices():
    g = grids(n=0)
    assert len(g) == 0
    assert sample_crops(torch.rand(1, 3, 40, 56).to(DEVICE), g).shape == (0, 3, 32, 32)
    g = grids(n=5)
    part = g.slice(1, 3)
    assert len(part) == 2 and torch.equal(part.grid, g.grid[1:3])
    image = torch.rand(1, 3, 40, 56).to(DEVICE)
    torch.testing.assert_close(sample_crops(image, part), sample_crops(image, g)[1:3])


def test_gradients_reach_only_the_sampled_pixels():
    height, width = 40, 56
    image = torch.rand(1, 3, height, width).to(DEVICE).requires_grad_()
    g = grids(height, width, n=1, crop=16, out=16, distortion=0.0, seed=2)
    sample_crops(image, g).sum().backward()
    # a crop of 16 resized to 16 reads each pixel of its window once (up to rounding of the grid)
    touched = image.grad[0, 0] > 1e-3
    rows, cols = touched.nonzero(as_tuple=True)
    assert touched.sum() == 16 * 16
    assert rows.max() - rows.min() == 15 and cols.max() - cols.min() == 15
    torch.testing.assert_close(image.grad[0, 0][touched].cpu(), torch.ones(256), atol=1e-3, rtol=0)
    assert image.grad[0, 0][~touched].abs().max() < 1e-3
