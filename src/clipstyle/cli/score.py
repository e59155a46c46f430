"""``clipstyle score``: how much of the prompt's style, how much of the content."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from clipstyle.cli.common import (
    UserError,
    debug_option,
    load_models_from_options,
    max_pixels_option,
    model_options,
    stop_on_sigterm,
)
from clipstyle.config import PATCH_SCORE_CROPS, Settings

D = Settings()


def _jobs(images, prompt, content, reports) -> list[tuple[str, str, str]]:
    """(image, content, prompt) triples from the arguments and from run reports."""
    from clipstyle.jobs.report import read_report

    jobs = [(str(image), str(content), prompt) for image in images]
    for report in reports:
        for record in read_report(report):
            if record["status"] in ("ok", "skipped"):
                jobs.append((record["output"], record["input"], record["prompt"]))
    return jobs


@click.command(context_settings={"max_content_width": 100})
@click.argument("images", nargs=-1, type=click.Path(path_type=Path))
@click.option("-p", "--prompt", default=None, metavar="TEXT", help="The prompt the IMAGES were made for.")
@click.option(
    "--content",
    type=click.Path(path_type=Path),
    default=None,
    help="The content image the IMAGES were made from (resized to each image's size).",
)
@click.option(
    "--report",
    "reports",
    multiple=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Score every output of a 'clipstyle run --report' file (its input is the content). Repeatable.",
)
@click.option(
    "--video",
    "films",
    nargs=2,
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    metavar="ORIGINAL STYLED",
    help="Measure the flicker of the film STYLED made from ORIGINAL: the warping error along the "
    "original's optical flow, beside the original's own (its floor). Needs no model.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per image (JSON lines).")
@click.option(
    "--no-templates",
    is_flag=True,
    help="Encode the prompt as it is (as CLIPScore does) instead of averaging CLIP's 79 ImageNet "
    "templates (as the loss does).",
)
@click.option(
    "--templates",
    "templates_file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="File of prompt templates, one per line with {}.",
)
@click.option(
    "--source",
    default=D.source,
    show_default=True,
    help="Neutral text the direction starts from (directional similarity).",
)
@click.option(
    "--patch-crops",
    type=click.IntRange(1),
    default=PATCH_SCORE_CROPS,
    show_default=True,
    help="Random crops for the patch CLIP score (paper: 64).",
)
@click.option(
    "--patch-seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of the patch crops: the same seed gives the same crops.",
)
@click.option("--no-lpips", is_flag=True, help="Skip LPIPS even when the lpips package is installed.")
@model_options
@max_pixels_option("images")
@debug_option
@stop_on_sigterm
def score(
    images,
    prompt,
    content,
    reports,
    films,
    as_json,
    no_templates,
    templates_file,
    source,
    patch_crops,
    patch_seed,
    no_lpips,
    clip_model,
    clip_pretrained,
    clip_weights,
    vgg_weights,
    device,
    max_pixels,
):
    """Score stylized IMAGES for a prompt against their content image.

    \b
      clipstyle score styled.png -p "starry night" --content photo.jpg
      clipstyle score --report runs.jsonl --json > scores.jsonl
      clipstyle score --video holiday.mp4 holiday-ink.mp4

    Metrics: clip_score (prompt vs image), patch_clip_score (mean over random
    crops, CLIPstyler appendix B.3), directional_similarity (content->image
    direction vs text direction); content_distance (the VGG content loss, 0
    for the content image itself), ssim and, when the optional lpips package
    and its weights are installed, lpips. A file that fails is reported and
    the others go on; exit code 1 if any failed.

    With --video: the warping error of the restyled film (temporal stability,
    lower is steadier) and of the original, and their ratio (docs/evaluation.md).
    """
    from clipstyle.prompts import choose_templates, is_blank, templates_label

    if films:
        if images or reports:
            raise click.UsageError("--video scores two films: leave out IMAGES and --report")
        _score_films(*films, as_json)
        return
    if images and (prompt is None or content is None):
        raise click.UsageError("scoring IMAGES needs --prompt and --content")
    if not images and not reports:
        raise click.UsageError("give IMAGES with --prompt and --content, or --report FILE")
    if prompt is not None and is_blank(prompt):
        raise UserError("the prompt is empty")
    templates = choose_templates(no_templates, templates_file)
    jobs = _jobs(images, prompt, content, reports)
    if not jobs:
        raise UserError("nothing to score: the reports list no finished outputs")

    from clipstyle.errors import ClipstyleError
    from clipstyle.evaluation import metrics
    from clipstyle.images import open_image, to_tensor
    from clipstyle.jobs.report import escape_undecodable
    from clipstyle.method.text import check_prompt

    models = load_models_from_options(clip_model, clip_pretrained, clip_weights, vgg_weights, device=device)
    lpips_fn, lpips_note = (None, "lpips not computed: --no-lpips") if no_lpips else metrics.load_lpips(models.device)
    common = {
        "templates": templates_label(templates, templates_file),
        "source": source,
        "patch_crops": patch_crops,
        "patch_seed": patch_seed,
        "models": dict(models.info),
    }
    if not as_json:
        m = models.info
        click.echo(
            f"# CLIP {m.get('clip_model')} ({m.get('clip_weights') or m.get('clip_pretrained')}), "
            f"VGG-19 ({m.get('vgg_weights') or 'imagenet'}); templates: {common['templates']}; "
            f"patch: {patch_crops} crops, seed {patch_seed}"
        )
        if lpips_note:
            click.echo(f"# {lpips_note}")
    warned: set[str] = set()
    failed = 0
    for image_path, content_path, text in jobs:
        try:
            if text not in warned:
                warned.add(text)
                for warning in check_prompt(models, text):
                    click.echo(f"clipstyle: warning: {warning}", err=True)
            loaded, loaded_content = open_image(image_path, max_pixels), open_image(content_path, max_pixels)
            for path, notes in ((image_path, loaded.notes), (content_path, loaded_content.notes)):
                for note in notes:
                    click.echo(f"clipstyle: warning: {path}: {note}", err=True)
            image, content_image = loaded.image, loaded_content.image
            x = to_tensor(image)
            c = to_tensor(content_image, image.size)  # the content at the output's size
            result = metrics.score_image(
                models,
                x,
                c,
                text,
                templates=templates,
                source=source,
                patch_crops=patch_crops,
                patch_seed=patch_seed,
                lpips_fn=lpips_fn,
                lpips_note=lpips_note,
            )
        except ClipstyleError as exc:
            failed += 1
            click.echo(f"clipstyle: error: {exc}", err=True)
            continue
        if as_json:
            record = {
                "image": image_path,
                "content": content_path,
                "prompt": text,
                **result.to_dict(),
                "size": list(image.size),
                **common,
            }
            click.echo(escape_undecodable(json.dumps(record, ensure_ascii=False, sort_keys=True)))
        else:
            values = "  ".join(
                f"{name} {'n/a' if getattr(result, name) is None else f'{getattr(result, name):.4f}'}"
                for name in metrics.METRIC_NAMES
            )
            click.echo(escape_undecodable(f"{image_path}: {values}"))
    if failed:
        click.echo(f"clipstyle: {failed} of {len(jobs)} images failed", err=True)
        sys.exit(1)


def _score_films(original: Path, styled: Path, as_json: bool) -> None:
    """Print the flicker of ``styled`` against ``original`` (evaluation.flicker)."""
    from clipstyle.evaluation.flicker import warping_error

    result = warping_error(original, styled)
    if as_json:
        click.echo(json.dumps({"original": str(original), "styled": str(styled), **result.to_dict()}, sort_keys=True))
        return
    click.echo(
        f"{styled}: warping_error {result.warping_error:.6f}  original {result.original_warping_error:.6f}  "
        f"ratio {result.ratio:.2f}  ({result.pairs} frame pairs, {result.masked_fraction:.1%} of pixels masked)"
    )
