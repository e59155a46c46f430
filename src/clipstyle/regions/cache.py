"""The masks of a run's photos, made once per photo and kept while a batch needs them."""

from __future__ import annotations

from collections import OrderedDict

import torch

from clipstyle.images import to_tensor
from clipstyle.regions.masks import at_size, finish, photo_mask
from clipstyle.regions.region import Region


class Regions:
    """The masks of a run's photos: made once per photo, kept for the few photos a batch holds.

    ``prepare(key, photo)`` when a photo is read (raises MaskError for that
    photo); ``training_mask(key, content)`` for the optimisation;
    ``finish(key, image, contrast)`` for the image to save, at any size.
    With no active region every method is a no-op (``finish`` only applies contrast).
    """

    def __init__(self, region: Region | None, clip=None, keep: int = 2, where_settings=None):
        self.region = region if region is not None and region.active else None
        self.clip = clip
        self.keep = max(1, keep)
        self.where_settings = where_settings
        self._kept: OrderedDict = OrderedDict()  # key -> (photo PIL image, full-size mask or None)

    def prepare(self, key: str, photo) -> None:
        if self.region is None:
            return
        mask = photo_mask(self.region, photo, self.clip, self.where_settings)
        self._kept[key] = (photo, mask)
        self._kept.move_to_end(key)
        while len(self._kept) > self.keep:
            self._kept.popitem(last=False)

    def training_mask(self, key: str, content: torch.Tensor) -> torch.Tensor | None:
        """The mask at the training size (content: (1, 3, h, w)), feathered there; None without one."""
        if self.region is None or key not in self._kept or self._kept[key][1] is None:
            return None
        h, w = content.shape[-2:]
        return at_size(self._kept[key][1], h, w, self.region.feather)

    def finish(self, key: str, image: torch.Tensor, contrast: bool = False) -> torch.Tensor:
        if self.region is None:
            return finish(image, image, None, None, contrast)
        photo_image, mask = self._kept[key]
        h, w = image.shape[-2:]
        photo = to_tensor(photo_image, (w, h))  # as clipstyle resizes the photo (prepare_content, render)
        return finish(image, photo, self.region, mask, contrast)
