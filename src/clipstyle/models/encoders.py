"""The frozen encoders: CLIP (style signal) and VGG-19 (content).

Each wrapper owns its preprocessing (resize, mean/std as buffers), is in eval
mode with gradients off, and takes RGB images in [0, 1]. Gradients still flow
through them to the images.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from clipstyle.models.vit import vit_fast_path_ok, vit_image_embedding

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def store_autocast_weights(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Store in ``dtype`` (in place) the weights that autocast casts to it at every call.

    Those of linear layers, convolutions, attention projections and a ViT's
    ``proj`` matrix: autocast runs these operators in ``dtype`` and casts a
    frozen weight again at each call (it caches only tensors that need
    gradients); and a ViT's class and position embeddings, which its forward
    casts to the activations' dtype. Stored cast, they are the same values, so
    under autocast the outputs do not change; everything else (the norms)
    stays fp32, as autocast computes it.
    """
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            m.to(dtype)
        elif isinstance(m, nn.MultiheadAttention):
            for name in ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                p = getattr(m, name, None)
                if p is not None:
                    p.data = p.data.to(dtype)
    for name in ("proj", "class_embedding", "positional_embedding"):  # a ViT's: cast to the activations' dtype
        p = getattr(module, name, None)
        if isinstance(p, torch.Tensor):
            p.data = p.data.to(dtype)
    return module


class ClipEncoder(nn.Module):
    """CLIP's image and text towers behind one interface.

    ``model`` is anything with ``encode_image(normalised images)`` and
    ``encode_text(tokens)`` (an open_clip CLIP); ``tokenizer`` maps a list of
    strings to a (N, context_length) tensor of token ids.
    """

    def __init__(
        self, model: nn.Module, tokenizer, image_size: int | tuple[int, int], mean=OPENAI_MEAN, std=OPENAI_STD
    ):
        super().__init__()
        self.model = _freeze(model)
        self.tokenizer = tokenizer
        self.image_size = tuple(image_size) if isinstance(image_size, (tuple, list)) else (image_size, image_size)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        # Use vit_image_embedding where the model allows it (same maths, less work);
        # False always takes open_clip's own encode_image (the reference for tests).
        self.fast = True
        # Bicubic without antialiasing, as the reference code resizes to CLIP's
        # input: the paper's results came from it (measured: docs/reference-differences.md).
        self.antialias = False

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        """Resize (B, 3, H, W) to the model's input size.

        Like the reference code, the whole image is resized to the square input
        ignoring its aspect ratio: content and output are squashed alike, so
        their CLIP direction is comparable, and nothing is cropped away.
        """
        if tuple(images.shape[-2:]) == self.image_size:
            return images
        return F.interpolate(
            images, size=self.image_size, mode="bicubic", align_corners=False, antialias=self.antialias
        )

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, D) unnormalised embeddings."""
        x = (self.resize(images) - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        visual = getattr(self.model, "visual", None)
        if self.fast and vit_fast_path_ok(visual):
            return vit_image_embedding(visual, x)
        return self.model.encode_image(x)

    def image_tower_in(self, dtype: torch.dtype) -> ClipEncoder:
        """A copy whose image tower stores autocast's weights in ``dtype`` (store_autocast_weights).

        The text tower and the buffers are shared with this encoder, not
        copied: only images are encoded in a loop.
        """
        model = copy.copy(self.model)
        model._modules = dict(self.model._modules)  # copy.copy shares the dict of submodules
        model._modules["visual"] = store_autocast_weights(copy.deepcopy(self.model.visual), dtype)
        clip = copy.copy(self)
        clip._modules = {**self._modules, "model": model}
        return clip

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """N strings -> (N, D) unnormalised embeddings."""
        tokens = self.tokenizer(list(texts)).to(self.mean.device)
        return self.model.encode_text(tokens)

    @property
    def context_length(self) -> int:
        return int(getattr(self.tokenizer, "context_length", 77) or 77)

    def token_count(self, text: str) -> int:
        """Tokens ``text`` needs, start and end tokens included."""
        encode = getattr(self.tokenizer, "encode", None)
        if encode is None:
            return 0
        return len(encode(text)) + 2


# torchvision's VGG-19 feature layout ("E"): channel counts, "M" for max pooling.
VGG19_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512)
# Indices in that layout (same as torchvision's vgg19().features) whose outputs
# the content loss uses. The reference code reads indices 21 and 31, but
# torchvision's ReLUs run in place, so what it gets are relu4_2 and relu5_2.
VGG_CONTENT_LAYERS = {"relu4_2": 22, "relu5_2": 31}


def vgg19_features(width_divisor: int = 1) -> nn.Sequential:
    """VGG-19's convolutional trunk up to relu5_2, indexed like torchvision's.

    ``width_divisor`` > 1 gives a narrow network of the same layout (for tests).
    """
    layers: list[nn.Module] = []
    cin = 3
    for item in VGG19_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            cout = max(1, item // width_divisor)
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=False)]
            cin = cout
    assert len(layers) == 32
    return nn.Sequential(*layers)


class VggEncoder(nn.Module):
    """VGG-19 features for the content loss, from [0, 1] images."""

    def __init__(
        self, features: nn.Sequential, layers: dict[str, int] | None = None, mean=IMAGENET_MEAN, std=IMAGENET_STD
    ):
        super().__init__()
        self.layers = dict(layers or VGG_CONTENT_LAYERS)
        last = max(self.layers.values())
        self.features = _freeze(features[: last + 1])  # nothing past the last layer used
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.channels_last = False

    def use_channels_last(self, enabled: bool) -> VggEncoder:
        """Store the convolutions channels-last (NHWC) and feed them NHWC images.

        Same maths; oneDNN on the CPU and cuDNN's tensor-core kernels run VGG's
        convolutions faster in that layout (measured in docs/performance.md).
        """
        if enabled != self.channels_last:
            fmt = torch.channels_last if enabled else torch.contiguous_format
            self.features.to(memory_format=fmt)
            self.channels_last = enabled
        return self

    def in_dtype(self, dtype: torch.dtype) -> VggEncoder:
        """A copy whose convolutions are stored in ``dtype`` (store_autocast_weights)."""
        return store_autocast_weights(copy.deepcopy(self), dtype)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        wanted = {i: name for name, i in self.layers.items()}
        out: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in wanted:
                out[wanted[i]] = x
        return out


@dataclass
class Models:
    """The frozen encoders of a run, loaded once and shared by every image and prompt."""

    clip: ClipEncoder
    vgg: VggEncoder
    info: dict = field(default_factory=dict)
    # prompt/source/template embeddings, computed once per text
    text_cache: dict = field(default_factory=dict, repr=False)

    @property
    def device(self) -> torch.device:
        return self.clip.mean.device
