"""CLIPstyler's loss terms as small pure functions (paper, section 3).

Weights (lambda) live in the loop, not here. Every function keeps a leading
batch axis so that several (image, prompt) pairs can be optimised together.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def embed_texts(encode_text, texts: list[str]) -> torch.Tensor:
    """Mean of the embeddings of ``texts``, L2-normalised: (D,).

    CLIPstyler averages the template embeddings first and normalises after;
    StyleGAN-NADA normalises each one first. We follow CLIPstyler.
    """
    return F.normalize(encode_text(texts).float().mean(dim=0), dim=-1)


def text_direction(style: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """normalise(T_style - T_source): where the image should move in CLIP space. (D,)"""
    return F.normalize(style - source, dim=-1)


def directional_loss(image_emb: torch.Tensor, source_emb: torch.Tensor, text_dir: torch.Tensor) -> torch.Tensor:
    """1 - cos(normalise(E(out) - E(content)), text direction), one value per row.

    image_emb: (B, D) embeddings of outputs or output patches (unnormalised);
    source_emb: (B, D) or (D,) normalised embedding of the content image;
    text_dir: (B, D) or (D,). Returns (B,).
    """
    image_emb = F.normalize(image_emb.float(), dim=-1)
    direction = F.normalize(image_emb - source_emb, dim=-1)
    return 1 - F.cosine_similarity(direction, text_dir.expand_as(direction), dim=-1)


def reject_below(losses: torch.Tensor, threshold: float) -> torch.Tensor:
    """Threshold rejection: patch losses under ``threshold`` become 0 (they carry the style already)."""
    return torch.where(losses < threshold, torch.zeros_like(losses), losses)


def content_loss(features: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over layers of the mean squared feature error, one value per image: (B,)."""
    total = 0
    for name, f in features.items():
        t = target[name].expand_as(f)
        total = total + (f.float() - t.float()).pow(2).flatten(1).mean(dim=1)
    return total


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Sum of the L2 norms (not squared) of the horizontal, vertical and both
    diagonal neighbour differences, one value per image: (B, C, H, W) -> (B,)."""

    def norm(d: torch.Tensor) -> torch.Tensor:
        return d.flatten(1).norm(dim=1)

    x = images.float()
    return (
        norm(x[..., :, :-1] - x[..., :, 1:])
        + norm(x[..., :-1, :] - x[..., 1:, :])
        + norm(x[..., 1:, :-1] - x[..., :-1, 1:])
        + norm(x[..., :-1, :-1] - x[..., 1:, 1:])
    )
