"""Contact sheets (clipstyle.evaluation.sheet, the sheet command) and the evaluation protocol end to end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from clipstyle.errors import ClipstyleError
from clipstyle.evaluation import sheet as sheets
from clipstyle.jobs.report import read_report

from conftest import WAIT, invoke, records

ROOT = Path(__file__).resolve().parents[1]
RED, GREEN, BLUE, YELLOW = (220, 20, 20), (20, 200, 20), (20, 20, 220), (230, 230, 20)


def solid(path, colour, size=(40, 30)):
    Image.new("RGB", size, colour).save(path)
    return str(path)


@pytest.fixture
def grid(tmp_path):
    """Two content images x two prompts; one pair failed."""
    a, b = solid(tmp_path / "a.png", RED), solid(tmp_path / "b.png", GREEN)
    cells = [
        sheets.Cell(a, "fire", solid(tmp_path / "a-fire.png", BLUE), scores={"clip_score": 0.25, "ssim": 0.5}),
        sheets.Cell(
            a,
            '<b>ink</b> & "wash"',
            solid(tmp_path / "a-ink.png", YELLOW, (30, 40)),
            scores={"clip_score": 0.21, "ssim": 0.7, "lpips": None},
        ),
        sheets.Cell(b, "fire", str(tmp_path / "b-fire.png"), status="failed", error="diverged <nan>"),
    ]
    return cells


def test_png_grid_puts_each_image_in_its_row_and_column(grid, tmp_path):
    tile = 64
    result = sheets.build(grid, tile=tile, html_dir=tmp_path)
    img = result.image
    assert result.errors == []
    pad = max(4, tile // 32)
    cell_w = tile + pad
    # three columns (content + two prompts), two rows
    assert img.width == pad + 3 * cell_w
    line = max(10, tile // 18) + 4
    header = 2 * line + pad
    cell_h = (img.height - header) // 2
    assert header + 2 * cell_h == img.height

    def centre(row, col):
        return img.getpixel((pad + col * cell_w + tile // 2, header + row * cell_h + tile // 2))

    def near(p, q):
        return max(abs(x - y) for x, y in zip(p, q)) <= 3

    assert near(centre(0, 0), RED) and near(centre(0, 1), BLUE) and near(centre(0, 2), YELLOW)
    assert near(centre(1, 0), GREEN)

    def corner(row, col):  # away from the tile's "failed" / "not run" label
        return img.getpixel((pad + col * cell_w + 2, header + row * cell_h + 2))

    assert near(corner(1, 1), sheets.MISSING_FILL)  # failed pair: grey tile
    assert near(corner(1, 2), sheets.MISSING_FILL)  # never run
    assert near(corner(0, 1), sheets.BACKGROUND)  # 40x30 image: letterboxed, not stretched
    # tiles are scaled to the tile size, aspect kept: the 30x40 image fills the full tile height
    col = pad + 2 * cell_w + tile // 2
    assert near(img.getpixel((col, header + 1)), YELLOW)
    assert near(img.getpixel((pad + 2 * cell_w + 1, header + tile // 2)), sheets.BACKGROUND)
    # the score captions are drawn under the scored tile, nothing under the unscored one
    below = img.crop((pad + cell_w, header + tile + pad, pad + cell_w + tile, header + cell_h))
    assert below.getcolors(maxcolors=10000) and len(below.getcolors(maxcolors=10000)) > 1


def test_html_escapes_text_shows_scores_and_links_relatively(grid, tmp_path):
    page = sheets.build(grid, tile=32, html_dir=tmp_path).html
    assert "<b>ink</b>" not in page and "&lt;b&gt;ink&lt;/b&gt; &amp; &quot;wash&quot;" in page
    assert "diverged &lt;nan&gt;" in page and "<nan>" not in page
    assert '<a href="a-fire.png">' in page and page.count("data:image/jpeg;base64,") == 4
    assert "<th>CLIP</th><td>0.250</td>" in page and "<th>SSIM</th><td>0.700</td>" in page
    # mean per prompt: fire has one scored tile, the ink column one
    means = page.split('class="means"')[1]
    assert "<td>0.250</td>" in means and "<td>0.210</td>" in means
    sub = tmp_path / "sheets"
    assert '<a href="../a-fire.png">' in sheets.build(grid, tile=32, html_dir=sub).html


def test_score_lines_skip_absent_metrics():
    assert sheets.score_lines({"clip_score": 0.2612, "patch_clip_score": 0.25, "ssim": 0.5, "lpips": None}) == [
        "CLIP 0.261  patch 0.250",
        "SSIM 0.500",
    ]
    assert sheets.score_lines({}) == []


def test_report_keeps_the_finished_record_and_resolves_paths_beside_it(tmp_path, monkeypatch):
    folder = tmp_path / "runs"
    folder.mkdir()
    solid(folder / "a.png", RED)
    solid(folder / "a-fire.png", BLUE)
    lines = [
        {"input": "a.png", "prompt": "fire", "output": "a-fire.png", "status": "failed", "error": "oom"},
        {"input": "a.png", "prompt": "fire", "output": "a-fire.png", "status": "ok"},
        {"input": "a.png", "prompt": "fire", "output": "a-fire.png", "status": "failed", "error": "later"},
        {"input": "a.png", "prompt": "ink", "output": "a-ink.png", "status": "failed", "error": "nan"},
    ]
    report = folder / "runs.jsonl"
    report.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    monkeypatch.chdir(tmp_path)  # paths in the report are relative to another folder
    records = read_report(report)
    assert [(r["prompt"], r["status"]) for r in records] == [("fire", "ok"), ("ink", "failed")]
    assert records[0]["output"] == str(folder / "a-fire.png")
    report.write_text('{"input": "a.png"}\n')
    with pytest.raises(ClipstyleError, match="record 1 has no prompt, output, status"):
        read_report(report)
    report.write_text("{oops\n")
    with pytest.raises(ClipstyleError, match="line 1 is not JSON"):
        read_report(report)


def test_sheet_command_from_a_report_and_scores(tmp_path):
    content = solid(tmp_path / "photo.png", RED)
    out = solid(tmp_path / "photo-fire.png", BLUE)
    report = tmp_path / "runs.jsonl"
    report.write_text(json.dumps({"input": content, "prompt": "fire", "output": out, "status": "ok"}) + "\n")
    scores = tmp_path / "scores.jsonl"
    scores.write_text(
        json.dumps(
            {
                "image": out,
                "content": content,
                "prompt": "fire",
                "clip_score": 0.3,
                "patch_clip_score": 0.28,
                "content_distance": 1.5,
                "ssim": 0.4,
            }
        )
        + "\n"
    )
    target = tmp_path / "sheet" / "s.png"
    result = invoke("sheet", "--report", str(report), "--scores", str(scores), "-o", str(target), "--tile", "48")
    assert result.exit_code == 0, result.output
    assert Image.open(target).size[0] == 4 + 2 * 52
    page = (tmp_path / "sheet" / "s.html").read_text()
    assert '<a href="../photo-fire.png">' in page and "<th>content</th><td>1.500</td>" in page
    again = invoke("sheet", "--report", str(report), "-o", str(target))
    assert again.exit_code == 1 and "exists (use --overwrite" in again.output
    assert invoke("sheet", "--report", str(report), "-o", str(target), "--overwrite").exit_code == 0


def test_sheet_command_from_images_and_prompts_finds_run_outputs(tmp_path):
    content = solid(tmp_path / "cat.png", RED)
    styled = tmp_path / "styled"
    styled.mkdir()
    solid(styled / "cat-ink-wash.png", BLUE)  # the name 'clipstyle run -o styled' gives
    broken = styled / "cat-mosaic.png"
    broken.write_bytes(b"not a png")
    result = invoke(
        "sheet", content, "-p", "ink wash", "-p", "mosaic", "-d", str(styled), "-o", str(tmp_path / "s.png")
    )
    assert result.exit_code == 1
    assert f"clipstyle: error: {broken}: " in result.output
    page = (tmp_path / "s.html").read_text()
    assert '<a href="styled/cat-ink-wash.png">' in page and "unreadable" in page


LAUNCHER = """
import sys
sys.path.insert(0, {tests!r})
import clipstyle.cli.common as common

sys.modules["lpips"] = None  # an installed lpips would change the output; tests never use it

def load(*args, **kwargs):  # tiny random models instead of CLIP and VGG-19 (no downloads)
    from conftest import tiny_models
    return tiny_models()

common.load_models_from_options = load
import clipstyle.jobs.plan as plan
plan.load_models = load
from clipstyle.cli import main
main()
"""


def test_evaluation_protocol_runs_end_to_end_on_tiny_models(tmp_path):
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER.format(tests=str(ROOT / "tests")))
    images = tmp_path / "images"
    images.mkdir()
    # one of the protocol's own content images (600x400: the aspect ratio must survive)
    (images / "coffee.jpg").write_bytes((ROOT / "examples" / "images" / "coffee.jpg").read_bytes())
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# styles\nink <wash>\n\nstone wall\n")
    out = tmp_path / "eval"
    env = dict(
        os.environ,
        CLIPSTYLE=f"{sys.executable} {launcher}",
        OUT=str(out),
        IMAGES=str(images),
        PROMPTS_FILE=str(prompts),
        PYTHON=sys.executable,
        RUN_FLAGS="--size 32 --steps 1 --crops 2 --crop-size 16 --no-templates -q",
        SCORE_FLAGS="--no-templates --patch-crops 4",
    )
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "evaluate.sh"), "--device", "cpu"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert done.returncode == 0, done.stderr
    styled = sorted(p.name for p in (out / "styled").iterdir())
    assert styled == ["coffee-ink-wash.png", "coffee-stone-wall.png"]
    scores = records(out / "scores.jsonl")
    assert len(scores) == 2 and {r["prompt"] for r in scores} == {"ink <wash>", "stone wall"}
    for r in scores:
        for name in ("clip_score", "patch_clip_score", "directional_similarity", "content_distance", "ssim"):
            assert isinstance(r[name], float) and r[name] == r[name]  # finite numbers, not NaN
        assert r["templates"] == "none" and r["patch_crops"] == 4 and r["size"] == [32, 24]
    page = (out / "sheet.html").read_text()
    assert page.count("<figure>") == 3 and "ink &lt;wash&gt;" in page and "<th>SSIM</th>" in page
    assert Image.open(out / "sheet.png").size[0] > 3 * 256
    summary = (out / "summary.txt").read_text()
    assert "2 images scored" in summary
    assert re.search(r"patch CLIP score\s+-?\d\.\d{4}\s+0\.2515", summary)
    assert "LPIPS" in summary and "lpips not computed" in summary
