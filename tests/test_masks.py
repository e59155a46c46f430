"""Region control (issue 12): mask files, feathering, compositing, colour preservation, the loop's crops."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from clipstyle import images as io
from clipstyle.errors import MaskError
from clipstyle.method.masked import composite, crop_sampler
from clipstyle.regions import masks as M
from clipstyle.regions.colour import luma, preserve_colour, rgb_to_ycbcr
from clipstyle.regions.region import Region

from conftest import DEVICE, TINY_32, counting_loader, invoke


def half(width: int, height: int, left: int = 255, right: int = 0) -> np.ndarray:
    a = np.full((height, width), right, dtype=np.uint8)
    a[:, : width // 2] = left
    return a


# --- reading mask files in every mode ----------------------------------------------------------------------


def _expected_half(t: torch.Tensor, hi: float = 1.0) -> None:
    w = t.shape[-1]
    assert torch.allclose(t[:, : w // 2], torch.full_like(t[:, : w // 2], hi), atol=1 / 255)
    assert torch.allclose(t[:, w // 2 :], torch.zeros_like(t[:, w // 2 :]), atol=1 / 255)


@pytest.mark.parametrize("mode", ["L", "1", "P", "RGB", "CMYK", "I;16", "I", "F"])
def test_every_mode_reads_as_the_same_mask(tmp_path, mode):
    base = Image.fromarray(half(20, 10))
    if mode == "I;16":
        img = Image.fromarray(half(20, 10).astype(np.uint16) * 257)  # 16-bit greyscale
    elif mode == "I":
        img = Image.fromarray(half(20, 10).astype(np.int32) * 257)
    elif mode == "F":
        img = Image.fromarray(half(20, 10).astype(np.float32) / 255)
    else:
        img = base.convert(mode)
    path = tmp_path / ("m.tif" if mode in ("F", "I", "CMYK") else "m.png")
    img.save(path)
    _expected_half(M.read_mask(path))


def test_colour_masks_are_converted_to_luminance(tmp_path):
    a = np.zeros((8, 8, 3), dtype=np.uint8)
    a[..., 1] = 200  # pure green: luminance 0.587 * 200
    Image.fromarray(a).save(tmp_path / "g.png")
    assert torch.allclose(M.read_mask(tmp_path / "g.png"), torch.full((8, 8), round(0.587 * 200) / 255), atol=1 / 255)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_an_alpha_channel_is_the_mask(tmp_path, mode):
    rgba = np.zeros((10, 20, 4), dtype=np.uint8)
    rgba[..., :3] = 255  # white everywhere: luminance would select everything
    rgba[..., 3] = half(20, 10)
    img = Image.fromarray(rgba, "RGBA")
    img = img.convert(mode)
    img.save(tmp_path / "a.png")
    _expected_half(M.read_mask(tmp_path / "a.png"))


def test_a_fully_opaque_alpha_channel_is_ignored(tmp_path):
    rgba = np.stack([half(20, 10)] * 3 + [np.full((10, 20), 255, np.uint8)], axis=-1)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "o.png")
    _expected_half(M.read_mask(tmp_path / "o.png"))  # editors export masks this way


def test_palette_transparency_is_the_mask(tmp_path):
    img = Image.new("P", (20, 10), 1)
    img.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    img.paste(0, (10, 0, 20, 10))
    img.info["transparency"] = 0
    img.save(tmp_path / "t.png", transparency=0)
    _expected_half(M.read_mask(tmp_path / "t.png"))


def test_exif_orientation_is_applied(tmp_path):
    img = Image.fromarray(half(20, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: viewers turn it 90 degrees clockwise
    img.save(tmp_path / "r.jpg", exif=exif, quality=100)
    assert tuple(M.read_mask(tmp_path / "r.jpg").shape) == (20, 10)


# --- resize and refusals -----------------------------------------------------------------------------------


def test_resized_to_the_photo_and_aspect_checked():
    mask = torch.from_numpy(half(200, 100)).float() / 255
    fitted = M.fit_mask(mask, 40, 20)
    assert fitted.shape == (1, 1, 20, 40)
    assert fitted[..., :19].min() == 1 and fitted[..., 21:].max() == 0  # the edge columns blend
    M.fit_mask(torch.ones(100, 203), 40, 20)  # 1.5 % off: accepted
    with pytest.raises(MaskError, match=r"200x100 .* 40x21"):
        M.fit_mask(mask, 40, 21, "m.png")  # 5 % off


@pytest.mark.parametrize(
    "content,reason",
    [(None, "mask file not found"), (b"", "empty mask file"), (b"not an image at all", "not an image")],
)
def test_missing_empty_and_unreadable_mask_files_are_refused(tmp_path, content, reason):
    path = tmp_path / "m.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(MaskError, match=reason) as info:
        Region(mask=path).check()
    assert str(path) in str(info.value)


def test_a_mask_that_selects_nothing_is_an_error(tmp_path):
    photo = Image.new("RGB", (20, 10))
    Image.new("L", (20, 10), 0).save(tmp_path / "black.png")
    Image.new("L", (20, 10), 255).save(tmp_path / "white.png")
    with pytest.raises(MaskError, match="selects nothing"):
        M.photo_mask(Region(mask=tmp_path / "black.png"), photo)
    with pytest.raises(MaskError, match="after --invert-mask"):
        M.photo_mask(Region(mask=tmp_path / "white.png", invert=True), photo)
    assert float(M.photo_mask(Region(mask=tmp_path / "black.png", invert=True), photo).min()) == 1.0


def test_where_is_refused_empty_and_invert_needs_a_mask():
    with pytest.raises(MaskError, match="empty"):
        Region(where="  ").check()
    with pytest.raises(MaskError, match="needs --mask or --where"):
        Region(invert=True, preserve_colour=True).check()


def test_mask_and_where_combine_as_their_product(tmp_path, monkeypatch):
    photo = Image.new("RGB", (20, 10))
    Image.fromarray(half(20, 10)).save(tmp_path / "m.png")
    top = torch.zeros(1, 1, 10, 20)
    top[..., :5, :] = 1
    monkeypatch.setattr(M, "where_mask", lambda *args, **kwargs: top)
    both = M.photo_mask(Region(mask=tmp_path / "m.png", where="x"), photo, clip=object())
    assert both[0, 0, :5, :10].min() == 1 and both[0, 0, 5:].max() == 0 and both[0, 0, :, 10:].max() == 0
    inverted = M.photo_mask(Region(mask=tmp_path / "m.png", where="x", invert=True), photo, clip=object())
    assert torch.equal(inverted, 1 - both)


# --- feather and composite ---------------------------------------------------------------------------------


def test_feather_softens_only_near_the_edge():
    mask = torch.zeros(1, 1, 8, 40)
    mask[..., :20] = 1
    soft = M.feather(mask, 6)  # radius 3
    assert torch.equal(soft[..., :17], mask[..., :17]) and torch.equal(soft[..., 23:], mask[..., 23:])
    row = soft[0, 0, 4]
    assert ((row[16:24] > 0) & (row[16:24] < 1)).sum() >= 5  # a ramp, not a step
    assert bool((row[1:] <= row[:-1]).all())  # monotone
    assert torch.equal(M.feather(mask, 0), mask)


def test_composite_is_exact_at_both_ends():
    styled, photo = torch.rand(1, 3, 6, 6), torch.rand(1, 3, 6, 6)
    m = torch.zeros(1, 1, 6, 6)
    m[..., :3] = 1
    out = composite(styled, photo, m)
    assert torch.equal(out[..., :3], styled[..., :3]) and torch.equal(out[..., 3:], photo[..., 3:])


# --- colour preservation -----------------------------------------------------------------------------------


def test_preserve_colour_keeps_chroma_and_takes_luminance():
    g = torch.Generator().manual_seed(0)
    photo = 0.3 + 0.4 * torch.rand(1, 3, 16, 16, generator=g)  # moderate colours: in gamut
    styled = torch.rand(1, 3, 16, 16, generator=g) * 0.3 + 0.35
    out = preserve_colour(styled, photo)
    yo, yp = rgb_to_ycbcr(out), rgb_to_ycbcr(photo)
    assert torch.allclose(yo[:, 1:], yp[:, 1:], atol=1e-5)  # Cb, Cr: the photo's
    assert torch.allclose(yo[:, :1], luma(styled), atol=1e-5)  # Y: the styled image's
    assert float((yo[:, 0] - yp[:, 0]).abs().mean()) > 0.05


def test_out_of_gamut_keeps_luminance_and_hue():
    photo = torch.tensor([0.9, 0.1, 0.1]).view(1, 3, 1, 1)  # saturated red
    styled = torch.full((1, 3, 1, 1), 0.95)  # very bright
    out = preserve_colour(styled, photo)
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    assert torch.allclose(luma(out), luma(styled), atol=1e-6)
    offset_out, offset_photo = out - luma(out), photo - luma(photo)
    assert torch.allclose(
        torch.nn.functional.normalize(offset_out.flatten(), dim=0),
        torch.nn.functional.normalize(offset_photo.flatten(), dim=0),
        atol=1e-5,
    )


def test_ycbcr_is_jpegs():
    rgb = np.random.default_rng(0).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    ours = rgb_to_ycbcr(torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255)[0].permute(1, 2, 0) * 255
    pillow = np.asarray(Image.fromarray(rgb).convert("YCbCr"), dtype=np.float32)
    assert np.abs(ours.numpy() - pillow).max() <= 1.0


# --- the loop: crops and the global view -------------------------------------------------------------------


def test_crops_are_drawn_where_the_mask_is():
    mask = torch.zeros(1, 1, 64, 96)
    mask[..., :, :40] = 1  # left strip
    draw = crop_sampler(mask, 32)(64, 96, 500, 32, 0.5, torch.Generator().manual_seed(0))
    left = draw.offset[:, 0]
    assert int(left.max()) < 40  # every crop covers some of the region
    # crops wholly inside are drawn far more often than uniformly (9 of 65 positions)
    assert float((left + 32 <= 40).float().mean()) > 2 * 9 / 65
    assert draw.hom.shape == (500, 3, 3)


@pytest.mark.device
def test_clip_sees_the_photo_outside_the_mask(models, tiny_settings, monkeypatch):
    """The global row CLIP encodes is the output composited over the photo: outside the
    region it equals the photo. With the composite removed (p.seen = leaf) it does not."""
    from clipstyle.method import loop as S

    seen = []
    encode = models.clip.encode_image

    def spy(images):
        if images.requires_grad:
            seen.append(images.detach().clone())
        return encode(images)

    monkeypatch.setattr(models.clip, "encode_image", spy)
    content = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    mask = torch.zeros(1, 1, 32, 32, device=DEVICE)
    mask[..., :16] = 1
    S.stylize_many([content], ["fire"], [0], models=models, settings=tiny_settings.replace(steps=1), masks=[mask])
    first = seen[0][0]  # row 0: the global view (resized to CLIP's 32 px: the same size here)
    assert torch.allclose(first[..., 20:], content[0, ..., 20:], atol=1e-6)
    assert not torch.allclose(first[..., :12], content[0, ..., :12], atol=1e-3)


@pytest.mark.device
def test_no_mask_gives_the_same_result_as_before(models, tiny_settings):
    from clipstyle.method.loop import stylize_many

    content = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    a = stylize_many([content], ["fire"], [3], models=models, settings=tiny_settings)[0].tensor
    b = stylize_many([content], ["fire"], [3], models=models, settings=tiny_settings, masks=[None])[0].tensor
    assert torch.equal(a, b)


# --- the commands ------------------------------------------------------------------------------------------


@pytest.fixture
def scene(tmp_path):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(40, 220, (32, 48, 3), dtype=np.uint8))
    img.save(tmp_path / "photo.png")
    Image.fromarray(half(96, 64)).save(tmp_path / "half.png")  # twice the photo's size: resized
    return tmp_path


def test_run_with_a_hard_half_mask_composites_exactly(scene, monkeypatch):
    from clipstyle.styles.rendering import render
    from clipstyle.styles.stylefile import load_style

    counting_loader(monkeypatch)
    out, style = scene / "out.png", scene / "s.style"
    r = invoke(
        "run",
        "-p",
        "fire",
        scene / "photo.png",
        "-o",
        out,
        *TINY_32,
        "--mask",
        scene / "half.png",
        "--feather",
        "0",
        "--save-style",
        style,
        "--report",
        scene / "r.jsonl",
    )
    assert r.exit_code == 0, r.output
    result = np.asarray(Image.open(out), dtype=np.int16)
    photo = Image.open(scene / "photo.png")
    resized = io.to_tensor(photo, io.fit_size(*photo.size, 32))
    expected_photo = np.asarray(io.to_pil(resized), dtype=np.int16)
    w = result.shape[1]
    # outside: the photo (the column at the edge is mixed by resizing the mask)
    assert np.abs(result[:, w // 2 + 1 :] - expected_photo[:, w // 2 + 1 :]).max() <= 1
    styled = np.asarray(io.to_pil(render(load_style(style).network, resized)), dtype=np.int16)
    assert np.abs(result[:, : w // 2 - 1] - styled[:, : w // 2 - 1]).max() <= 1  # inside: the stylized image
    assert np.abs(styled[:, w // 2 :] - expected_photo[:, w // 2 :]).max() > 5  # and the two differ

    region = json.loads(Image.open(out).text["clipstyle"])["region"]
    assert region["mask"] == "half.png" and len(region["mask_sha256"]) == 64
    assert region["feather"] == 0 and region["invert"] is False and region["preserve_color"] is False
    assert json.loads((scene / "r.jsonl").read_text())["region"] == region
    assert load_style(style).metadata["region"] == region


def test_run_with_full_output_size_composites_at_full_resolution(scene, monkeypatch):
    counting_loader(monkeypatch)
    out = scene / "full.png"
    r = invoke(
        "run",
        "-p",
        "fire",
        scene / "photo.png",
        "-o",
        out,
        *TINY_32,
        "--mask",
        scene / "half.png",
        "--output-size",
        "full",
        "--contrast",
    )
    assert r.exit_code == 0, r.output
    result = np.asarray(Image.open(out), dtype=np.int16)
    photo = np.asarray(Image.open(scene / "photo.png"), dtype=np.int16)
    assert result.shape == photo.shape
    assert np.abs(result[:, 24 + 3 :] - photo[:, 24 + 3 :]).max() <= 1  # beyond the feather: the photo


@pytest.mark.parametrize(
    "args,reason",
    [
        (["--mask", "{d}/none.png"], "mask file not found"),
        (["--mask", "{d}/black.png"], "selects nothing"),
        (["--mask", "{d}/wide.png"], "aspect ratios differ"),
        (["--where", " "], "phrase is empty"),
        (["--invert-mask"], "needs --mask or --where"),
    ],
)
def test_bad_masks_are_one_line_and_write_nothing(scene, monkeypatch, args, reason):
    counting_loader(monkeypatch)
    Image.new("L", (48, 32), 0).save(scene / "black.png")
    Image.new("L", (64, 32), 255).save(scene / "wide.png")
    out = scene / "o" / "x.png"
    r = invoke("run", "-p", "fire", scene / "photo.png", "-o", out, *TINY_32, *[a.format(d=scene) for a in args])
    assert r.exit_code != 0
    lines = [ln for ln in r.output.splitlines() if ln.startswith("clipstyle: error")]
    assert len(lines) == 1 and reason in lines[0], r.output
    assert "Traceback" not in r.output and not out.exists()


def test_apply_with_a_mask_and_preserved_colour(scene, monkeypatch):
    from clipstyle.method.unet import StyleNet
    from clipstyle.styles.stylefile import save_style

    torch.manual_seed(0)
    save_style(scene / "s.style", StyleNet(), {"prompt": "fire"})
    out = scene / "a.png"
    # moderate colours, so that the style's luminance keeps them in gamut (test_out_of_gamut... for the rest)
    moderate = np.random.default_rng(1).integers(90, 170, (32, 48, 3), dtype=np.uint8)
    Image.fromarray(moderate).save(scene / "moderate.png")
    r = invoke(
        "apply",
        scene / "s.style",
        scene / "moderate.png",
        "-o",
        out,
        "-q",
        "--mask",
        scene / "half.png",
        "--feather",
        "0",
        "--preserve-color",
    )
    assert r.exit_code == 0, r.output
    result, photo = Image.open(out), Image.open(scene / "moderate.png")
    a, p = np.asarray(result, dtype=np.int16), np.asarray(photo, dtype=np.int16)
    assert np.abs(a[:, 25:] - p[:, 25:]).max() <= 1
    ya, yp = np.asarray(result.convert("YCbCr"), np.int16), np.asarray(photo.convert("YCbCr"), np.int16)
    inside = (slice(None), slice(0, 23))
    assert np.abs(ya[inside][..., 1:] - yp[inside][..., 1:]).max() <= 3  # Cb, Cr: the photo's
    assert np.abs(ya[inside][..., 0] - yp[inside][..., 0]).mean() > 5  # Y: the style's
    meta = json.loads(result.text["clipstyle"])["region"]
    assert meta["preserve_color"] is True and meta["mask"] == "half.png"


@pytest.mark.device
def test_the_library_recipe_in_the_docs(scene, models, tiny_settings):
    """docs/regions.md, "Library": the same steps as the CLI, from Python."""
    from clipstyle.images import prepare_content
    from clipstyle.method.loop import stylize_many

    region = Region(mask=scene / "half.png", feather=0, preserve_colour=True)
    photo = io.open_image(scene / "photo.png").image
    full = M.photo_mask(region, photo, models.clip)
    content = prepare_content(photo, 32)
    train = M.at_size(full, *content.shape[-2:], region.feather)
    result = stylize_many([content], ["fire"], [0], models=models, settings=tiny_settings, masks=[train])[0]
    image = M.finish(result.tensor, content, region, full)
    w = image.shape[-1]
    assert torch.equal(image[..., w // 2 + 1 :], content[..., w // 2 + 1 :])
    assert not torch.equal(image[..., : w // 2 - 1], content[..., : w // 2 - 1])


def test_a_region_that_selects_nothing_names_the_photo(scene, monkeypatch):
    """--where's verdict is about the photo, not a file of its own: the line names the photo."""
    from types import SimpleNamespace

    from clipstyle.errors import ClipstyleError
    from clipstyle.jobs.batch import job_error

    job = SimpleNamespace(input=SimpleNamespace(path=scene / "photo.png"))
    assert job_error(job, ClipstyleError("--where 'x' selects nothing in this image")) == (
        f"{scene / 'photo.png'}: --where 'x' selects nothing in this image"
    )
    assert job_error(job, ClipstyleError("unreadable", scene / "m.png")) == f"{scene / 'm.png'}: unreadable"
    counting_loader(monkeypatch)
    monkeypatch.setattr(M, "where_mask", lambda *args, **kwargs: torch.zeros(1, 1, 32, 48))
    r = invoke("run", "-p", "fire", scene / "photo.png", "-o", scene / "o.png", *TINY_32, "--where", "the sky")
    lines = [ln for ln in r.output.splitlines() if ln.startswith("clipstyle: error")]
    assert r.exit_code == 1 and lines == [
        f"clipstyle: error: {scene / 'photo.png'}: --where 'the sky' selects nothing in this image"
    ], r.output


# --- hostile values (issue 26): feather, phrases -----------------------------------------------------------


@pytest.mark.parametrize("value", [1e9, 1e30, float("inf"), float("nan"), -1.0])
def test_feather_out_of_bounds_is_refused_with_one_line(scene, monkeypatch, value):
    with pytest.raises(MaskError, match="feather must be 0 to 10000 pixels"):
        Region(mask=scene / "half.png", feather=value).check()
    loads = counting_loader(monkeypatch)
    r = invoke(
        "run",
        "-p",
        "fire",
        scene / "photo.png",
        "-o",
        scene / "o.png",
        "--mask",
        scene / "half.png",
        "--feather",
        value,
    )
    assert r.exit_code == 2 and "--feather" in r.output.splitlines()[-1], r.output
    assert "Traceback" not in r.output and not loads and not (scene / "o.png").exists()


def test_feather_wider_than_the_image_is_as_wide_as_the_image():
    mask = torch.zeros(1, 1, 8, 40)
    mask[..., :20] = 1
    widest = M.feather(mask, 1e4)  # a radius of 5000 would be a 10001-wide filter: capped at the 40 px side
    assert torch.equal(widest, M.feather(mask, 80))
    assert 0 < float(widest.min()) < float(widest.max()) < 1


@pytest.mark.parametrize("phrase", ["\u200b\u200b", "\ufeff", "\u3164 \u2800"])
def test_a_where_phrase_of_invisible_characters_is_empty(phrase):
    with pytest.raises(MaskError, match="phrase is empty"):
        Region(where=phrase).check()


def test_an_overlong_where_phrase_is_cut_with_a_warning_as_prompts_are(tmp_path, monkeypatch):
    from clipstyle.regions import where as W

    from conftest import tiny_clip

    clip = tiny_clip()
    assert W.phrase_warnings(clip, "the sky") == []
    (warning,) = W.phrase_warnings(clip, "sky " * 2000)
    assert "more than CLIP's 77: the end is cut off" in warning
    monkeypatch.setattr("clipstyle.models.loading.load_clip", lambda *a, **k: clip)
    monkeypatch.setattr(M, "where_mask", lambda clip, photo, *a, **k: torch.ones_like(photo[:, :1]))
    Image.new("RGB", (24, 16)).save(tmp_path / "p.png")
    r = invoke("mask", "--where", "sky " * 2000, tmp_path / "p.png", "-o", tmp_path / "m.png", "-q")
    assert r.exit_code == 0, r.output
    assert "clipstyle: warning: the --where phrase needs" in r.output and "cut off" in r.output, r.output


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_pipe_a_device_or_a_truncated_file_as_a_mask_is_one_line(scene, monkeypatch):
    """Held when tried (issue 26's review): pinned, as a FIFO read would block for good."""
    loads = counting_loader(monkeypatch)
    os.mkfifo(scene / "fifo.png")
    good = (scene / "half.png").read_bytes()
    (scene / "cut.png").write_bytes(good[: len(good) // 2])
    for mask, reason in [
        (scene / "fifo.png", "not a file"),
        ("/dev/zero", "not a file"),
        (scene / "cut.png", "truncated"),
    ]:
        if not os.path.exists(mask):
            continue
        r = invoke("run", "-p", "fire", scene / "photo.png", "-o", scene / "o.png", *TINY_32, "--mask", mask)
        lines = [ln for ln in r.output.splitlines() if ln.startswith("clipstyle: error")]
        assert r.exit_code == 1 and len(lines) == 1 and reason in lines[0], r.output
    assert loads == [] and not (scene / "o.png").exists()
