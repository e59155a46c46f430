"""Loading the frozen encoders from local files in the real formats, and the
one-line explanation when weights are neither cached nor reachable.

The weight files are random weights in the real architectures, written by
the tests (tests/checkpoints.py); nothing is downloaded.
"""

from __future__ import annotations

import copy
import urllib.error
import warnings

import pytest
import torch

from clipstyle.errors import WeightsError
from clipstyle.models.encoders import IMAGENET_MEAN, IMAGENET_STD
from clipstyle.models.loading import load_clip, load_vgg

from checkpoints import checkpoints, hub_cache  # noqa: F401  (a fixture)
from conftest import DEVICE


def offline(*args, **kwargs):
    raise urllib.error.URLError("[Errno 101] Network is unreachable")


def assert_weights_equal(model: torch.nn.Module, written: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    assert set(loaded) == set(written)
    different = [k for k in written if not torch.equal(loaded[k], written[k].to(loaded[k].dtype))]
    assert different == []


def assert_quick_gelu(clip) -> None:
    from open_clip.transformer import QuickGELU

    blocks = [*clip.model.visual.transformer.resblocks, *clip.model.transformer.resblocks]
    assert len(blocks) == 24
    assert all(isinstance(b.mlp.gelu, QuickGELU) for b in blocks)


@pytest.fixture(scope="module")
def clip_from_state_dict(checkpoints):  # noqa: F811
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clip = load_clip("ViT-B-32", "openai", weights=checkpoints.clip)
    return clip, caught


# CLIP ----------------------------------------------------------------------------


def test_clip_from_a_local_state_dict_has_the_written_weights(clip_from_state_dict, checkpoints):  # noqa: F811
    clip, caught = clip_from_state_dict
    assert_weights_equal(clip.model, checkpoints.clip_state())
    assert_quick_gelu(clip)  # OpenAI's weights were trained with QuickGELU
    assert not [w for w in caught if "QuickGELU" in str(w.message)]
    assert clip.image_size == (224, 224) and clip.context_length == 77


@pytest.mark.device
def test_clip_encoder_is_frozen_but_passes_gradients_to_the_images(clip_from_state_dict):
    clip, _ = clip_from_state_dict
    if DEVICE.type != "cpu":  # a copy: the module's other tests compare its weights on the CPU
        clip = copy.deepcopy(clip).to(DEVICE)
    assert not any(m.training for m in clip.model.modules())  # dropout and the like off
    assert not any(p.requires_grad for p in clip.parameters())
    images = torch.rand(1, 3, 40, 64).to(DEVICE).requires_grad_()  # any size: resized to 224x224
    emb = clip.encode_image(images)
    assert emb.shape == (1, 512) and torch.isfinite(emb).all()
    emb.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    with torch.no_grad():
        text = clip.encode_text(["a Photo", "starry night"])
    assert text.shape == (2, 512) and not torch.allclose(text[0], text[1])
    assert clip.token_count("starry night") == 4  # start, 2 words, end


def test_openai_torchscript_file_loads_without_running_its_code(checkpoints, monkeypatch):  # noqa: F811
    from clipstyle.models.weights import read_torchscript_tensors

    def refuse(*args, **kwargs):
        raise AssertionError("torch.jit.load would run the archive's code")

    monkeypatch.setattr(torch.jit, "load", refuse)
    # the archive holds what OpenAI's files hold: top-level names, and the three scalars
    names = read_torchscript_tensors(checkpoints.clip_openai_pt)
    for key in (
        "visual.conv1.weight",
        "positional_embedding",
        "text_projection",
        "logit_scale",
        "transformer.resblocks.0.attn.in_proj_weight",
        "input_resolution",
        "context_length",
        "vocab_size",
    ):
        assert key in names
    assert names["visual.conv1.weight"].dtype == torch.float16
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clip = load_clip("ViT-B-32", "openai", weights=checkpoints.clip_openai_pt)
    assert_weights_equal(clip.model, checkpoints.clip_state())
    assert_quick_gelu(clip)
    assert not [w for w in caught if "QuickGELU" in str(w.message)]


def test_openai_tag_loads_from_the_cache_with_quick_gelu_and_no_mismatch_warning(
    checkpoints,
    monkeypatch,  # noqa: F811
    recwarn,
):
    import open_clip.factory

    # the tag's weights are "in the cache": open_clip's own download step returns our file
    # (and the hub counts as reachable, without asking the network)
    monkeypatch.setattr("clipstyle.models.loading.hub_unreachable", lambda: None)
    monkeypatch.setattr(open_clip.factory, "download_pretrained", lambda cfg, **kwargs: str(checkpoints.clip))
    monkeypatch.setattr(open_clip.factory, "download_pretrained_from_hf", offline)
    clip = load_clip("ViT-B-32", "openai")
    assert not [w for w in recwarn if "QuickGELU" in str(w.message)]
    assert_quick_gelu(clip)
    assert_weights_equal(clip.model, checkpoints.clip_state())


def test_clip_built_without_initialisation_matches_open_clips_own_build(clip_from_state_dict, checkpoints):  # noqa: F811
    import open_clip

    # the model is built on the meta device and filled from the file: every tensor
    # must be real, and the causal text mask (in no file) must be open_clip's own
    clip, _ = clip_from_state_dict
    assert not [name for name, t in [*clip.model.named_parameters(), *clip.model.named_buffers()] if t.is_meta]
    reference = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None).eval()
    reference.load_state_dict({k: v.float() for k, v in checkpoints.clip_state().items()})
    assert dict(clip.model.named_buffers()).keys() == dict(reference.named_buffers()).keys()
    assert torch.equal(clip.model.attn_mask, reference.attn_mask)
    tokens = clip.tokenizer(["a watercolour painting", "x"])
    with torch.no_grad():
        torch.testing.assert_close(clip.model.encode_text(tokens), reference.encode_text(tokens))


def test_openai_tag_in_a_warm_hub_cache_loads_without_asking_the_network(checkpoints, monkeypatch, tmp_path):  # noqa: F811
    import open_clip
    import open_clip.factory

    repo = open_clip.get_pretrained_cfg("ViT-B-32", "openai")["hf_hub"].strip("/")
    hub_cache(tmp_path, repo, "open_clip_pytorch_model.bin", checkpoints.clip)
    monkeypatch.setattr(open_clip.factory, "download_pretrained", offline)  # any download attempt fails
    monkeypatch.setattr(open_clip.factory, "download_pretrained_from_hf", offline)
    clip = load_clip("ViT-B-32", "openai", cache_dir=str(tmp_path))
    assert_weights_equal(clip.model, checkpoints.clip_state())
    assert_quick_gelu(clip)


def test_a_corrupt_file_in_the_hub_cache_is_named_in_one_line(monkeypatch, tmp_path):
    import open_clip
    import open_clip.factory

    broken = tmp_path / "broken.bin"
    broken.write_bytes(b"PK\x03\x04 half a download")
    repo = open_clip.get_pretrained_cfg("ViT-B-32", "openai")["hf_hub"].strip("/")
    hub_cache(tmp_path / "hub", repo, "open_clip_pytorch_model.bin", broken)
    monkeypatch.setattr(open_clip.factory, "download_pretrained", offline)
    with pytest.raises(WeightsError) as err:
        load_clip("ViT-B-32", "openai", cache_dir=str(tmp_path / "hub"))
    message = str(err.value)
    assert "open_clip_pytorch_model.bin" in message and "not a readable weights file" in message
    assert "\n" not in message


def test_clip_weights_of_another_architecture_are_refused_naming_the_file(tmp_path):
    # ViT-B-16's patch embedding and position table, and nothing else
    path = tmp_path / "vit-b-16.pt"
    torch.save(
        {
            "visual.conv1.weight": torch.zeros(768, 3, 16, 16, dtype=torch.float16),
            "visual.positional_embedding": torch.zeros(197, 768, dtype=torch.float16),
        },
        path,
    )
    with pytest.raises(WeightsError) as err:
        load_clip("ViT-B-32", "openai", weights=path)
    message = str(err.value)
    assert str(path) in message and "ViT-B-32" in message
    assert "another shape" in message and "missing" in message
    assert "\n" not in message


def test_clip_weights_neither_cached_nor_reachable_explain_themselves(monkeypatch, tmp_path):
    import open_clip.factory

    monkeypatch.setattr(open_clip.factory, "download_pretrained", offline)
    monkeypatch.setattr(open_clip.factory, "download_pretrained_from_hf", offline)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(WeightsError) as err:
        load_clip("ViT-B-32", "openai")
    message = str(err.value)
    assert "ViT-B-32/openai" in message  # which weights
    assert str(tmp_path / "hf" / "hub") in message  # where they were looked for
    assert "--clip-weights" in message  # how to provide them
    assert "\n" not in message


# VGG-19 ----------------------------------------------------------------------------


def torchvision_features(state: dict[str, torch.Tensor]) -> torch.nn.Sequential:
    """torchvision's own vgg19().features with the given trunk weights ("N.*" keys)."""
    import torchvision

    with torch.device("meta"):
        model = torchvision.models.vgg19()
    features = model.features.to_empty(device="cpu")
    features.load_state_dict({k: v.float() for k, v in state.items()})
    return features.eval()


@pytest.mark.parametrize("which", ["vgg", "vgg_trunk"], ids=["full-state-dict", "trunk-only-fp16"])
def test_vgg_features_are_torchvisions_relu4_2_and_relu5_2(checkpoints, which):  # noqa: F811
    path = getattr(checkpoints, which)
    state = torch.load(path, map_location="cpu", weights_only=True)
    trunk = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier.")}
    reference = torchvision_features(trunk)
    vgg = load_vgg(path)
    assert not any(p.requires_grad for p in vgg.parameters())

    images = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(0))
    normalised = (images - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        ours = vgg(images)
        relu4_2 = reference[:23](normalised.clone())
        conv4_2 = reference[:22](normalised.clone())
        relu5_2 = reference[:32](normalised.clone())
    assert set(ours) == {"relu4_2", "relu5_2"}
    torch.testing.assert_close(ours["relu4_2"], relu4_2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours["relu5_2"], relu5_2, rtol=1e-4, atol=1e-5)
    # the layer choice is visible: the convolution's output has negative values, the ReLU's has none
    assert (conv4_2 < 0).any() and (relu4_2 > 0).any()
    assert not torch.allclose(relu4_2, conv4_2)


def test_vgg_weights_in_torch_hubs_cache_are_used_without_torchvisions_loader(checkpoints, monkeypatch, tmp_path):  # noqa: F811
    import shutil

    import torchvision.models._api

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    shutil.copyfile(checkpoints.vgg, cache / "vgg19-dcbb9e9d.pth")
    vgg = load_vgg()
    written = checkpoints.vgg_state()
    loaded = vgg.features.state_dict()
    assert len(loaded) == 28  # the 14 convolutions up to relu5_2, weight and bias each
    assert all(torch.equal(v, written[f"features.{k}"]) for k, v in loaded.items())
    assert not any(t.is_meta for t in vgg.parameters())


def test_vgg_weights_neither_cached_nor_reachable_explain_themselves(monkeypatch, tmp_path):
    import torchvision.models._api

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsError) as err:
        load_vgg()
    message = str(err.value)
    assert "VGG-19" in message and "vgg19-dcbb9e9d.pth" in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in message
    assert "--vgg-weights" in message
    assert "\n" not in message


def test_vgg_weights_of_another_network_are_refused(tmp_path):
    path = tmp_path / "vgg16.pth"
    torch.save(
        {
            "features.0.weight": torch.zeros(64, 3, 3, 3),
            "features.0.bias": torch.zeros(64),
            "features.28.weight": torch.zeros(512, 512, 3, 3),
        },
        path,
    )
    with pytest.raises(WeightsError) as err:
        load_vgg(path)
    assert str(path) in str(err.value) and "vgg19" in str(err.value)
