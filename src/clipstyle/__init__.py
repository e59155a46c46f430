"""clipstyle: restyle a photo from a sentence (CLIPstyler, Kwon & Ye, CVPR 2022).

The public API is imported lazily so that ``clipstyle --help`` never imports
torch. ``from clipstyle import stylize`` works as usual.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "stylize": "clipstyle.stylize",
    "stylize_many": "clipstyle.stylize",
    "StylizeResult": "clipstyle.stylize",
    "StepInfo": "clipstyle.stylize",
    "Settings": "clipstyle.config",
    "load_models": "clipstyle.encoders",
    "Models": "clipstyle.encoders",
    "StyleNet": "clipstyle.unet",
    "ClipstyleError": "clipstyle.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'clipstyle' has no attribute {name!r}")
