"""File names that are not UTF-8 or hold line breaks, in every line and file clipstyle writes
(issue 16, items 13 and 14)."""

from __future__ import annotations

import json
import os
import sys

import pytest
from PIL import Image

from conftest import counting_loader, invoke

pytestmark = pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="file names here are bytes (Linux)")

TINY = ["--size", "16", "--steps", "1", "--crops", "1", "--crop-size", "8", "--no-templates"]
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
