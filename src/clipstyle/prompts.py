"""Prompt templates and prompt checks.

The 79 templates are OpenAI CLIP's ImageNet prompt-engineering templates
(CLIP repository, notebooks/Prompt_Engineering_for_ImageNet.ipynb, MIT
licence) less "a photo of many {}.", the set CLIPstyler averages over.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

from clipstyle.errors import ClipstyleError, read_text

# Letters that draw nothing (Hangul fillers, the blank Braille pattern); with spaces,
# format characters (U+200B zero-width space, U+FEFF, U+2060...), controls and lone
# combining marks they make a prompt that looks empty and says nothing.
_BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")
_BLANK_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp", "Mn", "Me"})


def is_blank(prompt: str) -> bool:
    """Whether ``prompt`` has no visible character (empty, spaces, zero-width characters)."""
    return all(c.isspace() or c in _BLANK_LETTERS or unicodedata.category(c) in _BLANK_CATEGORIES for c in prompt)


def split_weight(text: str) -> tuple[str, float | None]:
    """``"starry night:0.7"`` -> ``("starry night", 0.7)``: a blended target's weight (``--blend``).

    Only a last ``:`` followed by a plain decimal number (``0.7``, ``2``, ``.5``) is
    a weight; no such ending gives weight None. ``\\:`` is a literal colon that never
    separates a weight (``"ratio 16\\:9"`` is the text ``ratio 16:9``). Anything
    else, ``|`` included, is the text itself.
    """
    import re

    match = re.fullmatch(r"(.*?)(?<!\\):([0-9]*\.?[0-9]+)", text, flags=re.DOTALL)
    body, weight = (match.group(1), float(match.group(2))) if match else (text, None)
    return body.replace("\\:", ":"), weight


IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

NO_TEMPLATES: tuple[str, ...] = ("{}",)


def load_templates(path: str | Path) -> tuple[str, ...]:
    """Read templates from a text file, one per line, each holding ``{}`` once.

    Blank lines and lines starting with ``#`` are ignored.
    """
    text = read_text(path, "templates")
    lines = [ln.strip() for ln in text.splitlines()]
    templates = tuple(ln for ln in lines if ln and not ln.startswith("#"))
    if not templates:
        raise ClipstyleError("no templates in file (one per line, each with {})", path)
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ClipstyleError(f"template must contain {{}} exactly once: {bad[0]!r}", path)
    return templates


def choose_templates(no_templates: bool = False, templates_file: str | Path | None = None) -> tuple[str, ...]:
    """The templates a command uses: none (the prompt as it is), a file's, or CLIP's 79 ImageNet ones."""
    if no_templates and templates_file is not None:
        raise ClipstyleError("give a templates file or no templates, not both", templates_file)
    if no_templates:
        return NO_TEMPLATES
    if templates_file is not None:
        return load_templates(templates_file)
    return IMAGENET_TEMPLATES


def templates_label(templates: tuple[str, ...], templates_file: str | Path | None = None) -> str:
    """A short name of a template set for reports: imagenet-79, none, or the file's name and count."""
    if templates == IMAGENET_TEMPLATES:
        return "imagenet-79"
    if templates == NO_TEMPLATES:
        return "none"
    name = Path(templates_file).name if templates_file is not None else "custom"
    return f"{name} ({len(templates)})"
