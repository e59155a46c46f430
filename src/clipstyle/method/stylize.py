"""``stylize()``: one photo, one prompt, the default models loaded on first use.

The convenience entry of the library (``from clipstyle import stylize``). It
sits apart from the loop (clipstyle.method.loop) because it loads weights
(clipstyle.models.loading), which the loop itself never does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from clipstyle.config import Settings
from clipstyle.device import resolve_device, same_device
from clipstyle.errors import ClipstyleError
from clipstyle.images import prepare_content
from clipstyle.method.loop import StepInfo, StylizeResult, stylize_many
from clipstyle.method.text import check_prompt
from clipstyle.models.encoders import Models
from clipstyle.models.loading import default_models


def stylize(
    image,
    prompt: str,
    *,
    models: Models | None = None,
    settings: Settings | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    callback: Callable[[StepInfo], None] | None = None,
) -> StylizeResult:
    """Restyle ``image`` (a path, a PIL image, or a (1, 3, H, W) tensor in [0, 1]) after ``prompt``.

    The image is resized to ``settings.size`` on its longest side (aspect ratio
    kept, sides rounded to multiples of 8). ``models`` defaults to CLIP
    ViT-B/32 (OpenAI weights) and VGG-19 (ImageNet) on ``device`` (default:
    auto), loaded once per device and kept for later calls; a ``device`` that
    differs from the given ``models``' is an error. Raises NonFiniteLossError
    if the optimisation diverges.
    """
    settings = settings or Settings()
    if models is None:
        models = default_models(resolve_device("auto" if device is None else str(device)))
    elif device is not None and not same_device(resolve_device(str(device)), models.device):
        raise ClipstyleError(
            f"device {device} differs from the models' device {models.device}; move the models or leave device out"
        )
    check_prompt(models, prompt)
    content = prepare_content(image, settings.size)
    result = stylize_many([content], [prompt], [seed], models=models, settings=settings, callback=callback)[0]
    if result.error is not None:
        raise result.error
    return result
