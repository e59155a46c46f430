"""File names that are not UTF-8 or hold line breaks, in every line and file clipstyle writes
(issue 16, items 13 and 14)."""

from __future__ import annotations

import json
import os
import sys

import pytest
from PIL import Image

from conftest import TINY_16, counting_loader, invoke

pytestmark = pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="file names here are bytes (Linux)")

# not quiet (no -q): these tests read the progress and "wrote" lines
TINY_16_SHOWN = [option for option in TINY_16 if option != "-q"]
LATIN1 = os.fsdecode(b"caf\xe9")  # 'café' in Latin-1: not UTF-8, a lone surrogate in Python


def image(path, colour=(200, 10, 10)):
    Image.new("RGB", (16, 16), colour).save(path, format="PNG")
    return path


def test_sheet_of_a_report_with_names_that_are_not_utf8(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source, styled = image(f"{LATIN1}.png"), image(f"{LATIN1}-x.png", (0, 0, 200))
    record = {"input": source, "prompt": "x", "output": styled, "status": "ok"}
    with open("r.jsonl", "w", encoding="utf-8", errors="backslashreplace") as fh:  # as run writes its report
        fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    result = invoke("sheet", "--report", "r.jsonl", "-o", "s.png")
    assert result.exit_code == 0, result.stderr
    page = (tmp_path / "s.html").read_bytes().decode("utf-8")  # valid UTF-8
    assert 'href="caf%E9-x.png"' in page  # the link reaches the file by its own bytes
    assert "caf\\udce9-x.png" in page  # the caption escapes the name as the report does


def test_score_json_writes_valid_utf8(tmp_path, monkeypatch):
    counting_loader(monkeypatch, "score")
    monkeypatch.chdir(tmp_path)
    styled, content = image(f"{LATIN1}.png"), image("content.png", (10, 200, 10))
    result = invoke("score", styled, "-p", "ink", "--content", content, "--json", "--no-lpips", "--patch-crops", "2")
    assert result.exit_code == 0, result.stderr
    (line,) = result.stdout_bytes.decode("utf-8").splitlines()
    assert json.loads(line)["image"] == styled  # the escape reads back as the name
    text = invoke("score", styled, "-p", "ink", "--content", content, "--no-lpips", "--patch-crops", "2")
    assert "caf\\udce9.png: clip_score" in text.stdout_bytes.decode("utf-8")


# --- item 14: lines that stay lines, hints and reasons that are true -----------------------------


@pytest.fixture
def loads(monkeypatch):
    return counting_loader(monkeypatch, "run")


def test_a_failure_after_optimising_starts_its_own_line(tmp_path, loads, monkeypatch):
    import clipstyle.images as io
    from clipstyle.errors import OutputError

    def disk_full(image, path, *args, **kwargs):
        raise OutputError("cannot write: No space left on device", path)

    monkeypatch.setattr(io, "save_png", disk_full)
    src = image(tmp_path / "in.png")
    result = invoke("run", src, "-p", "x", "-o", tmp_path / "out", *TINY_16_SHOWN, "--steps", "3")
    assert result.exit_code == 1
    (line,) = [ln for ln in result.stderr.split("\n") if "clipstyle: error:" in ln]
    shown = line.split("\r")[-1]  # what a terminal shows after the bar's carriage returns
    assert shown.startswith(f"clipstyle: error: {tmp_path / 'out' / 'in-x.png'}: cannot write"), repr(line)


def test_a_newline_in_a_file_name_does_not_break_the_lines(tmp_path, loads):
    src = image(tmp_path / "two\nlines.png")
    out = tmp_path / "out"
    for _ in range(2):  # "wrote", then "skipped"
        result = invoke("run", src, "-p", "x", "-o", out, *TINY_16_SHOWN, "--steps", "1")
        assert result.exit_code == 0, result.stderr
        lines = [ln for ln in result.stderr.split("\n") if "lines-x.png" in ln]
        assert len(lines) == 1 and "two\\nlines-x.png" in lines[0], result.stderr
    assert (out / "two\nlines-x.png").exists()


@pytest.mark.parametrize("precision, suggested", [("fp32", False), ("bf16", True)])
def test_the_divergence_hint_suggests_fp32_only_when_not_fp32(
    shared_models, tiny_settings, monkeypatch, precision, suggested
):
    import torch

    import clipstyle.method.losses as L
    from clipstyle.method.loop import stylize_many

    monkeypatch.setattr(L, "total_variation", lambda x: x.float().sum(dim=(1, 2, 3)) * float("nan"))
    (result,) = stylize_many(
        [torch.rand(1, 3, 16, 16)],
        ["x"],
        [0],
        models=shared_models,
        settings=tiny_settings.replace(precision=precision),
    )
    assert "diverged" in result.error.reason and "--lr" in result.error.reason
    assert ("--precision fp32" in result.error.reason) == suggested


@pytest.mark.parametrize(
    "header, reason",
    [
        ({"clipstyle.metadata": "[" * 100_000 + "]" * 100_000}, "nested too deeply"),
        ({"clipstyle.metadata": '{"seed": ' + "7" * 5000 + "}"}, "5000-digit number"),
        ({"clipstyle.width": "1" * 5000}, "5000-character value"),
    ],
)
def test_absurd_style_metadata_gets_the_true_reason(tmp_path, header, reason):
    from safetensors.torch import save

    from clipstyle.method.unet import StyleNet
    from clipstyle.styles.stylefile import StyleError, load_style

    meta = {"clipstyle.style": "1", "clipstyle.width": "16", "clipstyle.metadata": "{}", **header}
    path = tmp_path / "odd.style"
    path.write_bytes(save({k: v.contiguous() for k, v in StyleNet().state_dict().items()}, metadata=meta))
    with pytest.raises(StyleError, match=reason) as info:
        load_style(path)
    assert info.value.path == str(path)
