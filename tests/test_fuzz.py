"""Mutated JPEG, PNG, WebP, GIF and TIFF files through the real ``clipstyle run`` path.

Every mutated file must end either in a valid PNG or in one error line: no
exception escapes, no traceback, no partial output. Files are mutated with a
fixed seed, so a failure repeats.
"""

from __future__ import annotations

import io
import random

import pytest
from PIL import Image, ImageDraw

import conftest
from conftest import TINY_16, invoke

PER_FORMAT = 64  # mutated files per format: 320 in all


def _seed_images() -> dict[str, bytes]:
    img = Image.new("RGB", (24, 16), (30, 90, 200))
    ImageDraw.Draw(img).ellipse([4, 2, 18, 14], fill=(250, 200, 20))
    out = {}
    for ext, kwargs in (
        (".jpg", {"format": "JPEG", "quality": 90}),
        (".png", {"format": "PNG"}),
        (".webp", {"format": "WEBP", "quality": 80}),
        (".gif", {"format": "GIF"}),
        (".tif", {"format": "TIFF", "compression": "tiff_lzw"}),
    ):
        buf = io.BytesIO()
        img.save(buf, **kwargs)
        out[ext] = buf.getvalue()
    return out


HEADERS = [
    b"\xff\xd8\xff\xe0\x00\x10JFIF\x00",
    b"\x89PNG\r\n\x1a\n",
    b"RIFF\x00\x00\x00\x00WEBPVP8 ",
    b"GIF89a\x10\x00\x10\x00",
    b"BM",
    b"II*\x00",
    b"%!PS-Adobe-3.0 EPSF-3.0\n",
    b"P6\n4 4\n255\n",
]


def mutate(data: bytes, rng: random.Random, others: list[bytes]) -> bytes:
    b = bytearray(data)
    kind = rng.choice(["flip", "flip", "truncate", "insert", "splice", "overwrite", "combo"])
    if kind in ("flip", "combo"):
        for _ in range(rng.randint(1, 12)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    if kind in ("truncate", "combo"):
        b = b[: rng.randrange(1, len(b))]
    if kind in ("insert", "combo"):
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(b) + 1)
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    if kind == "splice":  # another format's header, or another file's head, over this file's body
        head = rng.choice(HEADERS + [o[: rng.randint(8, 64)] for o in others])
        b = bytearray(head) + b[rng.randrange(len(b)) :]
    if kind == "overwrite":  # a run of 0x00 or 0xFF, e.g. over a length field
        i = rng.randrange(len(b))
        b[i : i + rng.randint(1, 8)] = bytes([rng.choice([0, 255])]) * rng.randint(1, 8)
    return bytes(b)


@pytest.fixture
def loader(monkeypatch):
    monkeypatch.setattr("clipstyle.jobs.plan.load_models", conftest.tiny_loader)


def test_mutated_images_end_in_valid_png_or_one_error_line(tmp_path, loader):
    seeds = _seed_images()
    rng = random.Random(20220101)
    folders = []
    for ext, data in seeds.items():
        folder = tmp_path / f"in{ext.replace('.', '-')}"
        folder.mkdir()
        others = [d for e, d in seeds.items() if e != ext]
        for i in range(PER_FORMAT):
            (folder / f"m{i:03d}-{ext[1:]}{ext}").write_bytes(mutate(data, rng, others))
        folders.append(folder)

    total_ok = total_failed = 0
    for folder in folders:
        out = tmp_path / f"out-{folder.name}"
        result = invoke("run", folder, "-p", "ink", "-o", out, *TINY_16)
        assert result.exit_code in (0, 1), result.stderr
        assert "Traceback" not in result.stderr and "internal error" not in result.stderr, result.stderr
        errors = [ln for ln in result.stderr.splitlines() if ln.startswith("clipstyle: error: ")]
        # every failure is one line naming its file
        assert all(f"{folder}/m" in ln for ln in errors), errors
        written = sorted(out.glob("*")) if out.exists() else []
        assert not [p for p in written if p.name.startswith(".")], "temporary file left behind"
        for png in written:
            with Image.open(png) as img:
                assert img.format == "PNG"
                img.verify()
            with Image.open(png) as img:
                img.load()
                assert img.mode == "RGB"
        assert len(written) + len(errors) == PER_FORMAT
        assert (result.exit_code == 1) == bool(errors)
        total_ok += len(written)
        total_failed += len(errors)
    # the mutations are neither all harmless nor all fatal
    assert total_ok > 20 and total_failed > 20, (total_ok, total_failed)
