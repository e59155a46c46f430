"""``--where TEXT``: a mask from the run's own CLIP, with no other model and no training.

CLIP's image embedding reads only the class token; its patch tokens, as they
leave the last block, are dominated by what the whole image shares and locate
little. Training-free dense CLIP methods change the last block only:

- MaskCLIP (Zhou et al. 2022): each patch's value embedding, through the
  output projection, skipping the attention and the MLP;
- ClearCLIP (Lan et al. 2024): query-query attention, and the last block's
  residual connection and MLP dropped (ViT-B/16 zero-shot VOC-20 mIoU about 80).

Each patch token then goes through the final LayerNorm and projection like the
class token, and is compared with the text embedding of the phrase and of a
few neutral background phrases (a softmax over them at CLIP's logit scale):
the phrase's probability per patch.

ViT-B/32 at 224 px has a 7x7 grid, so the photo is covered by overlapping
square windows (each one CLIP pass), their maps blended, thresholded, and
upsampled to the photo's size with a guided filter that puts the edges where
the photo's are. docs/regions.md says why ClearCLIP and what it costs.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F

from clipstyle.config import WhereSettings
from clipstyle.errors import ClipstyleError
from clipstyle.method import losses as L
from clipstyle.models.vit import attention, patch_embedding, vit_fast_path_ok
from clipstyle.regions.guided import box_filter, grey, guided_upsample

WINDOW_BATCH = 16  # windows per CLIP pass


class WhereError(ClipstyleError):
    """A CLIP model that cannot give a dense map."""


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.reshape(b, n, heads, d // heads).transpose(1, 2)  # (B, h, N, D/h)


def dense_embeddings(clip, images: torch.Tensor, method: str = "clearclip") -> torch.Tensor:
    """Per-patch CLIP embeddings of (B, 3, H, W) images in [0, 1] -> (B, gh, gw, D), normalised.

    The images are resized to the model's input size. The blocks before the
    last run as in CLIP; the last one as ``method`` says (module docstring).
    """
    visual = getattr(clip.model, "visual", None)
    if not vit_fast_path_ok(visual):
        raise WhereError("--where needs a plain vision-transformer CLIP (such as ViT-B-32); this model is not one")
    x = (clip.resize(images) - clip.mean.to(images.dtype)) / clip.std.to(images.dtype)
    tokens = patch_embedding(visual.conv1, x)  # (B, N, width)
    b = tokens.shape[0]
    cls = visual.class_embedding.to(tokens.dtype).expand(b, 1, -1)
    tokens = visual.ln_pre(torch.cat([cls, tokens], dim=1) + visual.positional_embedding.to(tokens.dtype))
    blocks = visual.transformer.resblocks
    for block in blocks[:-1]:
        tokens = tokens + attention(block.attn, block.ln_1(tokens), first_only=False)
        tokens = tokens + block.mlp(block.ln_2(tokens))
    last = blocks[-1]
    attn = last.attn
    y = last.ln_1(tokens)
    if method == "vanilla":
        out = tokens + attention(attn, y, first_only=False)
        out = out + last.mlp(last.ln_2(out))
    else:
        q, _, v = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)  # (B, 1+N, width) each
        if method == "maskclip":
            mixed = v
        else:  # clearclip: softmax(q q^T / sqrt(d)) v, per head
            qh, vh = _heads(q, attn.num_heads), _heads(v, attn.num_heads)
            weights = ((qh * qh.shape[-1] ** -0.5) @ qh.transpose(-2, -1)).softmax(dim=-1)  # (B, h, L, L)
            mixed = (weights @ vh).transpose(1, 2).reshape(v.shape)
        out = attn.out_proj(mixed)  # no residual, no MLP
    patches = visual.ln_post(out[:, 1:]) @ visual.proj  # (B, N, D)
    gh, gw = visual.grid_size
    return F.normalize(patches.float(), dim=-1).reshape(b, gh, gw, -1)


_TEXT_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # clip -> {(phrase, settings): text}


def phrase_embeddings(clip, phrase: str, settings: WhereSettings | None = None) -> torch.Tensor:
    """(1 + K, D) normalised text embeddings: the phrase, then the background phrases
    (those equal to the phrase left out), each averaged over the templates. Kept per model,
    so a folder of photos or video frames encodes the phrase once."""
    settings = settings or WhereSettings()
    if not phrase or not phrase.strip():
        raise ClipstyleError("the --where phrase is empty")
    cache = _TEXT_CACHE.setdefault(clip, {})
    key = (phrase, settings)
    if key not in cache:
        texts = [phrase] + [b for b in settings.background if b.strip().lower() != phrase.strip().lower()]
        with torch.no_grad():
            cache[key] = torch.stack(
                [L.embed_texts(clip.encode_text, [t.format(text) for t in settings.templates]) for text in texts]
            ).float()
    return cache[key]


def phrase_warnings(clip, phrase: str, settings: WhereSettings | None = None) -> list[str]:
    """Warnings about a --where phrase, as for prompts (clipstyle.method.text.check_prompt): a phrase
    that with its longest template needs more tokens than CLIP reads is cut off at the end."""
    settings = settings or WhereSettings()
    limit = clip.context_length
    n = max(clip.token_count(t.format(phrase)) for t in settings.templates)
    if n > limit:
        return [f"the --where phrase needs {n} tokens, more than CLIP's {limit}: the end is cut off"]
    return []


def window_starts(length: int, side: int, stride: float) -> list[int]:
    """Starts of windows of ``side`` covering ``range(length)``, evenly spread, at most ``stride * side`` apart."""
    if length <= side:
        return [0]
    n = math.ceil((length - side) / (stride * side)) + 1
    return [round(i * (length - side) / (n - 1)) for i in range(n)]


def window_side(height: int, width: int, settings: WhereSettings) -> int:
    """Side of the square windows: ``settings.windows`` of them span the short side."""
    return max(1, round(min(height, width) / (1 + (settings.windows - 1) * settings.stride)))


def _tent(side: int) -> torch.Tensor:
    """Blend weights of a window: highest at the centre, small but non-zero at the border. (side,)"""
    t = (torch.arange(side, dtype=torch.float32) + 0.5) / side
    return 1 - (2 * t - 1).abs() + 1e-3


def relevance(clip, image: torch.Tensor, text: torch.Tensor, settings: WhereSettings | None = None) -> torch.Tensor:
    """The phrase's probability over ``image`` (1, 3, H, W), (1, 1, H, W), from overlapping windows.

    text: phrase_embeddings. Each window's patch grid gives a probability per
    patch (softmax over phrase and backgrounds); grids are upsampled bilinearly
    to their window and blended with tent weights.
    """
    settings = settings or WhereSettings()
    h, w = image.shape[-2:]
    side = window_side(h, w, settings)
    boxes = [(y, x) for y in window_starts(h, side, settings.stride) for x in window_starts(w, side, settings.stride)]
    acc = image.new_zeros(1, 1, h, w)
    norm = image.new_zeros(1, 1, h, w)
    tent = _tent(side).to(image)
    weight = (tent[:, None] * tent[None, :])[None, None]  # (1, 1, side, side)
    text = text.to(image.device)
    with torch.no_grad():
        for s in range(0, len(boxes), WINDOW_BATCH):
            part = boxes[s : s + WINDOW_BATCH]
            crops = torch.cat([image[..., y : y + side, x : x + side] for y, x in part])  # (b, 3, side, side)
            emb = dense_embeddings(clip, crops, settings.method)  # (b, gh, gw, D)
            prob = (settings.temperature * emb @ text.t()).softmax(dim=-1)[..., 0]  # (b, gh, gw)
            maps = F.interpolate(prob[:, None], size=(side, side), mode="bilinear", align_corners=False)
            for (y, x), m in zip(part, maps):
                acc[..., y : y + side, x : x + side] += m * weight
                norm[..., y : y + side, x : x + side] += weight
    return acc / norm.clamp_min(1e-12)


def where_mask(
    clip, photo: torch.Tensor, phrase: str, settings: WhereSettings | None = None, text: torch.Tensor | None = None
) -> torch.Tensor:
    """A mask of where ``phrase`` is in ``photo`` (1, 3, H, W) in [0, 1]: (1, 1, H, W) in [0, 1], on the CPU.

    The relevance map is made with the photo's longest side at
    ``settings.work_size`` (never enlarged), thresholded, then upsampled to the
    photo's size by a guided filter with the photo's luma as guide, and
    thresholded again at 0.5: a hard mask whose edges follow the photo's
    (``--feather`` softens them where it is used). Only pixels within the
    filter's radius of the coarse map's edges can change, so texture far from
    any edge cannot leak into the mask. Deterministic on the CPU.
    """
    settings = settings or WhereSettings()
    if text is None:
        text = phrase_embeddings(clip, phrase, settings)
    device = clip.mean.device
    photo = photo.float().cpu()
    h, w = photo.shape[-2:]
    scale = min(1.0, settings.work_size / max(h, w))
    wh, ww = max(1, round(h * scale)), max(1, round(w * scale))
    small = (
        F.interpolate(photo, size=(wh, ww), mode="bilinear", align_corners=False, antialias=True)
        if (wh, ww) != (h, w)
        else photo
    )
    prob = relevance(clip, small.to(device), text, settings).float().cpu()
    hard = (prob > settings.threshold).float()  # (1, 1, wh, ww)
    cell = window_side(wh, ww, settings) / clip.model.visual.grid_size[0]  # one patch's side in work pixels
    r = max(1, round(settings.guide_radius * cell))
    soft = guided_upsample(hard, grey(small), grey(photo), r, settings.guide_eps)
    near = box_filter(hard, r)
    near = ((near > 0) & (near < 1)).float()  # within r of an edge of the thresholded map
    near = F.interpolate(near, size=(h, w), mode="nearest").bool()
    return torch.where(near, (soft > 0.5).float(), F.interpolate(hard, size=(h, w), mode="nearest"))


__all__ = [
    "WhereError",
    "dense_embeddings",
    "phrase_embeddings",
    "phrase_warnings",
    "relevance",
    "where_mask",
    "window_starts",
]
