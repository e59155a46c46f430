"""``clipstyle sheet``: content images x prompts on one page, with scores."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from clipstyle.cli.common import UserError, debug_option, max_pixels_option, stop_on_sigterm


@click.command(context_settings={"max_content_width": 100})
@click.argument("images", nargs=-1, type=str)
@click.option(
    "-p",
    "--prompt",
    "prompts",
    multiple=True,
    metavar="TEXT",
    help="With IMAGES: a prompt they were restyled with (a column); repeatable.",
)
@click.option(
    "-d",
    "--outputs",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="With IMAGES and --prompt: the folder 'clipstyle run -o' wrote to. [default: current folder]",
)
@click.option(
    "--report",
    "reports",
    multiple=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="A 'clipstyle run --report' file: its pairs become the tiles. Repeatable.",
)
@click.option(
    "--scores",
    "score_files",
    multiple=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Output of 'clipstyle score --json': scores under the tiles (and tiles of their own). Repeatable.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path, dir_okay=False),
    default=Path("sheet.png"),
    show_default=True,
    help="The sheet as PNG.",
)
@click.option(
    "--html",
    "html_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="The HTML page. [default: the PNG's name with .html]",
)
@click.option(
    "--tile", type=click.IntRange(32, 2048), default=256, show_default=True, help="Longest side of each tile in pixels."
)
@click.option("--title", default="clipstyle contact sheet", show_default=True, help="Title of the HTML page.")
@click.option("--overwrite", is_flag=True, help="Replace an existing sheet.")
@max_pixels_option("images")
@click.option("-q", "--quiet", is_flag=True, help="Errors only.")
@debug_option
@stop_on_sigterm
def sheet(images, prompts, outputs, reports, score_files, output, html_path, tile, title, overwrite, max_pixels, quiet):
    """A contact sheet of content images x prompts: a PNG and an HTML page with the scores under each tile.

    \b
      clipstyle sheet --report runs.jsonl --scores scores.jsonl -o sheet.png
      clipstyle sheet photo.jpg cat.jpg -p "starry night" -p mosaic -d styled/

    The page embeds small thumbnails, so it shows the sheet on its own; each
    thumbnail links to its full image by a relative path. Exit code 1 when an
    image could not be read (its tile is grey).
    """
    from clipstyle import interrupts
    from clipstyle.evaluation import sheet as sheets
    from clipstyle.images import save_png, write_atomic
    from clipstyle.jobs.report import escape_undecodable, read_json_lines, read_report

    if images and not prompts:
        raise click.UsageError("IMAGES need at least one --prompt")
    if not images and not reports and not score_files:
        raise click.UsageError("give --report FILE, --scores FILE, or IMAGES with --prompt")
    html_path = html_path or output.with_suffix(".html")
    for path in (output, html_path):
        if path.exists() and not overwrite:
            raise UserError(f"{path}: exists (use --overwrite to replace it)")
    cells: list[sheets.Cell] = []
    if images:
        from clipstyle.jobs.inputs import collect_inputs
        from clipstyle.jobs.pairs import plan_pairs

        pairs = plan_pairs(collect_inputs(list(images)), list(dict.fromkeys(prompts)), outputs, base_seed=0)
        cells += [sheets.Cell(str(p.input.path), p.prompt, str(p.output)) for p in pairs]
    for report in reports:
        cells += sheets.cells_from_report(read_report(report))
    scored: list[sheets.Cell] = []
    for path in score_files:
        scored += sheets.cells_from_scores(read_json_lines(path), path.parent)
    cells = sheets.merge(cells, scored)
    sheets.mark_missing(cells)
    result = sheets.build(cells, tile=tile, title=title, html_dir=html_path.parent, max_pixels=max_pixels)
    page = escape_undecodable(result.html).encode("utf-8")  # names that are not UTF-8, escaped
    with interrupts.raising():  # a signal while writing unwinds, removing the temporary files
        save_png(result.image, output, overwrite=overwrite)
        write_atomic(html_path, lambda fh: fh.write(page), overwrite=overwrite)
    for error in result.errors:
        click.echo(f"clipstyle: error: {error}", err=True)
    missing = sum(c.status != "ok" for c in cells)
    if not quiet:
        note = f" ({missing} tiles failed or missing)" if missing else ""
        click.echo(f"wrote {output} and {html_path}{note}", err=True)
    if result.errors:
        sys.exit(1)
