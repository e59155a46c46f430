"""A faster forward pass of open_clip's ViT for image embeddings (same maths).

Used by ClipEncoder.encode_image where vit_fast_path_ok says the model is a
plain ViT; anything else takes open_clip's own forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def vit_fast_path_ok(visual) -> bool:
    """Whether ``visual`` is a plain open_clip ViT that vit_image_embedding reproduces exactly.

    Anything else (attentional pooling, average pooling, layer scale, custom
    blocks, active patch dropout, token outputs) takes open_clip's own forward.
    """
    try:
        from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
    except ImportError:  # pragma: no cover - open_clip is a dependency
        return False
    if type(visual) is not VisionTransformer:
        return False
    conv = visual.conv1
    if (
        visual.attn_pool is not None
        or visual.pool_type != "tok"
        or visual.output_tokens
        or visual.proj is None
        or not isinstance(visual.patch_dropout, nn.Identity)
        or conv.bias is not None
        or conv.kernel_size != conv.stride
        or conv.padding != (0, 0)
        or visual.positional_embedding.ndim != 2
        or getattr(visual.transformer, "grad_checkpointing", False)
    ):
        return False
    for block in visual.transformer.resblocks:
        attn = block.attn
        if (
            type(block) is not ResidualAttentionBlock
            or hasattr(block, "ln_1_kv")
            or not isinstance(block.ls_1, nn.Identity)
            or not isinstance(block.ls_2, nn.Identity)
            or not isinstance(attn, nn.MultiheadAttention)
            or not attn._qkv_same_embed_dim
            or not attn.batch_first
            or attn.in_proj_bias is None
            or attn.bias_k is not None
            or attn.add_zero_attn
            or (attn.dropout and attn.training)
        ):
            return False
    return True


def patch_embedding(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The ViT's patch convolution as one matmul: (B, 3, H, W) -> (B, N, width).

    Kernel = stride and no padding, so the patches do not overlap and the
    convolution is a matmul of flattened patches by the flattened kernel. On
    the CPU the convolution's input gradient for a 32x32 kernel is about ten
    times slower than this matmul's.
    """
    b, c, h, w = x.shape
    ph, pw = conv.kernel_size
    gh, gw = h // ph, w // pw
    x = x[..., : gh * ph, : gw * pw]  # the convolution ignores leftover rows and columns too
    patches = x.reshape(b, c, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * ph * pw)
    return patches @ conv.weight.reshape(conv.out_channels, -1).t()  # (B, N, width), rows in raster order


def attention(attn: nn.MultiheadAttention, x: torch.Tensor, first_only: bool) -> torch.Tensor:
    """Multi-head self-attention of (B, L, D) tokens; queries of the first token only if ``first_only``.

    nn.MultiheadAttention moves batch-first tensors to sequence-first and
    projects them there, which makes its backward pass run many small batched
    matmuls; here every projection is one (B*L, D) matmul.
    """
    b, length, d = x.shape
    heads = attn.num_heads
    weight, bias = attn.in_proj_weight, attn.in_proj_bias
    if first_only:
        q = F.linear(x[:, :1], weight[:d], bias[:d])  # (B, 1, D)
        k, v = F.linear(x, weight[d:], bias[d:]).chunk(2, dim=-1)  # (B, L, D) each
    else:
        q, k, v = F.linear(x, weight, bias).chunk(3, dim=-1)
    lq = q.shape[1]
    q = q.reshape(b, lq, heads, -1).transpose(1, 2)  # (B, h, Lq, D/h)
    k = k.reshape(b, length, heads, -1).transpose(1, 2)
    v = v.reshape(b, length, heads, -1).transpose(1, 2)
    if q.device.type == "cpu":
        # With ViT-B/32's 50 tokens, two plain matmuls and a softmax are faster
        # on the CPU (forwards and backwards) than the fused attention kernel.
        weights = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, h, Lq, L)
        out = weights.softmax(dim=-1) @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, Lq, D/h)
    return attn.out_proj(out.transpose(1, 2).reshape(b, lq, d))


def vit_image_embedding(visual, x: torch.Tensor) -> torch.Tensor:
    """open_clip's VisionTransformer forward, computing only what the embedding needs.

    x: (B, 3, H, W) normalised images -> (B, D). Same maths as
    ``visual(x)`` (checked by tests to rounding), with two savings that matter
    when gradients flow back to the images:

    - the patch convolution is a matmul (see patch_embedding);
    - the embedding reads only the class token after the last block, so that
      block computes attention queries, the output projection and the MLP for
      the class token alone (one of the 1 + N tokens), about 1/12 of the
      tower's work for ViT-B/32.
    """
    tokens = patch_embedding(visual.conv1, x)  # (B, N, width)
    b = tokens.shape[0]
    cls = visual.class_embedding.to(tokens.dtype).expand(b, 1, -1)
    tokens = torch.cat([cls, tokens], dim=1) + visual.positional_embedding.to(tokens.dtype)  # (B, 1+N, width)
    tokens = visual.ln_pre(tokens)
    blocks = visual.transformer.resblocks
    for i, block in enumerate(blocks):
        last = i == len(blocks) - 1
        attended = attention(block.attn, block.ln_1(tokens), first_only=last)
        tokens = (tokens[:, :1] if last else tokens) + attended  # last block: (B, 1, width)
        tokens = tokens + block.mlp(block.ln_2(tokens))
    return visual.ln_post(tokens[:, 0]) @ visual.proj  # (B, D)
