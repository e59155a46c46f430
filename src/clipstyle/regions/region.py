"""What a user asks for when the style goes to part of a photo: a :class:`Region`, checked and recorded."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from clipstyle.config import FEATHER, MAX_FEATHER
from clipstyle.errors import MaskError
from clipstyle.prompts import is_blank
from clipstyle.provenance import file_sha256
from clipstyle.regions.masks import read_mask


@dataclass(frozen=True)
class Region:
    """Where and how the style applies. Combination rules (docs/regions.md):

    - ``mask`` and ``where`` together: their product, i.e. the phrase's region
      inside the painted mask;
    - ``invert`` flips the combined mask (``where="the sky", invert=True``:
      everything but the sky);
    - ``feather``: soft edge in output pixels (a tent filter of radius
      ceil(feather / 2) centred on the edge); 0 keeps edges as they are;
    - ``preserve_colour``: the output keeps the photo's chroma (clipstyle.regions.colour),
      inside the region; outside, the output is the photo anyway.
    """

    mask: Path | None = None
    where: str | None = None
    invert: bool = False
    feather: float = FEATHER
    preserve_colour: bool = False

    @property
    def selects(self) -> bool:
        """Whether a mask is made (a file or a phrase)."""
        return self.mask is not None or self.where is not None

    @property
    def active(self) -> bool:
        return self.selects or self.preserve_colour

    def check(self) -> None:
        """Every problem a user can cause, before anything is computed or written."""
        if self.where is not None and is_blank(self.where):  # the prompts' rule: zero-width characters too
            raise MaskError("the --where phrase is empty")
        if not (math.isfinite(self.feather) and 0 <= self.feather <= MAX_FEATHER):
            raise MaskError(f"feather must be 0 to {MAX_FEATHER:g} pixels (got {self.feather:g})")
        if self.invert and not self.selects:
            raise MaskError("--invert-mask needs --mask or --where")
        if self.mask is not None:
            read_mask(self.mask)

    def record(self) -> dict:
        """What goes into PNG metadata, reports and style files: enough to repeat it.
        The mask file is named by its name and SHA-256, not its path."""
        out: dict = {}
        if self.mask is not None:
            out["mask"] = Path(self.mask).name
            out["mask_sha256"] = file_sha256(self.mask)
        if self.where is not None:
            out["where"] = self.where
        if self.selects:
            out["invert"] = self.invert
            out["feather"] = self.feather
        out["preserve_color"] = self.preserve_colour  # the recorded key keeps the flag's spelling (--preserve-color)
        return out
