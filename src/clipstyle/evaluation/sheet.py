"""Contact sheets: content images x prompts, as one PNG and one HTML page with scores.

Rows are content images, columns prompts; the first column shows the content
image itself. Cells come from ``clipstyle run --report`` files, from
``clipstyle score --json`` output, or from the output names ``run`` gives.

The HTML page embeds each tile's thumbnail as a JPEG data URI, so the page
alone shows the whole sheet wherever it is copied; each thumbnail links to the
full-size file by a path relative to the page, which works while the page
stays beside the outputs. Every text from outside (prompts, file names,
errors) is HTML-escaped.

Pillow only: no torch, so building a sheet is quick.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from clipstyle.config import MAX_PIXELS
from clipstyle.errors import ClipstyleError, ImageError
from clipstyle.images import open_image
from clipstyle.jobs.report import resolve_path

# (metric key, short label) in the order tiles show them.
SCORE_LABELS = (
    ("clip_score", "CLIP"),
    ("patch_clip_score", "patch"),
    ("directional_similarity", "dir"),
    ("content_distance", "content"),
    ("ssim", "SSIM"),
    ("lpips", "LPIPS"),
)

BACKGROUND = (255, 255, 255)
MISSING_FILL = (225, 225, 225)
TEXT = (20, 20, 20)
FAINT = (110, 110, 110)
CONTENT_COLUMN = "content"


@dataclass
class Cell:
    """One stylized image of the sheet (a content image x a prompt)."""

    content: str  # content image path: the row
    prompt: str  # the column
    output: str | None  # stylized image path
    status: str = "ok"  # ok, failed (the run failed) or missing (no file)
    error: str | None = None
    scores: dict = field(default_factory=dict)


# --- inputs ------------------------------------------------------------------


def cells_from_report(records: list[dict]) -> list[Cell]:
    cells = []
    for r in records:
        if r["status"] in ("ok", "skipped"):
            cells.append(Cell(r["input"], r["prompt"], r["output"]))
        else:
            cells.append(Cell(r["input"], r["prompt"], r["output"], status="failed", error=r.get("error")))
    return cells


def cells_from_scores(records: list[dict], base: Path = Path(".")) -> list[Cell]:
    """Cells from ``clipstyle score --json`` objects (image, content, prompt and metrics)."""
    cells = []
    for number, r in enumerate(records, 1):
        missing = [k for k in ("image", "content", "prompt") if k not in r]
        if missing:
            raise ClipstyleError(f"score record {number} has no {', '.join(missing)} field")
        scores = {k: r.get(k) for k, _ in SCORE_LABELS if k in r}
        cells.append(
            Cell(resolve_path(str(r["content"]), base), r["prompt"], resolve_path(str(r["image"]), base), scores=scores)
        )
    return cells


def merge(cells: list[Cell], scored: list[Cell]) -> list[Cell]:
    """``cells`` with the scores of ``scored`` attached (matched by output file);
    scored images that no cell names are added."""
    by_output = {os.path.realpath(c.output): c for c in cells if c.output}
    merged = list(cells)
    for s in scored:
        key = os.path.realpath(s.output)
        if key in by_output:
            by_output[key].scores.update(s.scores)
        else:
            by_output[key] = s
            merged.append(s)
    return merged


def mark_missing(cells: list[Cell]) -> None:
    for c in cells:
        if c.status == "ok" and (not c.output or not Path(c.output).is_file()):
            c.status, c.error = "missing", "no such file"


@dataclass
class Layout:
    rows: list[str]  # content paths, first-seen order
    columns: list[str]  # prompts, first-seen order
    cells: dict[tuple[str, str], Cell]  # (row key, prompt) -> cell; later cells win


def layout(cells: list[Cell]) -> Layout:
    rows: dict[str, str] = {}
    columns: dict[str, None] = {}
    grid: dict[tuple[str, str], Cell] = {}
    for c in cells:
        key = os.path.abspath(c.content)
        rows.setdefault(key, c.content)
        columns.setdefault(c.prompt, None)
        grid[(rows[key], c.prompt)] = c
    return Layout(list(rows.values()), list(columns), grid)


# --- drawing -----------------------------------------------------------------


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def _fit_text(draw, text: str, font, width: float) -> str:
    """``text`` cut to ``width`` pixels, with '...' when cut."""
    text = " ".join(text.split())
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _value(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    # three decimals for cosines and SSIM; significant digits for distances of any scale
    return f"{v:.3f}" if v == 0 or 0.01 <= abs(v) < 10 else f"{v:.3g}"


def score_lines(scores: dict) -> list[str]:
    """Tile captions: two metrics a line, only those present."""
    items = [
        f"{label} {_value(scores[key])}"
        for key, label in SCORE_LABELS
        if key in scores and not (key == "lpips" and scores[key] is None)
    ]
    return ["  ".join(items[i : i + 2]) for i in range(0, len(items), 2)]


def thumbnail(path: str, tile: int, max_pixels: int):
    """The image at ``path`` scaled (up or down) to fit a tile x tile box, aspect ratio kept."""
    from PIL import Image, ImageOps

    return ImageOps.contain(open_image(path, max_pixels).image, (tile, tile), Image.Resampling.LANCZOS)


@dataclass
class Sheet:
    image: object  # PIL RGB image
    html: str
    errors: list[ImageError] = field(default_factory=list)  # images that could not be read


def build(
    cells: list[Cell],
    tile: int = 256,
    title: str = "clipstyle contact sheet",
    html_dir: str | Path = ".",
    max_pixels: int = MAX_PIXELS,
) -> Sheet:
    """Draw the sheet and write its HTML page (links relative to ``html_dir``).

    Unreadable images become grey tiles and are listed in ``errors``.
    """
    from PIL import Image, ImageDraw

    grid = layout(cells)
    if not grid.rows:
        raise ClipstyleError("nothing to put on the sheet")
    pad = max(4, tile // 32)
    font_size = max(10, tile // 18)
    font, small = _font(font_size), _font(max(9, font_size - 2))
    line = font_size + 4
    n_lines = max([len(score_lines(c.scores)) for c in grid.cells.values()] + [0]) + 1
    header = line * 2 + pad
    cell_w, cell_h = tile + pad, tile + n_lines * line + 2 * pad
    sheet = Image.new("RGB", (pad + cell_w * (len(grid.columns) + 1), header + cell_h * len(grid.rows)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    errors: list[ImageError] = []
    thumbs: dict[str, object | None] = {}

    def load(path: str):
        key = os.path.abspath(path)
        if key not in thumbs:
            try:
                thumbs[key] = thumbnail(path, tile, max_pixels)
            except ImageError as exc:
                errors.append(exc)
                thumbs[key] = None
        return thumbs[key]

    def paste(img, x: int, y: int, note: str) -> None:
        if img is None:
            draw.rectangle([x, y, x + tile - 1, y + tile - 1], fill=MISSING_FILL)
            draw.text(
                (x + pad, y + tile // 2 - line // 2), _fit_text(draw, note, font, tile - 2 * pad), fill=FAINT, font=font
            )
        else:
            sheet.paste(img, (x + (tile - img.width) // 2, y + (tile - img.height) // 2))

    columns = [CONTENT_COLUMN] + grid.columns
    for j, name in enumerate(columns):
        x = pad + j * cell_w
        draw.text((x, pad), _fit_text(draw, name, font, tile), fill=TEXT if j else FAINT, font=font)
    for i, row in enumerate(grid.rows):
        y = header + i * cell_h
        x = pad
        paste(load(row), x, y, "unreadable")
        draw.text((x, y + tile + pad), _fit_text(draw, Path(row).name, small, tile), fill=FAINT, font=small)
        for j, prompt in enumerate(grid.columns, 1):
            x = pad + j * cell_w
            cell = grid.cells.get((row, prompt))
            if cell is None:
                paste(None, x, y, "not run")
                continue
            img = load(cell.output) if cell.status == "ok" else None
            paste(img, x, y, cell.status if cell.status != "ok" else "unreadable")
            for k, text in enumerate(score_lines(cell.scores)):
                draw.text((x, y + tile + pad + k * line), _fit_text(draw, text, small, tile), fill=TEXT, font=small)
    page = render_html(grid, thumbs, title, Path(html_dir))
    return Sheet(sheet, page, errors)


# --- HTML --------------------------------------------------------------------


def _data_uri(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _href(path: str, html_dir: Path) -> str:
    """A link from the page to ``path``: relative when possible, else a file URI."""
    try:
        rel = os.path.relpath(os.path.abspath(path), os.path.abspath(html_dir))
    except ValueError:  # another drive (Windows)
        return Path(path).resolve().as_uri()
    return quote(os.fsencode(Path(rel).as_posix()))  # the name's own bytes, UTF-8 or not


def _mean(values) -> float | None:
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def render_html(grid: Layout, thumbs: dict, title: str, html_dir: Path) -> str:
    """The sheet as one HTML page: thumbnails, links to the full images, scores under each tile,
    and the mean of each metric per prompt in the last row."""
    e = html.escape

    def figure(path: str | None, caption: str, scores: dict, note: str | None) -> str:
        img = thumbs.get(os.path.abspath(path)) if path else None
        if img is None:
            body = f'<div class="missing">{e(note or "missing")}</div>'
        else:
            body = (
                f'<a href="{e(_href(path, html_dir))}"><img src="{_data_uri(img)}" '
                f'alt="{e(caption)}" width="{img.width}" height="{img.height}"></a>'
            )
        rows = "".join(
            f"<tr><th>{e(label)}</th><td>{e(_value(scores[key]))}</td></tr>"
            for key, label in SCORE_LABELS
            if key in scores
        )
        table = f'<table class="scores">{rows}</table>' if rows else ""
        return f"<td><figure>{body}<figcaption>{e(caption)}</figcaption>{table}</figure></td>"

    head = "".join(f"<th>{e(p)}</th>" for p in grid.columns)
    body_rows = []
    for row in grid.rows:
        cells = [figure(row, Path(row).name, {}, "unreadable")]
        for prompt in grid.columns:
            c = grid.cells.get((row, prompt))
            if c is None:
                cells.append(figure(None, "", {}, "not run"))
                continue
            note = c.status if c.status != "ok" else "unreadable"
            if c.error:
                note = f"{note}: {c.error}"
            cells.append(
                figure(c.output if c.status == "ok" else None, Path(c.output).name if c.output else "", c.scores, note)
            )
        body_rows.append("<tr>" + "".join(cells) + "</tr>")
    means = []
    for prompt in grid.columns:
        cells = [c for (r, p), c in grid.cells.items() if p == prompt]
        rows = ""
        for key, label in SCORE_LABELS:
            m = _mean(c.scores.get(key) for c in cells)
            if m is not None:
                rows += f"<tr><th>{e(label)}</th><td>{e(_value(m))}</td></tr>"
        means.append(f'<td><table class="scores">{rows}</table></td>' if rows else "<td></td>")
    mean_row = (
        f'<tr class="means"><th>mean per prompt</th>{"".join(means)}</tr>'
        if any(m != "<td></td>" for m in means)
        else ""
    )
    legend = (
        "CLIP: cosine of prompt and image (x100 in some papers); patch: mean over 64 random crops "
        "(CLIPstyler appendix B.3); dir: CLIP direction content&rarr;image against the text direction; "
        "content: VGG content distance (lower keeps more content); SSIM: higher keeps more structure; "
        "LPIPS: lower keeps more content."
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{e(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
table.sheet {{ border-collapse: collapse; }}
table.sheet > tbody > tr > td, table.sheet > thead > tr > th {{ vertical-align: top; padding: 4px; }}
table.sheet > thead > tr > th {{ text-align: left; max-width: 16em; }}
figure {{ margin: 0; }}
figcaption {{ color: #666; font-size: small; word-break: break-all; }}
table.scores {{ font-size: small; font-variant-numeric: tabular-nums; }}
table.scores th {{ text-align: left; font-weight: normal; color: #555; padding-right: 0.6em; }}
.missing {{ background: #e1e1e1; color: #666; padding: 2em 1em; }}
tr.means > th {{ text-align: left; vertical-align: top; }}
</style>
</head>
<body>
<h1>{e(title)}</h1>
<table class="sheet">
<thead><tr><th>{CONTENT_COLUMN}</th>{head}</tr></thead>
<tbody>
{chr(10).join(body_rows)}
{mean_row}
</tbody>
</table>
<p><small>{legend}</small></p>
</body>
</html>
"""
