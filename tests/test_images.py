"""Image input and output (issue 5): every mode, orientation, frames, refusals,
safe names and atomic writes. Images are made here, never stored."""

from __future__ import annotations

import errno
import io
import struct
import subprocess
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from clipstyle.config import MAX_PIXELS as DEFAULT_MAX_PIXELS
from clipstyle.errors import ImageError, OutputError
from clipstyle.images import _to_rgb, fit_size, open_image, png_metadata, save_png, slugify, write_atomic


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def raw_png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes | None = None) -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit RGB, nor lie about its size)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    body = _png_chunk(b"IHDR", ihdr)
    if rows is not None:
        body += _png_chunk(b"IDAT", zlib.compress(rows))
    return b"\x89PNG\r\n\x1a\n" + body + _png_chunk(b"IEND", b"")


def load(tmp_path, img: Image.Image, name: str, **save_args) -> Image.Image:
    path = tmp_path / name
    img.save(path, **save_args)
    loaded = open_image(path)
    assert loaded.image.mode == "RGB" and loaded.notes == []
    return loaded.image


def one_line_error(excinfo, path, *words):
    message = str(excinfo.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    for word in words:
        assert word in message, message
    return message


# --- modes ----------------------------------------------------------------------------------------------


def test_greyscale_and_bilevel_become_grey_rgb(tmp_path):
    assert load(tmp_path, Image.new("L", (4, 3), 77), "l.png").getpixel((1, 1)) == (77, 77, 77)
    assert load(tmp_path, Image.new("1", (4, 3), 1), "one.png").getpixel((0, 0)) == (255, 255, 255)


def test_alpha_is_composited_over_white(tmp_path):
    rgba = Image.new("RGBA", (4, 3), (200, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black -> white
    rgba.putpixel((1, 0), (0, 0, 0, 128))  # half transparent black -> mid grey
    out = load(tmp_path, rgba, "rgba.png")
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert all(abs(c - 127) <= 1 for c in out.getpixel((1, 0)))
    assert out.getpixel((2, 2)) == (200, 0, 0)
    assert load(tmp_path, Image.new("LA", (4, 3), (0, 0)), "la.png").getpixel((0, 0)) == (255, 255, 255)
    lossless = load(tmp_path, rgba, "rgba.webp", lossless=True)
    assert lossless.getpixel((0, 0)) == (255, 255, 255) and lossless.getpixel((2, 2)) == (200, 0, 0)


def test_palette_and_single_colour_transparency_over_white(tmp_path):
    pal = Image.new("P", (4, 3), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255])
    pal.putpixel((0, 0), 2)
    out = load(tmp_path, pal, "p.png", transparency=1)  # red is the transparent index
    assert out.getpixel((1, 1)) == (255, 255, 255) and out.getpixel((0, 0)) == (0, 0, 255)
    assert load(tmp_path, pal, "p.gif", transparency=1).getpixel((1, 1)) == (255, 255, 255)
    # tRNS on greyscale and RGB PNGs: one colour is transparent
    assert load(tmp_path, Image.new("L", (4, 3), 7), "lt.png", transparency=7).getpixel((0, 0)) == (255, 255, 255)
    rgb = Image.new("RGB", (4, 3), (1, 2, 3))
    assert load(tmp_path, rgb, "rgbt.png", transparency=(1, 2, 3)).getpixel((0, 0)) == (255, 255, 255)
    assert load(tmp_path, rgb, "rgbo.png", transparency=(9, 9, 9)).getpixel((0, 0)) == (1, 2, 3)


def test_in_memory_alpha_modes_pa_la_rgba_premultiplied():
    pa = Image.new("PA", (2, 1))
    pa.putpalette([10, 20, 30] * 256)
    pa.putpixel((0, 0), (0, 0))
    pa.putpixel((1, 0), (0, 255))
    assert np.asarray(_to_rgb(pa)).tolist() == [[[255, 255, 255], [10, 20, 30]]]
    premultiplied = Image.new("RGBA", (1, 1), (100, 50, 0, 255)).convert("RGBa")
    assert _to_rgb(premultiplied).getpixel((0, 0)) == (100, 50, 0)


def test_cmyk_jpeg_and_tiff(tmp_path):
    cyan = Image.new("CMYK", (8, 8), (255, 0, 0, 0))
    for name in ("c.jpg", "c.tif"):
        r, g, b = load(tmp_path, cyan, name).getpixel((4, 4))
        assert r < 20 and g > 235 and b > 235, (name, r, g, b)


def test_sixteen_bit_grey_png_scaled_from_0_65535(tmp_path):
    a = np.array([[0, 32768, 65535, 257]], dtype=np.uint16)
    out = load(tmp_path, Image.fromarray(a), "g16.png")
    assert np.asarray(out)[0, :, 0].tolist() == [0, 128, 255, 1]


def test_dark_sixteen_bit_pgm_stays_dark(tmp_path):
    # values <= 255 of 65535 are nearly black, not a full-range 8-bit image
    path = tmp_path / "dark.pgm"
    path.write_bytes(b"P5 2 1 65535\n" + struct.pack(">HH", 0, 255))
    out = open_image(path).image
    assert out.getpixel((1, 0)) == (1, 1, 1)


def test_sixteen_bit_rgb_png(tmp_path):
    row = b"\x00" + struct.pack(">6H", 65535, 0, 32768, 0, 65535, 0)  # filter byte, 2 pixels
    path = tmp_path / "rgb16.png"
    path.write_bytes(raw_png(2, 1, 16, 2, row))
    out = open_image(path).image
    assert out.getpixel((0, 0)) == (255, 0, 128) and out.getpixel((1, 0)) == (0, 255, 0)


def test_32_bit_integer_and_float_tiffs(tmp_path):
    ints = Image.fromarray(np.array([[0, 65535, 100000]], dtype=np.int32))
    assert np.asarray(load(tmp_path, ints, "i.tif"))[0, :, 0].tolist() == [0, 167, 255]  # wide ints: by their max
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0, np.nan, np.inf, -3.0]], dtype=np.float32))
    out = load(tmp_path, floats, "f.tif")
    assert np.asarray(out)[0, :, 0].tolist() == [0, 128, 255, 0, 0, 0]


# --- orientation, frames --------------------------------------------------------------------------------


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def test_exif_orientation_is_applied(tmp_path):
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    ImageDraw.Draw(stored).rectangle([0, 0, 19, 19], fill=(255, 0, 0))  # left half red, as stored
    path = tmp_path / "phone.jpg"
    stored.save(path, exif=_exif(6), quality=95)  # 6: viewers rotate 90 degrees clockwise
    shown = open_image(path).image
    assert shown.size == (20, 40)
    top, bottom = shown.getpixel((10, 5)), shown.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60
    stored.save(path, exif=_exif(3), quality=95)  # 3: upside down
    shown = open_image(path).image
    assert shown.size == (40, 20) and shown.getpixel((35, 10))[0] > 200


def test_unreadable_exif_keeps_the_pixels_with_a_note(tmp_path, monkeypatch):
    Image.new("RGB", (8, 4), (0, 200, 0)).save(tmp_path / "x.jpg", exif=_exif(6))

    def broken(self):
        raise SyntaxError("not a TIFF file (header b'XX' not valid)")

    monkeypatch.setattr(Image.Image, "getexif", broken)
    loaded = open_image(tmp_path / "x.jpg")
    assert loaded.image.size == (8, 4) and loaded.notes == ["unreadable EXIF data: orientation not applied"]


def test_animated_files_use_first_frame_with_a_note(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    for name, args in (("a.gif", {}), ("a.png", {}), ("a.webp", {"lossless": True})):
        frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:], duration=100, **args)
        loaded = open_image(tmp_path / name)
        assert loaded.image.getpixel((4, 4)) == (255, 0, 0), name
        assert loaded.notes == ["file has 3 frames (animated or multi-page): using the first"], name


def test_phone_mpo_jpeg_uses_the_main_picture_without_a_note(tmp_path):
    main, depth = Image.new("RGB", (16, 8), (255, 0, 0)), Image.new("RGB", (16, 8), (0, 0, 255))
    main.save(tmp_path / "IMG_0001.jpg", format="MPO", save_all=True, append_images=[depth])
    loaded = open_image(tmp_path / "IMG_0001.jpg")
    assert loaded.image.getpixel((3, 3))[0] > 240 and loaded.notes == []


# --- refusals: one line naming the file and the reason --------------------------------------------------


@pytest.fixture
def jpeg_bytes():
    buf = io.BytesIO()
    img = Image.new("RGB", (64, 48), (10, 120, 200))
    ImageDraw.Draw(img).ellipse([5, 5, 50, 40], fill=(250, 240, 10))
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_missing_empty_folder(tmp_path):
    with pytest.raises(ImageError) as e:
        open_image(tmp_path / "nope.jpg")
    one_line_error(e, tmp_path / "nope.jpg", "file not found")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError) as e:
        open_image(tmp_path / "empty.png")
    one_line_error(e, tmp_path / "empty.png", "empty file")
    with pytest.raises(ImageError) as e:
        open_image(tmp_path)
    one_line_error(e, tmp_path, "folder")


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "holiday.jpg"
    path.write_text("<html>404 not found</html>")
    with pytest.raises(ImageError) as e:
        open_image(path)
    one_line_error(e, path, "not an image")


def test_half_downloaded_jpeg_and_png(tmp_path, jpeg_bytes):
    path = tmp_path / "half.jpg"
    path.write_bytes(jpeg_bytes[: len(jpeg_bytes) // 2])
    with pytest.raises(ImageError) as e:
        open_image(path)
    one_line_error(e, path, "truncated")
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).save(buf, format="PNG")
    path = tmp_path / "half.png"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError) as e:
        open_image(path)
    one_line_error(e, path, "truncated")


def test_corrupt_png_data(tmp_path):
    buf = io.BytesIO()
    Image.effect_noise((32, 32), 50).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    start = data.index(b"IDAT") + 4
    data[start : start + 40] = bytes(40)  # zeroed compressed data: checksum and stream broken
    path = tmp_path / "corrupt.png"
    path.write_bytes(bytes(data))
    with pytest.raises(ImageError) as e:
        open_image(path)
    one_line_error(e, path, "cannot decode image")


def test_decompression_bomb_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(raw_png(100_000, 100_000, 8, 2))  # 10^10 pixels claimed, no data at all
    with pytest.raises(ImageError) as e:
        open_image(path)
    one_line_error(e, path, "over the limit", f"{DEFAULT_MAX_PIXELS:,}", "--max-pixels")
    small = tmp_path / "small.png"
    Image.new("RGB", (20, 10)).save(small)
    with pytest.raises(ImageError) as e:
        open_image(small, max_pixels=199)
    one_line_error(e, small, "20x10 = 200 pixels", "199")
    assert open_image(small, max_pixels=200).image.size == (20, 10)


def test_pillow_own_pixel_limit_is_left_as_it_was(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "x.png")
    before = Image.MAX_IMAGE_PIXELS
    open_image(tmp_path / "x.png")
    with pytest.raises(ImageError):
        open_image(tmp_path / "x.png", max_pixels=1)
    assert Image.MAX_IMAGE_PIXELS == before


def test_postscript_named_jpg_is_never_rendered(tmp_path, monkeypatch):
    """EPS would be rendered by running Ghostscript on the file: refused, nothing run."""
    ran = []
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: ran.append(a))
    monkeypatch.setattr(subprocess, "check_call", lambda *a, **k: ran.append(a))
    path = tmp_path / "photo.jpg"
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n%%EOF\n")
    with pytest.raises(ImageError) as e:
        open_image(path)
    one_line_error(e, path, "not an image")
    assert ran == []


def test_tiny_images_load_and_thin_ones_are_refused(tmp_path):
    for size in ((1, 1), (3, 5), (5, 3)):
        Image.new("RGB", size, (9, 9, 9)).save(tmp_path / "t.png")
        assert open_image(tmp_path / "t.png").image.size == size
    Image.new("RGB", (7, 900)).save(tmp_path / "thin.png")
    with pytest.raises(ImageError) as e:
        open_image(tmp_path / "thin.png")
    one_line_error(e, tmp_path / "thin.png", "7x900", "20:1")


def test_fit_size_keeps_aspect_multiples_of_8_and_a_usable_short_side():
    assert fit_size(48, 32, 32) == (32, 24)
    assert fit_size(1, 1, 512) == (512, 512)
    assert fit_size(3, 5, 16) == (16, 16)  # short side kept at 16: VGG-19 pools four times
    assert fit_size(20, 1, 128) == (128, 16)
    assert fit_size(1000, 50, 512) == (512, 24)
    for w, h, size in ((7, 900, 64), (900, 7, 8), (1, 1, 8)):
        fw, fh = fit_size(w, h, size)
        assert fw % 8 == fh % 8 == 0 and min(fw, fh) >= 16


# --- names ------------------------------------------------------------------------------------------------


def test_slugify_examples():
    assert slugify("Starry Night") == "starry-night"
    assert slugify("ink/wash\\painting") == "ink-wash-painting"
    assert slugify("../../etc/passwd") == "etc-passwd"
    assert slugify("水墨画 style") == "水墨画-style"
    assert slugify("Ｆｕｌｌ／ｗｉｄｔｈ") == "full-width"  # the full-width slash is a slash after NFKC
    assert slugify("a\u202egnp.exe") == "a-gnp-exe"  # right-to-left override dropped
    for nothing in ("", "...", "///", "🎨🖌️", " \t\n", "\udcff\udcfe"):
        s = slugify(nothing)
        assert s.startswith("prompt-") and len(s) == 15
    assert slugify("🎨") != slugify("🖌️")  # different prompts, different names
    long = slugify("美" * 100)
    assert len(long.encode("utf-8")) <= 60 and long == "美" * 20


# Any code point, and often the ones that make names unsafe: separators, dots, NUL, bidi
# controls, lone surrogates, full-width and one-dot-leader look-alikes, letters that grow when lowered.
NASTY = st.sampled_from(list("/\\.:\0 -\t\n\u202e\u200f\udcff\ud800\uff0f\uff0e\u2024\u00b2\u0130\u1e9e\ufb03"))


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.one_of(st.characters(exclude_categories=()), NASTY), max_size=200))
def test_slugify_always_gives_a_safe_file_name(text):
    s = slugify(text)
    assert s and not s.startswith((".", "-"))
    assert len(s.encode("utf-8")) <= 60
    assert not any(c in s for c in '/\\:*?"<>|\0\n\r\t ')
    assert all(c.isalnum() or c == "-" for c in s)
    assert s not in (".", "..")
    assert slugify(text) == s
    s.encode("utf-8")  # a valid name on every file system: no lone surrogates


# --- writing ----------------------------------------------------------------------------------------------


def test_full_disk_leaves_no_file_and_no_temp_file(tmp_path):
    target = tmp_path / "out.png"

    def write(fh):
        fh.write(b"\x89PNG partial data")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputError) as e:
        write_atomic(target, write)
    one_line_error(e, target, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.png"
    target.write_bytes(b"previous result")

    def write(fh):
        fh.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputError):
        write_atomic(target, write, overwrite=True)
    assert target.read_bytes() == b"previous result"
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_interrupt_during_write_leaves_nothing(tmp_path):
    def write(fh):
        fh.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(tmp_path / "out.png", write)
    assert list(tmp_path.iterdir()) == []


def test_existing_file_is_not_replaced_without_overwrite(tmp_path):
    target = tmp_path / "out.png"
    target.write_bytes(b"mine")
    with pytest.raises(OutputError) as e:
        write_atomic(target, lambda fh: fh.write(b"new"))
    one_line_error(e, target, "--overwrite")
    assert target.read_bytes() == b"mine"


def test_output_folder_is_created_and_name_too_long_is_one_line(tmp_path):
    target = tmp_path / "a" / "b" / "out.png"
    save_png(Image.new("RGB", (4, 4)), target)
    assert Image.open(target).size == (4, 4)
    too_long = tmp_path / ("x" * 300 + ".png")
    with pytest.raises(OutputError) as e:
        save_png(Image.new("RGB", (4, 4)), too_long)
    one_line_error(e, too_long, "too long")


def test_metadata_keeps_the_full_unicode_prompt(tmp_path):
    prompt = "水墨画 / ink wash ../ \u202e 🎨 " + "very long " * 40
    save_png(Image.new("RGB", (4, 4)), tmp_path / "o.png", {"prompt": prompt, "clipstyle": {"prompt": prompt}})
    with Image.open(tmp_path / "o.png") as img:
        assert img.text["prompt"] == prompt
    # undecodable command-line bytes (lone surrogates) do not break saving
    info = png_metadata({"prompt": "bad \udcff byte"})
    save_png(Image.new("RGB", (4, 4)), tmp_path / "s.png", {"prompt": "bad \udcff byte"})
    assert Image.open(tmp_path / "s.png").text["prompt"] == "bad \ufffd byte"
    assert info is not None
