"""A hand-made CLIP whose answers are known, for the --where tests and the method measurement.

The vision tower is a real open_clip VisionTransformer (so the dense-map code
runs on it exactly as on ViT-B/32) with weights set by hand:

- each patch token carries its patch's colour (RGB minus its grey), plus a
  constant that every token shares, as CLIP's embeddings share a large
  common part;
- the last block's attention is global (keys are zero, so every token attends
  to all tokens equally) and adds ``GLOBAL`` times the image's mean colour to
  every token: the class token's embedding is the image's colour, and each
  patch token as it leaves the block is swamped by the whole image, as real
  CLIP's patch tokens are;
- its queries read the colour, so query-query attention groups patches of one
  colour; values and the output projection pass colour through; the MLP is 0.

The text tower maps a colour word ("red", "green", "blue") to that colour's
direction and anything else to the neutral direction, with the shared part.
"""

from __future__ import annotations

import torch
from torch import nn

from clipstyle.models.encoders import ClipEncoder

WIDTH, PATCH, IMAGE = 8, 4, 16
SHARED = 0.3  # the constant every token carries (channels 3 and 4, +/-)
GLOBAL = 4.0  # how much of the image's mean colour the last block adds to every token
QUERY = 6.0  # how sharply query-query attention groups equal colours
WORDS = {"red": (1.0, -0.5, -0.5), "green": (-0.5, 1.0, -0.5), "blue": (-0.5, -0.5, 1.0)}


class _Model(nn.Module):
    def __init__(self, visual):
        super().__init__()
        self.visual = visual

    def encode_image(self, x):
        return self.visual(x)


class PlantedClip(ClipEncoder):
    def __init__(self):
        from open_clip.transformer import VisionTransformer

        visual = VisionTransformer(
            image_size=IMAGE, patch_size=PATCH, width=WIDTH, layers=1, heads=1, mlp_ratio=1, output_dim=4
        )
        with torch.no_grad():
            for p in visual.parameters():
                p.zero_()
            centre = torch.eye(3) - 1 / 3  # colour minus its grey
            visual.conv1.weight[:3] = centre.view(3, 3, 1, 1) / PATCH**2
            visual.positional_embedding[:, 3] = SHARED
            visual.positional_embedding[:, 4] = -SHARED
            for norm in (
                visual.ln_pre,
                visual.ln_post,
                visual.transformer.resblocks[0].ln_1,
                visual.transformer.resblocks[0].ln_2,
            ):
                norm.weight.fill_(1)
            attn = visual.transformer.resblocks[0].attn
            w = attn.in_proj_weight  # (3 * WIDTH, WIDTH): q, k, v
            w[:3, :3] = QUERY * torch.eye(3)  # queries: colour
            w[2 * WIDTH :] = torch.eye(WIDTH)  # values: everything
            attn.out_proj.weight.copy_(GLOBAL * torch.eye(WIDTH))
            visual.proj.zero_()
            visual.proj[:3, :3] = torch.eye(3)
            visual.proj[3, 3] = 0.5
            visual.proj[4, 3] = -0.5
        super().__init__(_Model(visual), tokenizer=None, image_size=IMAGE, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))

    def encode_text(self, texts):
        rows = []
        for text in texts:
            word = next((w for w in WORDS if w in text.lower()), None)
            rows.append(torch.tensor([*(WORDS[word] if word else (0.0, 0.0, 0.0)), 1.0]))
        return torch.stack(rows).to(self.mean.device)

    def token_count(self, text):
        return len(text.split()) + 2


def scene(width: int = 96, height: int = 64, seed: int = 0):
    """A photo with a red region of irregular outline on a textured green-blue ground.

    Returns (image (1, 3, H, W) in [0, 1], truth (H, W) bool: where it is red).
    """
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32), indexing="ij"
    )
    ground = torch.stack([0.25 + 0.1 * xs / width, 0.7 - 0.2 * ys / height, 0.55 + 0.2 * xs / width])
    ground = ground + 0.04 * torch.randn(3, height, width, generator=g)
    # an ellipse and a bar joined: not aligned with any patch grid
    truth = ((xs - 0.38 * width) / (0.2 * width)) ** 2 + ((ys - 0.45 * height) / (0.3 * height)) ** 2 <= 1
    truth |= (xs > 0.55 * width) & (xs < 0.85 * width) & (ys > 0.6 * height) & (ys < 0.8 * height)
    red = torch.tensor([0.85, 0.12, 0.1]).view(3, 1, 1) + 0.04 * torch.randn(3, height, width, generator=g)
    image = torch.where(truth, red, ground).clamp(0, 1)
    return image.unsqueeze(0), truth


def iou(mask: torch.Tensor, truth: torch.Tensor, threshold: float = 0.5) -> float:
    found = mask.reshape(truth.shape) > threshold
    return float((found & truth).sum() / (found | truth).sum().clamp_min(1))
