"""clipstyle: restyle a photo from a sentence (CLIPstyler, Kwon & Ye, CVPR 2022).

    from clipstyle import stylize, load_models, Settings

The public names below are imported on first use, so that ``import clipstyle``
and ``clipstyle --help`` never import torch; ``dir(clipstyle)`` and IDEs see
them all.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    # optimising a network per image and prompt
    "stylize": "clipstyle.method.stylize",
    "stylize_many": "clipstyle.method.loop",
    "StylizeResult": "clipstyle.method.loop",
    "StepInfo": "clipstyle.method.loop",
    "Target": "clipstyle.method.targets",
    "StyleImage": "clipstyle.method.targets",
    "Settings": "clipstyle.config",
    "PRESETS": "clipstyle.config",
    "settings_for": "clipstyle.config",
    # the frozen encoders
    "load_models": "clipstyle.models.loading",
    "Models": "clipstyle.models.encoders",
    # saved styles: the trained network as a file, and rendering with it
    "StyleNet": "clipstyle.method.unet",
    "Style": "clipstyle.styles.stylefile",
    "load_style": "clipstyle.styles.stylefile",
    "save_style": "clipstyle.styles.stylefile",
    "render": "clipstyle.styles.rendering",
    # images in and out
    "open_image": "clipstyle.images",
    "save_png": "clipstyle.images",
    "to_tensor": "clipstyle.images",
    "to_pil": "clipstyle.images",
    "ClipstyleError": "clipstyle.errors",
}

__all__ = ["__version__", *_PUBLIC]

if TYPE_CHECKING:  # what type checkers and IDEs resolve; at run time __getattr__ does it
    from clipstyle.config import PRESETS, Settings, settings_for  # noqa: F401
    from clipstyle.errors import ClipstyleError  # noqa: F401
    from clipstyle.images import open_image, save_png, to_pil, to_tensor  # noqa: F401
    from clipstyle.method.loop import StepInfo, StylizeResult, stylize_many  # noqa: F401
    from clipstyle.method.stylize import stylize  # noqa: F401
    from clipstyle.method.targets import StyleImage, Target  # noqa: F401
    from clipstyle.method.unet import StyleNet  # noqa: F401
    from clipstyle.models.encoders import Models  # noqa: F401
    from clipstyle.models.loading import load_models  # noqa: F401
    from clipstyle.styles.rendering import render  # noqa: F401
    from clipstyle.styles.stylefile import Style, load_style, save_style  # noqa: F401


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'clipstyle' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
