"""The text side of the method: a prompt's CLIP embedding (cached per model) and the prompt check."""

from __future__ import annotations

import torch

from clipstyle.errors import ClipstyleError
from clipstyle.method import losses as L
from clipstyle.models.encoders import Models
from clipstyle.prompts import is_blank


def text_embedding(models: Models, text: str, templates: tuple[str, ...]) -> torch.Tensor:
    """Template-averaged, normalised CLIP embedding of ``text`` (D,), cached per text."""
    key = (text, templates)
    if key not in models.text_cache:
        # fp32 whatever autocast the caller runs in: the cache is shared by runs of every precision
        with torch.no_grad(), torch.autocast(models.device.type, enabled=False):
            emb = L.embed_texts(models.clip.encode_text, [t.format(text) for t in templates])
        models.text_cache[key] = emb.float()
    return models.text_cache[key]


def check_prompt(models: Models, prompt: str) -> list[str]:
    """Warnings about ``prompt`` (too long for CLIP's context). Raises on an empty prompt."""
    if is_blank(prompt):
        raise ClipstyleError("the prompt is empty")
    n = models.clip.token_count(prompt)
    limit = models.clip.context_length
    if n > limit:
        return [f"prompt has {n} tokens, more than CLIP's {limit}: the end is cut off"]
    return []
