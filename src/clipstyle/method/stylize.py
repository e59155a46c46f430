"""``stylize()``: one photo, one prompt, the default models loaded on first use.

The convenience entry of the library (``from clipstyle import stylize``). It
sits apart from the loop (clipstyle.method.loop) because it loads weights
(clipstyle.models.loading), which the loop itself never does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from clipstyle.config import AVOID_WEIGHT, Settings
from clipstyle.device import resolve_device, same_device
from clipstyle.errors import ClipstyleError
from clipstyle.images import prepare_content
from clipstyle.method.loop import StepInfo, StylizeResult, stylize_many
from clipstyle.method.targets import StyleImage, Target, Targets
from clipstyle.method.text import check_prompt
from clipstyle.models.encoders import Models
from clipstyle.models.loading import default_models


def stylize(
    image,
    prompt: str | None = None,
    *,
    models: Models | None = None,
    settings: Settings | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    targets: Sequence[Target | str | StyleImage] | None = None,
    avoid: Sequence[str] = (),
    avoid_weight: float = AVOID_WEIGHT,
) -> StylizeResult:
    """Restyle ``image`` (a path, a PIL image, or a (1, 3, H, W) tensor in [0, 1]) after ``prompt``.

    The image is resized to ``settings.size`` on its longest side (aspect ratio
    kept, sides rounded to multiples of 8). ``models`` defaults to CLIP
    ViT-B/32 (OpenAI weights) and VGG-19 (ImageNet) on ``device`` (default:
    auto), loaded once per device and kept for later calls; a ``device`` that
    differs from the given ``models``' is an error. Raises NonFiniteLossError
    if the optimisation diverges.

    ``targets``: instead of ``prompt``, or with it (then the prompt joins them with weight 1), one
    network trained towards their blend: ``Target("starry night", weight=0.7)``,
    ``Target(image=StyleImage.open("monet.jpg"), weight=0.3)``; a plain string is a text and a
    StyleImage an image, each of weight 1. ``avoid``: phrases whose direction the patches are pushed
    away from, with ``avoid_weight`` (docs/method-extensions.md). The result's ``prompt`` is the
    target's label (the prompt itself for one text).
    """
    settings = settings or Settings()
    if models is None:
        models = default_models(resolve_device("auto" if device is None else str(device)))
    elif device is not None and not same_device(resolve_device(str(device)), models.device):
        raise ClipstyleError(
            f"device {device} differs from the models' device {models.device}; move the models or leave device out"
        )
    spec = _targets(prompt, targets, avoid, avoid_weight)
    for text in spec.texts():
        check_prompt(models, text)
    content = prepare_content(image, settings.size)
    result = stylize_many(
        [content],
        [spec.label()],
        [seed],
        models=models,
        settings=settings,
        callback=callback,
        targets=[None if spec.plain else spec],
    )[0]
    if result.error is not None:
        raise result.error
    return result


def _targets(prompt, targets, avoid, avoid_weight) -> Targets:
    """The Targets that stylize()'s arguments describe."""
    items = [] if prompt is None else [Target(prompt)]
    for t in targets or ():
        if isinstance(t, str):
            t = Target(t)
        elif isinstance(t, StyleImage):
            t = Target(image=t)
        elif not isinstance(t, Target):
            raise ClipstyleError(f"a target is a Target, a text or a StyleImage, not {type(t).__name__}")
        items.append(t)
    if not items:
        raise ClipstyleError("give a prompt or targets")
    return Targets(tuple(items), tuple(avoid), avoid_weight)
