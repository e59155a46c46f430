"""Loading CLIP and VGG-19 weights: local files, caches, or one download.

The model classes are in encoders.py; reading weight files safely is weights.py.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from pathlib import Path

import torch
from torch import nn

from clipstyle.config import CLIP_MODEL, CLIP_PRETRAINED
from clipstyle.errors import WeightsError
from clipstyle.models.encoders import (
    OPENAI_MEAN,
    OPENAI_STD,
    ClipEncoder,
    Models,
    VggEncoder,
    vgg19_features,
)
from clipstyle.models.weights import load_into, read_state_dict


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
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub"
    )
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


HUB_PROBE_SECONDS = 5.0  # how long the look-up waits to connect to the weights hub before calling it offline


def hub_unreachable() -> str | None:
    """Why the weights hub cannot be reached, found at once; None when it may be.

    Offline, the hub client retries with back-off for most of a minute before
    failing; one name look-up and connection, bounded by HUB_PROBE_SECONDS,
    says so in a moment. HF_HUB_OFFLINE=1 skips even that. Behind a proxy
    (HTTPS_PROXY, ALL_PROXY) no direct connection is tried: the client knows best.
    """
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=HUB_PROBE_SECONDS).close()
    except OSError as exc:
        return f"{url.hostname} cannot be reached ({exc.strerror or exc})"
    return None


def _pretrained_file(model_name: str, pretrained: str, cfg: dict, cache_dir: str | None) -> str:
    """The local file of an open_clip tag: from the cache, else downloaded once by open_clip
    (not tried when the hub cannot be reached: the same error, at once)."""
    import open_clip.factory

    cached = _cached_pretrained_file(cfg, cache_dir)
    if cached:
        return cached
    try:
        offline = hub_unreachable() if cfg.get("hf_hub") else None
        if offline:
            raise OSError(offline)
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


def load_clip(
    model_name: str = CLIP_MODEL,
    pretrained: str | None = CLIP_PRETRAINED,
    weights: str | Path | None = None,
    device: torch.device | str = "cpu",
    cache_dir: str | None = None,
    random_init: bool = False,
) -> ClipEncoder:
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
                    model = open_clip.create_model(
                        model_name,
                        pretrained=path,
                        force_quick_gelu=quick_gelu,
                        force_preprocess_cfg=preprocess or None,
                    )
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


def cached_weights(
    clip_model: str = CLIP_MODEL, clip_pretrained: str = CLIP_PRETRAINED, cache_dir: str | None = None
) -> tuple[str | None, str | None]:
    """The cached files that load_models would read for a tag, without any network request.

    (CLIP file or None, VGG-19 file or None); None means it would be downloaded.
    """
    import open_clip

    cfg = open_clip.get_pretrained_cfg(clip_model, clip_pretrained) or {}
    vgg = _vgg_cache_file()
    return _cached_pretrained_file(cfg, cache_dir), vgg if os.path.isfile(vgg) else None


def load_vgg(
    weights: str | Path | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    random_init: bool = False,
) -> VggEncoder:
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
        state = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
    trunk = (
        {k: v for k, v in state.items() if int(k.split(".")[0]) < len(features)}
        if all(k.split(".")[0].isdigit() for k in state)
        else state
    )
    load_into(features, trunk, path, "torchvision vgg19")
    return VggEncoder(features).to(device)


def _fetch_missing(
    clip_model: str, clip_pretrained: str | None, clip_weights, vgg_weights, cache_dir: str | None
) -> None:
    """Before building either model: fetch CLIP's weights if they are neither given nor
    cached; if that fails, name every missing weight at once (one WeightsError), without
    waiting for a second download (VGG-19's) to time out as well."""
    import open_clip

    if clip_weights is not None or not clip_pretrained:
        return  # a given file is read (and checked) first, as before
    cfg = open_clip.get_pretrained_cfg(clip_model, clip_pretrained) or {}
    if not cfg or _cached_pretrained_file(cfg, cache_dir):
        return
    try:
        with _quiet_logging():
            _pretrained_file(clip_model, clip_pretrained, cfg, cache_dir)
        return
    except WeightsError:
        if vgg_weights is not None or os.path.isfile(_vgg_cache_file()):
            raise
    raise WeightsError(
        f"weights not cached and not downloadable: CLIP {clip_model}/{clip_pretrained} (looked for in "
        f"{_clip_cache_hint(cache_dir)}) and VGG-19 ImageNet ({VGG_FILE}, looked for in "
        f"{os.path.dirname(_vgg_cache_file())}). Pass --clip-weights FILE and --vgg-weights FILE (local files; no "
        "network is used), or run once with network access"
    )


def load_models(
    clip_model: str = CLIP_MODEL,
    clip_pretrained: str | None = CLIP_PRETRAINED,
    clip_weights: str | Path | None = None,
    vgg_weights: str | Path | None = None,
    device: torch.device | str = "cpu",
    random_init: bool = False,
    progress: bool = False,
    cache_dir: str | None = None,
) -> Models:
    """Load CLIP and VGG-19 once. ``random_init`` skips all weights (benchmarks).

    Both weights are looked for before either model is built: CLIP's, if
    neither given nor cached, are downloaded first, and if they cannot be while
    VGG-19's are missing too, one error names both."""
    if not random_init:
        _fetch_missing(clip_model, clip_pretrained, clip_weights, vgg_weights, cache_dir)
    clip = load_clip(
        clip_model, clip_pretrained, None if random_init else clip_weights, device, cache_dir, random_init=random_init
    )
    vgg = load_vgg(vgg_weights, device, progress=progress, random_init=random_init)
    return Models(clip, vgg, models_info(clip_model, clip_pretrained, clip_weights, vgg_weights, random_init))


def models_info(
    clip_model: str = CLIP_MODEL,
    clip_pretrained: str | None = CLIP_PRETRAINED,
    clip_weights: str | Path | None = None,
    vgg_weights: str | Path | None = None,
    random_init: bool = False,
) -> dict:
    """What load_models with these arguments loads (Models.info), known without loading anything."""
    return {
        "clip_model": clip_model,
        "clip_pretrained": "random" if random_init else (None if clip_weights else clip_pretrained),
        "clip_weights": None if clip_weights is None else Path(clip_weights).name,
        "vgg_weights": "random" if random_init else (None if vgg_weights is None else Path(vgg_weights).name),
    }


@functools.cache
def default_models(device: torch.device) -> Models:
    """The default models (CLIP ViT-B/32 with OpenAI's weights, VGG-19 ImageNet) on ``device``,
    loaded on the first call and shared by later ones (``stylize`` without ``models``)."""
    return load_models(device=device)
