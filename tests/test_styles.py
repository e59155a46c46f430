"""Saved styles (issue 6): the file format, refusing unsafe files, rendering, tiles, strength, mix."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clipstyle.errors import OutputError
from clipstyle.method.unet import StyleNet
from clipstyle.styles.rendering import _windows, mix_weights, render, tile_starts
from clipstyle.styles.stylefile import FORMAT_KEY, StyleError, load_style, save_style, style_metadata

from conftest import DEVICE


def net(seed: int) -> StyleNet:
    torch.manual_seed(seed)
    return StyleNet().eval()


def picture(h: int, w: int) -> torch.Tensor:
    """Gradients, a wave and a flat block: content whose statistics differ from tile to tile."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    img = torch.stack([xx, yy, 0.5 + 0.5 * torch.sin(12 * xx) * torch.cos(9 * yy)])[None]
    img[..., h // 4 : h // 2, w // 3 : 2 * w // 3] = torch.tensor([0.9, 0.9, 0.1])[:, None, None]
    return img


class Marker:
    """Unpickling this creates a file: a stand-in for code a hostile file would run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# --- the file format -------------------------------------------------------------------------------------


def test_saved_style_restores_the_same_network_and_metadata(tmp_path):
    a = net(1)
    path = tmp_path / "ink.style"
    meta = style_metadata(prompt="ink wash painting", seed=3, trained_size=(512, 304))
    save_style(path, a, meta)
    style = load_style(path)
    assert style.metadata == meta and style.width == 16 and style.name == "ink"
    assert not style.network.training
    x = torch.rand(1, 3, 37, 53)
    with torch.no_grad():
        assert torch.equal(style.network(x), a(x))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:  # a plain safetensors file any tool can read
        header = f.metadata()
    assert header[FORMAT_KEY] == "1" and json.loads(header["clipstyle.metadata"])["prompt"] == "ink wash painting"


def test_save_never_overwrites_unless_asked(tmp_path):
    path = tmp_path / "a.style"
    path.write_bytes(b"mine")
    with pytest.raises(OutputError):
        save_style(path, net(0), {"prompt": "x"})
    assert path.read_bytes() == b"mine"
    save_style(path, net(0), {"prompt": "x"}, overwrite=True)
    assert load_style(path).metadata == {"prompt": "x"}
    assert [p.name for p in tmp_path.iterdir()] == ["a.style"]  # no temporary file left behind


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_a_file_that_would_run_code_is_refused_and_runs_nothing(tmp_path, how):
    marker = tmp_path / "marker"
    data = pickle.dumps({"stem.weight": Marker(marker)})
    pickle.loads(data)  # the file is really hostile: plain unpickling creates the marker
    assert marker.exists()
    marker.unlink()
    path = tmp_path / "evil.style"
    if how == "pickle":
        path.write_bytes(data)
    else:
        torch.save({"stem.weight": Marker(marker)}, path)
    with pytest.raises(StyleError) as err:
        load_style(path)
    assert "refused" in err.value.reason and "could run code" in err.value.reason
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)
    assert not marker.exists()


def _safetensors(path, tensors, header):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=header)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", "not found"),
        ("empty", "empty"),
        ("text", "not a clipstyle style file"),
        ("foreign", "not a clipstyle style"),
        ("future", "not supported"),
        ("shapes", "another shape"),
        ("missing tensors", "missing"),
        ("nan", "NaN"),
        ("truncated", "not a readable safetensors file"),
    ],
)
def test_foreign_or_broken_files_are_refused_with_one_line(tmp_path, case, expected):
    path = tmp_path / "bad.style"
    good = {k: v.clone() for k, v in net(0).state_dict().items()}
    header = {FORMAT_KEY: "1", "clipstyle.width": "16", "clipstyle.metadata": "{}"}
    if case == "empty":
        path.write_bytes(b"")
    elif case == "text":
        path.write_text("not a style at all, just text\n")
    elif case == "foreign":
        _safetensors(path, good, {"format": "pt"})
    elif case == "future":
        _safetensors(path, good, {**header, FORMAT_KEY: "99"})
    elif case == "shapes":
        _safetensors(path, {**good, "stem.weight": torch.zeros(8, 3, 1, 1)}, header)
    elif case == "missing tensors":
        _safetensors(path, {k: v for k, v in good.items() if k != "to_rgb.bias"}, header)
    elif case == "nan":
        good["to_rgb.bias"][0] = float("nan")
        _safetensors(path, good, header)
    elif case == "truncated":
        save_style(path, net(0), {})
        path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(StyleError) as err:
        load_style(path)
    assert expected in err.value.reason
    assert err.value.path == str(path) and "\n" not in str(err.value)


# --- rendering -------------------------------------------------------------------------------------------


@pytest.mark.device
def test_render_keeps_any_size_and_equals_one_forward_pass():
    a = net(2).to(DEVICE)
    x = torch.rand(1, 3, 37, 61).to(DEVICE)  # neither side a multiple of 8
    y = render(a, x)
    assert y.shape == x.shape
    with torch.no_grad():
        assert torch.equal(y, a(x))


@pytest.mark.device
def test_mix_zero_and_one_equal_each_style_exactly_and_between_is_the_pixel_blend():
    a, b = net(3).to(DEVICE), net(4).to(DEVICE)
    x = torch.rand(1, 3, 40, 48).to(DEVICE)
    ya, yb = render(a, x), render(b, x)
    assert not torch.allclose(ya, yb)
    assert torch.equal(render([a, b], x, mix=[1.0, 0.0]), ya)
    assert torch.equal(render([a, b], x, mix=[0.0, 1.0]), yb)
    torch.testing.assert_close(render([a, b], x, mix=[0.7, 0.3]), 0.7 * ya + 0.3 * yb)
    with pytest.raises(ValueError):
        mix_weights(2, [0.7, 0.7])


@pytest.mark.device
def test_strength_is_a_linear_blend_with_the_input():
    a = net(5).to(DEVICE)
    x = torch.rand(1, 3, 24, 40).to(DEVICE)
    full = render(a, x)
    assert torch.equal(render(a, x, strength=0.0), x)
    assert torch.equal(render(a, x, strength=1.0), full)
    torch.testing.assert_close(render(a, x, strength=0.25), 0.75 * x + 0.25 * full)


@pytest.mark.device
def test_tiles_match_a_whole_pass_away_from_the_borders():
    """InstanceNorm statistics are the whole image's (tile_stats="image"), so tiles
    agree with a whole pass up to their missing context; per-tile statistics
    disagree several times more. Tiles of 96 on a 128 x 192 image are a hard case:
    the default (1024) leaves far less of each tile near an edge."""
    a = net(0).to(DEVICE)
    x = picture(128, 192).to(DEVICE)
    whole = render(a, x, tile=0)
    tiled = render(a, x, tile=96, overlap=24)
    per_tile = render(a, x, tile=96, overlap=24, tile_stats="tile")
    inner = (slice(None), slice(None), slice(16, -16), slice(16, -16))
    err = (tiled - whole).abs()[inner].mean().item()
    err_tile = (per_tile - whole).abs()[inner].mean().item()
    spread = whole.std().item()
    assert err < 0.2 * spread  # measured 0.12-0.14 x spread over seeds 0-2
    assert err < 0.5 * err_tile  # measured about 0.25
    # A whole-image tile plan reduces to one pass, bit for bit.
    assert torch.equal(render(a, x, tile=192, overlap=24), whole)


@settings(max_examples=60, deadline=None)
@given(length=st.integers(1, 5000), tile=st.sampled_from([64, 128, 520, 1024]), frac=st.floats(0, 1))
def test_tile_windows_cover_the_axis_with_cores_that_partition_it(length, tile, frac):
    overlap = int(frac * (tile // 2 - 8))
    windows = _windows(length, tile, overlap)
    starts = tile_starts(length, tile, overlap)
    assert [w[0] for w in windows] == starts and starts[0] == 0
    assert all(s % 8 == 0 for s in starts)
    assert windows[-1][1] == length
    for (s0, e0, _, c1), (s1, e1, c2, _) in zip(windows, windows[1:]):
        assert e0 - s1 >= overlap  # neighbours overlap by at least `overlap`
        assert c1 == c2 and s1 <= c1 <= e0  # the core cut lies inside the overlap
    assert windows[0][2] == 0 and windows[-1][3] == length
    assert all(e - s <= tile and s <= cs < ce <= e for s, e, cs, ce in windows)


class RunsOutOnce(StyleNet):
    """Runs out of memory on its first pass, holding a tensor as a real pass holds its activations."""

    def __init__(self):
        super().__init__()
        self.held = None  # a weak reference to what the failed pass allocated
        self.freed_before_retry: list[bool] = []

    def forward(self, x):
        import weakref

        if self.held is None:
            activations = torch.empty(1000, 1000, device=x.device)
            self.held = weakref.ref(activations)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.freed_before_retry.append(self.held() is None)
        return super().forward(x)


@pytest.mark.device
def test_an_out_of_memory_whole_pass_is_retried_in_tiles_after_its_memory_is_freed():
    torch.manual_seed(0)
    failing = RunsOutOnce().eval()
    image = picture(300, 260).to(DEVICE)
    styled = render(failing, image, tile_stats="tile")
    # the retry ran (in tiles) only once the failed pass's tensors were gone
    assert failing.freed_before_retry and all(failing.freed_before_retry)
    torch.manual_seed(0)
    plain = StyleNet().eval().to(DEVICE)
    torch.testing.assert_close(styled, render(plain, image, tile=1024, tile_stats="tile"))
