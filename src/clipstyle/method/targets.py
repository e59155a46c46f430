"""What the style aims at: text prompts and style images with weights, and phrases to avoid.

The paper aims every patch direction at one text direction,
``normalise(T(prompt) - T(source))``. A :class:`Targets` generalises it
(docs/method-extensions.md):

- each target has its own unit direction: a text's is the paper's; a style
  image's is ``normalise(S - C)``, where S is the mean normalised CLIP
  embedding of perspective-warped crops of the style image and C the same mean
  over crops of the content image drawn the same way (image minus image: both
  ends in CLIP's image cone, like the patch directions the loss compares it with);
- the pair's target direction is ``normalise(sum_i w_i d_i)``: a blend is one
  network trained towards one direction;
- ``avoid`` phrases each give a text direction ``a_k``; the loop adds
  ``avoid_weight * mean_k max(0, cos(patch direction, a_k))`` to each row's
  directional loss (:func:`avoid_penalty`), with the row's own weight.

A plain prompt is ``Targets.of(prompt)``; its direction is computed exactly as
before, so plain runs are unchanged.
"""

from __future__ import annotations

import hashlib
import math
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from clipstyle.config import AVOID_WEIGHT, MAX_PIXELS, STYLE_IMAGE_CROPS, STYLE_IMAGE_SEED
from clipstyle.errors import ClipstyleError
from clipstyle.prompts import is_blank

# torch is imported inside the functions that compute: planning a run (clipstyle.jobs.pairs) names
# targets without loading torch.


@dataclass(frozen=True)
class StyleImage:
    """A style image: its name and SHA-256 (what outputs record) and the decoded RGB image."""

    name: str
    sha256: str
    image: object = field(compare=False, repr=False)  # PIL RGB image

    @classmethod
    def open(cls, path: str | Path, max_pixels: int = MAX_PIXELS, data: bytes | None = None) -> StyleImage:
        """Read a style image with the checks every input image gets (clipstyle.images.decode):
        raises ImageError naming ``path``. ``data``: its bytes, read elsewhere."""
        from clipstyle.images import open_image

        path = Path(path)
        loaded = open_image(path, max_pixels, data=data)
        if data is None:
            from clipstyle.provenance import file_sha256

            digest = file_sha256(path)
        else:
            digest = hashlib.sha256(data).hexdigest()
        return cls(path.name, digest, loaded.image)

    @classmethod
    def from_image(cls, image, name: str = "image") -> StyleImage:
        """A style image from a PIL image or a (1, 3, H, W) tensor in [0, 1] (the library's way in);
        its SHA-256 is that of its 8-bit RGB pixels and size."""
        from clipstyle.images import to_pil

        pil = image.convert("RGB") if hasattr(image, "convert") else to_pil(image)
        digest = hashlib.sha256(f"{pil.size}".encode() + pil.tobytes()).hexdigest()
        return cls(name, digest, pil)


@dataclass(frozen=True)
class Target:
    """One thing the style aims at: a text or a style image, with a weight (> 0)."""

    text: str | None = None
    image: StyleImage | None = None
    weight: float = 1.0

    def __post_init__(self) -> None:
        if (self.text is None) == (self.image is None):
            raise ClipstyleError("a target is a text or a style image (one of them)")
        if self.text is not None and is_blank(self.text):
            raise ClipstyleError("the prompt is empty")
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not (math.isfinite(w) and w > 0):
            raise ClipstyleError(f"a target's weight must be a number above 0, not {w!r}")

    def label(self) -> str:
        return self.text if self.text is not None else f"[{self.image.name}]"

    def record(self) -> dict:
        if self.text is not None:
            return {"text": self.text, "weight": self.weight}
        return {"image": self.image.name, "image_sha256": self.image.sha256, "weight": self.weight}


@dataclass(frozen=True)
class Targets:
    """What one network is trained towards: targets blended by weight, and phrases to avoid."""

    targets: tuple[Target, ...]
    avoid: tuple[str, ...] = ()
    avoid_weight: float = AVOID_WEIGHT

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "avoid", tuple(self.avoid))
        if not self.targets:
            raise ClipstyleError("at least one target (a prompt or a style image) is needed")
        if any(is_blank(a) for a in self.avoid):
            raise ClipstyleError("an --avoid phrase is empty")
        w = self.avoid_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not (math.isfinite(w) and w >= 0):
            raise ClipstyleError(f"the avoid weight must be a number, 0 or more, not {w!r}")

    @classmethod
    def of(cls, prompt: str) -> Targets:
        """The paper's target: one prompt."""
        return cls((Target(prompt),))

    @property
    def plain(self) -> bool:
        """One text and nothing to avoid: the paper's target, recorded as the prompt alone."""
        return len(self.targets) == 1 and self.targets[0].text is not None and not self.avoid

    def label(self) -> str:
        """The name of the target in outputs, reports and seeds: the prompt of a plain target; the
        style image's name in brackets; a blend's parts with their weights (``a:0.7 + [b.jpg]:0.3``).
        Avoided phrases are not part of it (they are recorded beside it)."""
        if len(self.targets) == 1:
            return self.targets[0].label()
        return " + ".join(f"{t.label()}:{t.weight:g}" for t in self.targets)

    def texts(self) -> list[str]:
        """Every text CLIP reads for this target (prompts and avoided phrases), for the prompt checks."""
        return [t.text for t in self.targets if t.text is not None] + list(self.avoid)

    def with_avoid(self, avoid, avoid_weight: float = AVOID_WEIGHT) -> Targets:
        return Targets(self.targets, tuple(avoid), avoid_weight)

    def record(self) -> dict:
        """What outputs, reports and style files record (names and SHA-256s of style images, not paths)."""
        out: dict = {"targets": [t.record() for t in self.targets]}
        if self.avoid:
            out["avoid"] = list(self.avoid)
            out["avoid_weight"] = self.avoid_weight
        return out


# --- the maths -------------------------------------------------------------------------------------------

# Crop embeddings of style images, per CLIP encoder: (sha256, size, crop size, distortion) -> (D,).
_IMAGE_EMBEDDINGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def crops_embedding(models, image, settings):
    """Mean of the normalised CLIP embeddings of STYLE_IMAGE_CROPS perspective-warped crops of
    ``image`` (1, 3, H, W), drawn as the patch crops are (``settings.crop_size``,
    ``settings.distortion``) from a fixed seed, normalised: (D,), fp32."""
    import torch
    import torch.nn.functional as F

    from clipstyle.method.augment import crop_grids, draw_crops, sample_crops

    clip = models.clip
    image = image.to(models.device)
    h, w = image.shape[-2:]
    generator = torch.Generator().manual_seed(STYLE_IMAGE_SEED)
    draw = draw_crops(h, w, STYLE_IMAGE_CROPS, settings.crop_size, settings.distortion, generator)
    grids = crop_grids(draw.to(models.device), h, w, clip.image_size[0])
    chunk = settings.crop_batch or STYLE_IMAGE_CROPS
    total = None
    with torch.no_grad(), torch.autocast(models.device.type, enabled=False):
        for start in range(0, STYLE_IMAGE_CROPS, chunk):
            emb = F.normalize(clip.encode_image(sample_crops(image, grids.slice(start, start + chunk))).float(), dim=-1)
            part = emb.sum(dim=0)
            total = part if total is None else total + part
    return F.normalize(total, dim=-1)


def style_image_embedding(models, style: StyleImage, settings):
    """A style image's crop embedding (:func:`crops_embedding` at the run's ``--size``), computed
    once per CLIP encoder, image and crop geometry."""
    from clipstyle.images import prepare_content

    cache = _IMAGE_EMBEDDINGS.setdefault(models.clip, {})
    key = (style.sha256, settings.size, settings.crop_size, settings.distortion)
    if key not in cache:
        cache[key] = crops_embedding(models, prepare_content(style.image, settings.size), settings)
    return cache[key]


def target_direction(models, targets: Targets, settings, content):
    """The unit direction a pair's patches are pulled along: ``normalise(sum_i w_i d_i)`` (D,).

    content: the pair's content image (1, 3, H, W) at the training size (the source of style-image
    directions). A plain target gives exactly the paper's text direction.
    """
    import torch.nn.functional as F

    from clipstyle.method import losses as L
    from clipstyle.method.text import text_embedding

    source = None
    content_emb = None
    total = None
    for t in targets.targets:
        if t.text is not None:
            if source is None:
                source = text_embedding(models, settings.source, settings.templates)
            d = L.text_direction(text_embedding(models, t.text, settings.templates), source)
        else:
            if content_emb is None:
                content_emb = crops_embedding(models, content, settings)
            d = F.normalize(style_image_embedding(models, t.image, settings) - content_emb, dim=-1)
        if len(targets.targets) == 1:
            return d  # the paper's direction as it is (no rescaling round trip)
        total = t.weight * d if total is None else total + t.weight * d
    return F.normalize(total, dim=-1)


def avoid_directions(models, targets: Targets, settings):
    """(K, D) unit text directions of the avoided phrases (from the run's source text), or None."""
    import torch

    from clipstyle.method import losses as L
    from clipstyle.method.text import text_embedding

    if not targets.avoid:
        return None
    source = text_embedding(models, settings.source, settings.templates)
    return torch.stack([L.text_direction(text_embedding(models, a, settings.templates), source) for a in targets.avoid])


def avoid_penalty(image_emb, source_emb, avoid_dirs):
    """``mean_k max(0, cos(d, a_k))`` per row, d = normalise(normalise(E) - source): (rows,).

    Zero once a row's direction has no component along any avoided direction: it pushes away
    from the concept without pulling towards its opposite.
    """
    import torch.nn.functional as F

    image_emb = F.normalize(image_emb.float(), dim=-1)
    direction = F.normalize(image_emb - source_emb, dim=-1)
    return F.relu(direction @ avoid_dirs.t()).mean(dim=1)
