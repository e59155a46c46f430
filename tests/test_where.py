"""--where (issue 12): a mask from CLIP itself, checked on a hand-made CLIP whose answer is known.

tests/planted.py builds a real open_clip ViT with hand-set weights whose patch
tokens carry their patch's colour and whose last block swamps them with the
whole image's colour, as real CLIP's are swamped. The phrase "red" must find
the red region of a test picture (IoU >= 0.8); the same code with a flipped
sign, or with the last block left as CLIP has it, must not.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from clipstyle import images as io
from clipstyle.config import WhereSettings
from clipstyle.regions import where as W
from clipstyle.regions.guided import guided_upsample
from planted import PlantedClip, iou, scene

from conftest import DEVICE, invoke, tiny_vgg


@pytest.fixture(scope="module")
def clip():
    return PlantedClip().to(DEVICE)


@pytest.mark.device
def test_red_finds_the_red_region(clip):
    image, truth = scene()
    mask = W.where_mask(clip, image, "red")
    assert mask.shape == (1, 1, *truth.shape)
    assert iou(mask, truth) >= 0.8, iou(mask, truth)
    assert iou(W.where_mask(clip, image, "blue"), truth) < 0.2  # another phrase, another region


def _flipped(real):
    return lambda *args, **kwargs: -real(*args, **kwargs)


@pytest.mark.device
@pytest.mark.parametrize("breakage", ["flipped-sign", "unchanged-last-block", "phrase-not-first"])
def test_broken_mask_code_fails(clip, monkeypatch, breakage):
    image, truth = scene()
    settings = WhereSettings()
    if breakage == "flipped-sign":
        monkeypatch.setattr(W, "dense_embeddings", _flipped(W.dense_embeddings))
    elif breakage == "unchanged-last-block":  # CLIP's own patch tokens: swamped by the whole image
        settings = WhereSettings(method="vanilla")
    else:  # the probability read from a background phrase's column instead of the phrase's
        real = W.phrase_embeddings
        monkeypatch.setattr(W, "phrase_embeddings", lambda *a, **k: real(*a, **k).flip(0))
        W._TEXT_CACHE.clear()
    try:
        # an error here is a real one and is reported as it is (a mask that selects nothing
        # raises nothing: its IoU is 0)
        found = W.where_mask(clip, image, "red", settings)
    finally:
        W._TEXT_CACHE.clear()
    assert iou(found, truth) < 0.5, iou(found, truth)


@pytest.mark.device
def test_maskclip_also_finds_it_and_windows_sharpen_the_map(clip):
    image, truth = scene()
    image = image.to(DEVICE)
    text = W.phrase_embeddings(clip, "red")
    maskclip = W.relevance(clip, image, text, WhereSettings(method="maskclip")).cpu()
    one = W.relevance(clip, image, text, WhereSettings(windows=1, stride=1.0)).cpu()
    three = W.relevance(clip, image, text, WhereSettings()).cpu()
    assert iou(maskclip, truth) >= 0.7
    assert iou(three, truth) > iou(one, truth)


def test_guided_upsampling_follows_the_photos_edge():
    """A mask known only at 1/4 of the photo's size, whose edge falls inside a cell:
    upsampled with the photo as guide, the edge is sharp and where the photo's is;
    upsampled plainly, it is a ramp several pixels wide."""
    h, w = 32, 64
    photo = torch.full((1, 1, h, w), 0.2)
    photo[..., 37:] = 0.8  # the edge, between columns 36 and 37 (inside the cell of columns 36..39)
    truth = (photo > 0.5).float()
    coarse = torch.nn.functional.avg_pool2d(truth, 4)  # the right mask at 1/4 size: 0, ..., 0.75, 1, ...
    small = torch.nn.functional.avg_pool2d(photo, 4)
    up = guided_upsample(coarse, small, photo, radius=2, eps=1e-3)[0, 0, h // 2]
    assert float(up[:37].max()) < 0.1 and float(up[37:].min()) > 0.9, up
    plain = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0, 0, h // 2]
    assert int(((plain > 0.1) & (plain < 0.9)).sum()) >= 3  # the plain ramp


def test_window_starts_cover_the_image():
    for length, side in [(100, 40), (512, 192), (40, 40), (30, 40)]:
        starts = W.window_starts(length, side, 0.5)
        assert starts[0] == 0 and min(starts[-1] + side, length) >= min(length, side) and starts[-1] + side >= length
        assert all(b - a <= 0.5 * side + 1 for a, b in itertools.pairwise(starts))


def test_a_model_without_patch_tokens_is_refused():
    class NotAViT:
        model = object()

    with pytest.raises(W.WhereError, match="vision-transformer"):
        W.dense_embeddings(NotAViT(), torch.zeros(1, 3, 16, 16))


# --- the commands ------------------------------------------------------------------------------------------


@pytest.fixture
def red_photo(tmp_path):
    image, truth = scene()
    io.to_pil(image).save(tmp_path / "scene.png")
    return tmp_path / "scene.png", truth


def _planted_clip_for_where(monkeypatch):
    planted = PlantedClip()
    monkeypatch.setattr(
        "clipstyle.cli.mask.load_where_clip",
        lambda region, *args: planted if region is not None and region.where else None,
    )


def test_mask_command_writes_a_greyscale_png_at_the_photos_size(red_photo, tmp_path, monkeypatch):
    _planted_clip_for_where(monkeypatch)
    path, truth = red_photo
    out = tmp_path / "red.png"
    r = invoke("mask", "--where", "red", path, "-o", out, "-q")
    assert r.exit_code == 0, r.output
    written = Image.open(out)
    assert written.mode == "L" and written.size == (truth.shape[1], truth.shape[0])
    assert iou(torch.from_numpy(np.asarray(written, np.float32) / 255), truth) >= 0.8
    assert json.loads(written.text["clipstyle"])["region"]["where"] == "red"
    first = out.read_bytes()
    assert invoke("mask", "--where", "red", path, "-o", out, "-q", "--overwrite").exit_code == 0
    assert out.read_bytes() == first  # deterministic


def test_run_where_keeps_the_photo_outside_the_phrase(red_photo, tmp_path, monkeypatch):
    from clipstyle.models.encoders import Models

    monkeypatch.setattr(
        "clipstyle.jobs.plan.load_models",
        lambda *a, **k: Models(PlantedClip(), tiny_vgg(), {"clip_model": "planted"}),
    )
    path, truth = red_photo
    out = tmp_path / "out.png"
    r = invoke(
        "run",
        "-p",
        "blue",
        path,
        "-o",
        out,
        "--size",
        "96",
        "--steps",
        "2",
        "--crops",
        "2",
        "--crop-size",
        "16",
        "--no-templates",
        "-q",
        "--where",
        "red",
        "--feather",
        "0",
    )
    assert r.exit_code == 0, r.output
    result = np.asarray(Image.open(out), np.int16)
    photo = np.asarray(Image.open(path), np.int16)
    far = ~torch.nn.functional.max_pool2d(truth.float()[None, None], 9, stride=1, padding=4)[0, 0].bool().numpy()
    assert np.abs(result - photo).max(axis=-1)[far].max() <= 1  # away from the red region: the photo
    assert np.abs(result - photo).max(axis=-1)[truth.numpy()].mean() > 5  # in it: restyled
    assert json.loads(Image.open(out).text["clipstyle"])["region"]["where"] == "red"


def test_apply_where(red_photo, tmp_path, monkeypatch):
    from clipstyle.method.unet import StyleNet
    from clipstyle.styles.stylefile import save_style

    _planted_clip_for_where(monkeypatch)
    torch.manual_seed(0)
    save_style(tmp_path / "s.style", StyleNet(), {"prompt": "fire"})
    path, truth = red_photo
    out = tmp_path / "a.png"
    r = invoke(
        "apply",
        tmp_path / "s.style",
        path,
        "-o",
        out,
        "-q",
        "--where",
        "red",
        "--invert-mask",
        "--feather",
        "0",
        "--report",
        tmp_path / "r.jsonl",
    )
    assert r.exit_code == 0, r.output
    result, photo = np.asarray(Image.open(out), np.int16), np.asarray(Image.open(path), np.int16)
    inside = torch.nn.functional.avg_pool2d(truth.float()[None, None], 9, stride=1, padding=4)[0, 0].numpy() == 1
    assert np.abs(result - photo).max(axis=-1)[inside].max() <= 1  # inverted: the red region keeps the photo
    record = json.loads((tmp_path / "r.jsonl").read_text())
    assert record["region"]["where"] == "red" and record["region"]["invert"] is True


# --- mask: empty selections, shared weight options, existing outputs (issue 26) ----------------------------


def _nothing_found(monkeypatch):
    """A --where that selects nothing in any photo."""
    monkeypatch.setattr("clipstyle.cli.mask.load_where_clip", lambda region, *args: object())
    monkeypatch.setattr(
        "clipstyle.regions.masks.where_mask", lambda clip, photo, *a, **k: torch.zeros_like(photo[:, :1])
    )


@pytest.mark.parametrize("invert, value", [(False, 0), (True, 255)], ids=["plain", "inverted"])
def test_mask_of_a_phrase_that_selects_nothing_is_written_with_a_warning(
    red_photo, tmp_path, monkeypatch, invert, value
):
    _nothing_found(monkeypatch)
    path, truth = red_photo
    out = tmp_path / "m.png"
    r = invoke("mask", "--where", "a unicorn", path, "-o", out, *(["--invert-mask"] if invert else []))
    assert r.exit_code == 0, r.output
    assert "clipstyle: warning:" in r.output and "selects nothing" in r.output, r.output
    assert Image.open(out).getextrema() == (value, value)


def test_mask_accepts_and_ignores_the_vgg_weights_option(red_photo, tmp_path, monkeypatch):
    _planted_clip_for_where(monkeypatch)
    path, _ = red_photo
    r = invoke("mask", "--where", "red", path, "-o", tmp_path / "m.png", "-q", "--vgg-weights", tmp_path / "none.pth")
    assert r.exit_code == 0, r.output
    assert "--vgg-weights" in invoke("mask", "--help").output


def test_mask_skips_only_the_same_mask_and_refuses_any_other_file(red_photo, tmp_path, monkeypatch):
    _planted_clip_for_where(monkeypatch)
    path, _ = red_photo
    out = tmp_path / "m.png"
    assert invoke("mask", "--where", "red", path, "-o", out, "-q").exit_code == 0
    made = out.read_bytes()
    again = invoke("mask", "--where", "red", path, "-o", out)
    assert again.exit_code == 0 and "skipped" in again.output, again.output
    other = invoke("mask", "--where", "green", path, "-o", out)  # another mask there
    assert other.exit_code == 1 and "made with other settings (region)" in other.output, other.output
    assert out.read_bytes() == made
    styled = tmp_path / "styled.png"  # a stylized output there: its record has a prompt
    from clipstyle.provenance import stamp

    Image.new("RGB", (8, 8)).save(styled, pnginfo=_png_info(stamp(prompt="fire", input=path.name, region={})))
    before = styled.read_bytes()
    refused = invoke("mask", "--where", "red", path, "-o", styled)
    assert refused.exit_code == 1 and "not a mask" in refused.output, refused.output
    assert styled.read_bytes() == before
    assert invoke("mask", "--where", "red", path, "-o", styled, "-q", "--overwrite").exit_code == 0
    assert Image.open(styled).mode == "L"


def _png_info(meta: dict):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in meta.items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    return info
