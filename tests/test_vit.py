"""The fast paths of the frozen encoders keep the maths: the ViT forward that computes only the
embedding, and VGG-19 in channels-last layout, against the plain ones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clipstyle.models.vit import vit_fast_path_ok, vit_image_embedding

from conftest import DEVICE, tiny_clip, tiny_vgg

pytestmark = pytest.mark.device


def _embedding_and_input_grad(encode, x0):
    x = x0.clone().requires_grad_()
    e = encode(x)
    (e * torch.linspace(-1, 1, e.shape[1], device=e.device)).sum().backward()
    return e.detach(), x.grad


@pytest.mark.parametrize("image_size,patch", [(32, 8), (48, 16)])
def test_fast_vit_path_equals_open_clips_forward_and_input_gradient(image_size, patch):
    import open_clip
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    from clipstyle.models.encoders import ClipEncoder

    torch.manual_seed(0)
    model = CLIP(
        embed_dim=16,
        quick_gelu=True,
        vision_cfg=CLIPVisionCfg(layers=3, width=32, head_width=8, patch_size=patch, image_size=image_size),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
    )
    clip = ClipEncoder(model, open_clip.SimpleTokenizer(), image_size).to(DEVICE)
    assert vit_fast_path_ok(clip.model.visual)
    x0 = torch.rand(5, 3, image_size, image_size, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    clip.fast = False
    plain = _embedding_and_input_grad(clip.encode_image, x0)
    clip.fast = True
    fast = _embedding_and_input_grad(clip.encode_image, x0)
    # On CUDA, cuDNN may run the plain path's patch convolution in TF32
    # (torch.backends.cudnn.allow_tf32, on by default) while the fast path's
    # matmul stays fp32 (torch.backends.cuda.matmul.allow_tf32, off): these tolerances are fp32's.
    torch.testing.assert_close(fast[0], plain[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fast[1], plain[1], atol=1e-6, rtol=1e-4)
    # and directly against open_clip's VisionTransformer
    normalised = (x0 - clip.mean) / clip.std
    torch.testing.assert_close(
        vit_image_embedding(clip.model.visual, normalised), clip.model.visual(normalised), atol=1e-5, rtol=1e-4
    )


def test_models_the_fast_path_does_not_cover_take_open_clips_forward():
    clip = tiny_clip().to(DEVICE)
    visual = clip.model.visual
    assert vit_fast_path_ok(visual)
    visual.pool_type = "avg"  # mean of the patch tokens: the last block must run for all of them
    assert not vit_fast_path_ok(visual)
    x = torch.rand(2, 3, 32, 32).to(DEVICE)
    torch.testing.assert_close(clip.encode_image(x), clip.model.encode_image((x - clip.mean) / clip.std))
    assert not vit_fast_path_ok(nn.Identity())


def test_channels_last_vgg_gives_the_same_features():
    vgg = tiny_vgg().to(DEVICE)
    x = torch.rand(2, 3, 40, 24).to(DEVICE)
    plain = vgg(x)
    vgg.use_channels_last(True)
    nhwc = vgg(x)
    assert nhwc["relu5_2"].is_contiguous(memory_format=torch.channels_last)
    for name in plain:
        torch.testing.assert_close(nhwc[name], plain[name], atol=1e-5, rtol=1e-4)
    vgg.use_channels_last(False)
    assert vgg.features[0].weight.is_contiguous()
