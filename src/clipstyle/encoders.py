"""The frozen encoders: CLIP (style signal) and VGG-19 (content), and their loading.

Each wrapper owns its preprocessing (resize, mean/std as buffers), is in eval
mode with gradients off, and takes RGB images in [0, 1]. Gradients still flow
through them to the images.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from clipstyle.errors import WeightsError
from clipstyle.weights import load_into, read_state_dict

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


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
    if (visual.attn_pool is not None or visual.pool_type != "tok" or visual.output_tokens
            or visual.proj is None or not isinstance(visual.patch_dropout, nn.Identity)
            or conv.bias is not None or conv.kernel_size != conv.stride or conv.padding != (0, 0)
            or visual.positional_embedding.ndim != 2 or getattr(visual.transformer, "grad_checkpointing", False)):
        return False
    for block in visual.transformer.resblocks:
        attn = block.attn
        if (type(block) is not ResidualAttentionBlock or hasattr(block, "ln_1_kv")
                or not isinstance(block.ls_1, nn.Identity) or not isinstance(block.ls_2, nn.Identity)
                or not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim
                or not attn.batch_first or attn.in_proj_bias is None or attn.bias_k is not None
                or attn.add_zero_attn or (attn.dropout and attn.training)):
            return False
    return True


def _patch_embedding(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
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


def _attention(attn: nn.MultiheadAttention, x: torch.Tensor, first_only: bool) -> torch.Tensor:
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

    - the patch convolution is a matmul (see _patch_embedding);
    - the embedding reads only the class token after the last block, so that
      block computes attention queries, the output projection and the MLP for
      the class token alone (one of the 1 + N tokens), about 1/12 of the
      tower's work for ViT-B/32.
    """
    tokens = _patch_embedding(visual.conv1, x)  # (B, N, width)
    b = tokens.shape[0]
    cls = visual.class_embedding.to(tokens.dtype).expand(b, 1, -1)
    tokens = torch.cat([cls, tokens], dim=1) + visual.positional_embedding.to(tokens.dtype)  # (B, 1+N, width)
    tokens = visual.ln_pre(tokens)
    blocks = visual.transformer.resblocks
    for i, block in enumerate(blocks):
        last = i == len(blocks) - 1
        attended = _attention(block.attn, block.ln_1(tokens), first_only=last)
        tokens = (tokens[:, :1] if last else tokens) + attended  # last block: (B, 1, width)
        tokens = tokens + block.mlp(block.ln_2(tokens))
    return visual.ln_post(tokens[:, 0]) @ visual.proj  # (B, D)


class ClipEncoder(nn.Module):
    """CLIP's image and text towers behind one interface.

    ``model`` is anything with ``encode_image(normalised images)`` and
    ``encode_text(tokens)`` (an open_clip CLIP); ``tokenizer`` maps a list of
    strings to a (N, context_length) tensor of token ids.
    """

    def __init__(self, model: nn.Module, tokenizer, image_size: int | tuple[int, int],
                 mean=OPENAI_MEAN, std=OPENAI_STD):
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
        return F.interpolate(images, size=self.image_size, mode="bicubic", align_corners=False,
                             antialias=self.antialias)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, D) unnormalised embeddings."""
        x = (self.resize(images) - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        visual = getattr(self.model, "visual", None)
        if self.fast and vit_fast_path_ok(visual):
            return vit_image_embedding(visual, x)
        return self.model.encode_image(x)

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

    def __init__(self, features: nn.Sequential, layers: dict[str, int] | None = None,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.layers = dict(layers or VGG_CONTENT_LAYERS)
        last = max(self.layers.values())
        self.features = _freeze(features[: last + 1])  # nothing past the last layer used
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.channels_last = False

    def use_channels_last(self, enabled: bool) -> "VggEncoder":
        """Store the convolutions channels-last (NHWC) and feed them NHWC images.

        Same maths; oneDNN on the CPU and cuDNN's tensor-core kernels run VGG's
        convolutions faster in that layout (measured in docs/performance.md).
        """
        if enabled != self.channels_last:
            fmt = torch.channels_last if enabled else torch.contiguous_format
            self.features.to(memory_format=fmt)
            self.channels_last = enabled
        return self

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


@contextlib.contextmanager
def _quiet_logging():
    """open_clip reports through the root logger; the library never prints."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _tag_quick_gelu(model_name: str, pretrained: str | None) -> bool:
    import open_clip

    if model_name.endswith("-quickgelu"):
        return True
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained) if pretrained else {}
    return bool(cfg.get("quick_gelu", False))


def _clip_cache_hint(cache_dir: str | None) -> str:
    if cache_dir:
        return cache_dir
    hf = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub")
    return f"{hf} or {os.path.expanduser('~/.cache/clip')}"


def _materialise_buffers(model: nn.Module) -> bool:
    """Compute the buffers that a meta-device build leaves empty and no file holds.

    In open_clip's CLIP the only such buffer is the text tower's causal
    attention mask (-inf above the diagonal, 0 elsewhere). Any other leaves the
    model as it is and returns False, and the caller builds it normally.
    """
    import open_clip

    if type(model) is not open_clip.CLIP:
        return False
    kept = set(model.state_dict())
    for name, buffer in model.named_buffers():
        if buffer.is_meta and name not in kept and name != "attn_mask":
            return False
    mask = model.attn_mask
    if mask is not None and mask.is_meta:
        model.attn_mask = torch.full(mask.shape, float("-inf"), dtype=mask.dtype).triu_(1)
    return True


def _create_clip(model_name: str, quick_gelu: bool, preprocess: dict, empty: bool) -> nn.Module:
    """An open_clip model; with ``empty``, its weights are left unset (on the meta device) for load_into.

    Random initialisation of ViT-B-32's 151 M parameters takes over a second on
    a laptop CPU, for weights that a file then overwrites.
    """
    import open_clip

    kwargs = {"pretrained": None, "force_quick_gelu": quick_gelu, "force_preprocess_cfg": preprocess or None}
    if empty:
        with torch.device("meta"):
            model = open_clip.create_model(model_name, device="meta", **kwargs)
        if _materialise_buffers(model):
            return model
    return open_clip.create_model(model_name, **kwargs)


def _cached_pretrained_file(cfg: dict, cache_dir: str | None) -> str | None:
    """The tag's file if it is already in the Hugging Face cache, found without a network request.

    open_clip itself asks the hub whether a newer file exists before using a
    cached one, which costs a round trip online and a timeout offline; a
    tag's weights do not change.
    """
    hub = cfg.get("hf_hub")
    if not hub:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - open_clip depends on it
        return None
    repo, filename = os.path.split(hub)
    filename = filename or "open_clip_pytorch_model.bin"
    names = [filename]
    if filename == "open_clip_pytorch_model.bin":
        names.insert(0, "open_clip_model.safetensors")  # open_clip prefers it where the hub has both
    elif filename.endswith(".bin"):
        names.insert(0, filename[: -len(".bin")] + ".safetensors")
    for name in names:
        try:
            found = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
        except Exception:  # noqa: BLE001 - a malformed cache is the same as no cache
            found = None
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def _pretrained_file(model_name: str, pretrained: str, cfg: dict, cache_dir: str | None) -> str:
    """The local file of an open_clip tag: from the cache, else downloaded once by open_clip."""
    import open_clip.factory

    cached = _cached_pretrained_file(cfg, cache_dir)
    if cached:
        return cached
    try:
        path = open_clip.factory.download_pretrained(cfg, cache_dir=cache_dir)
    except Exception as exc:  # download failures surface as many error types
        raise WeightsError(
            f"CLIP weights {model_name}/{pretrained} are not in the cache ({_clip_cache_hint(cache_dir)})"
            " and could not be downloaded; pass --clip-weights FILE (an open_clip state dict or OpenAI's"
            " original .pt file) to use a local file, or run once with network access"
        ) from exc
    if not path:
        raise WeightsError(f"open_clip names no file for {model_name}/{pretrained}")
    return str(path)


def _load_clip_file(model_name: str, quick_gelu: bool, preprocess: dict, path: str | Path) -> nn.Module:
    # read the file first: a missing or corrupt file fails before a large model is built
    state = read_state_dict(path)
    model = _create_clip(model_name, quick_gelu, preprocess, empty=True)
    for key in ("input_resolution", "context_length", "vocab_size", "attn_mask"):
        state.pop(key, None)  # scalars and the mask in OpenAI's archives; open_clip builds its own
    if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    load_into(model, state, path, f"open_clip {model_name}")
    return model


def load_clip(model_name: str = "ViT-B-32", pretrained: str | None = "openai",
              weights: str | Path | None = None, device: torch.device | str = "cpu",
              cache_dir: str | None = None, random_init: bool = False) -> ClipEncoder:
    """An open_clip model as a frozen ClipEncoder.

    ``weights``: a local file (open_clip state dict, safetensors, or OpenAI's
    original TorchScript ``.pt``); no network is used. Otherwise ``pretrained``
    names an open_clip tag, downloaded once into open_clip's cache. ``None``
    for both gives random weights (benchmarks and tests); so does
    ``random_init``, in the architecture the tag names (QuickGELU for OpenAI's).
    """
    import open_clip

    if model_name.replace("/", "-") not in open_clip.list_models():
        raise WeightsError(f"unknown CLIP model {model_name!r}; see open_clip.list_models()")
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained) if pretrained and weights is None else {}
    if pretrained and weights is None and not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model_name)) or "none"
        raise WeightsError(f"unknown pretrained tag {pretrained!r} for {model_name} (known: {tags})")
    quick_gelu = _tag_quick_gelu(model_name, pretrained)
    preprocess = {k: cfg[k] for k in ("mean", "std") if k in cfg}
    with _quiet_logging():
        if random_init:
            model = _create_clip(model_name, quick_gelu, preprocess, empty=False)
        elif weights is not None:
            model = _load_clip_file(model_name, quick_gelu, preprocess, weights)
        elif pretrained:
            path = _pretrained_file(model_name, pretrained, cfg, cache_dir)
            try:
                model = _load_clip_file(model_name, quick_gelu, preprocess, path)
            except WeightsError as error:
                # a tag whose file needs open_clip's conversions (another layout, numpy archives)
                try:
                    model = open_clip.create_model(model_name, pretrained=path, force_quick_gelu=quick_gelu,
                                                   force_preprocess_cfg=preprocess or None)
                except Exception:  # noqa: BLE001 - open_clip could not read it either: say why we could not
                    raise error from None
        else:
            model = _create_clip(model_name, quick_gelu, preprocess, empty=False)
    model = model.float()
    tokenizer = open_clip.get_tokenizer(model_name)
    image_size = model.visual.image_size
    mean = getattr(model.visual, "image_mean", None) or OPENAI_MEAN
    std = getattr(model.visual, "image_std", None) or OPENAI_STD
    return ClipEncoder(model, tokenizer, image_size, mean, std).to(device)


VGG_FILE = "vgg19-dcbb9e9d.pth"


def _vgg_cache_file() -> str:
    """Where torchvision keeps the IMAGENET1K_V1 weights once downloaded."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", VGG_FILE)


def cached_weights(clip_model: str = "ViT-B-32", clip_pretrained: str = "openai",
                   cache_dir: str | None = None) -> tuple[str | None, str | None]:
    """The cached files that load_models would read for a tag, without any network request.

    (CLIP file or None, VGG-19 file or None); None means it would be downloaded.
    """
    import open_clip

    cfg = open_clip.get_pretrained_cfg(clip_model, clip_pretrained) or {}
    vgg = _vgg_cache_file()
    return _cached_pretrained_file(cfg, cache_dir), vgg if os.path.isfile(vgg) else None


def load_vgg(weights: str | Path | None = None, device: torch.device | str = "cpu",
             progress: bool = False, random_init: bool = False) -> VggEncoder:
    """VGG-19 (ImageNet) up to relu5_2 as a frozen VggEncoder.

    ``weights``: a local torchvision vgg19 state dict; otherwise torchvision's
    IMAGENET1K_V1 weights, downloaded once into torch hub's cache.
    """
    if random_init:
        return VggEncoder(vgg19_features()).to(device)
    if weights is None and os.path.isfile(_vgg_cache_file()):
        weights = _vgg_cache_file()  # read memory-mapped, like a local file (torchvision reads it whole)
    if weights is not None:
        state = read_state_dict(weights)
        path = weights
    else:
        from torchvision.models import VGG19_Weights

        try:
            state = VGG19_Weights.IMAGENET1K_V1.get_state_dict(progress=progress, check_hash=True)
        except Exception as exc:  # URLError, hash mismatch, disk errors
            raise WeightsError(
                f"VGG-19 ImageNet weights ({VGG_FILE}) are not in the cache ({os.path.dirname(_vgg_cache_file())})"
                " and could not be downloaded; pass --vgg-weights FILE (torchvision's vgg19 state dict) or put the"
                " file in that folder, or run once with network access"
            ) from exc
        path = VGG_FILE
    with torch.device("meta"):
        features = vgg19_features()  # shapes only: load_into fills every tensor
    # Accept torchvision's full vgg19 state dict ("features.N.*", "classifier.*")
    # or the trunk alone ("N.*"); only the trunk up to relu5_2 is used.
    if any(k.startswith("features.") for k in state):
        state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    trunk = {k: v for k, v in state.items() if int(k.split(".")[0]) < len(features)} if all(
        k.split(".")[0].isdigit() for k in state) else state
    load_into(features, trunk, path, "torchvision vgg19")
    return VggEncoder(features).to(device)


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


def load_models(clip_model: str = "ViT-B-32", clip_pretrained: str | None = "openai",
                clip_weights: str | Path | None = None, vgg_weights: str | Path | None = None,
                device: torch.device | str = "cpu", random_init: bool = False,
                progress: bool = False, cache_dir: str | None = None) -> Models:
    """Load CLIP and VGG-19 once. ``random_init`` skips all weights (benchmarks)."""
    clip = load_clip(clip_model, clip_pretrained, None if random_init else clip_weights, device, cache_dir,
                     random_init=random_init)
    vgg = load_vgg(vgg_weights, device, progress=progress, random_init=random_init)
    info = {
        "clip_model": clip_model,
        "clip_pretrained": "random" if random_init else (None if clip_weights else clip_pretrained),
        "clip_weights": None if clip_weights is None else Path(clip_weights).name,
        "vgg_weights": "random" if random_init else (None if vgg_weights is None else Path(vgg_weights).name),
    }
    return Models(clip, vgg, info)
