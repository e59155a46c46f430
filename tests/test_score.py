"""Quality metrics (clipstyle.evaluation.metrics) and the score command, on tiny random models."""

from __future__ import annotations

import json
import math
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clipstyle.evaluation import metrics
from clipstyle.method.text import text_embedding
from clipstyle.prompts import NO_TEMPLATES

from conftest import DEVICE, counting_loader, invoke


def structured(h=24, w=32, seed=0):
    """A (1, 3, H, W) image with gradients and noise: something for every metric to see."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = torch.stack([xx, yy, (xx + yy) / 2])[None]
    return (0.7 * base + 0.3 * torch.rand(1, 3, h, w, generator=g)).clamp(0, 1)


@pytest.fixture(autouse=True)
def no_lpips(monkeypatch):
    """The real lpips package would download weights: tests see it absent unless they fake it."""
    monkeypatch.setitem(sys.modules, "lpips", None)


# --- SSIM ---------------------------------------------------------------------


def reference_ssim(a, b, window=11, sigma=1.5):
    """SSIM written out window by window in numpy, from Wang et al. (2004), for comparison."""
    w = np.array([0.299, 0.587, 0.114])
    x = np.tensordot(w, a[0].double().numpy(), axes=1)
    y = np.tensordot(w, b[0].double().numpy(), axes=1)
    r = np.arange(window) - (window - 1) / 2
    g = np.exp(-(r**2) / (2 * sigma**2))
    k = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for i in range(x.shape[0] - window + 1):
        for j in range(x.shape[1] - window + 1):
            px, py = x[i : i + window, j : j + window], y[i : i + window, j : j + window]
            mx, my = (k * px).sum(), (k * py).sum()
            vx, vy = (k * (px - mx) ** 2).sum(), (k * (py - my) ** 2).sum()
            cov = (k * (px - mx) * (py - my)).sum()
            values.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


@pytest.mark.device
def test_ssim_matches_a_window_by_window_reference():
    a, b = structured(seed=1), structured(seed=2)
    da, db = a.to(DEVICE), b.to(DEVICE)
    assert metrics.ssim(da, db) == pytest.approx(reference_ssim(a, b), abs=1e-9)
    assert metrics.ssim(da, db) == pytest.approx(metrics.ssim(db, da), abs=1e-12)


@pytest.mark.device
def test_ssim_is_one_for_identical_images_and_falls_with_noise():
    a = structured().to(DEVICE)
    assert metrics.ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(a.shape, generator=g).to(DEVICE)
    values = [metrics.ssim(a, (a + s * noise).clamp(0, 1)) for s in (0.02, 0.1, 0.3)]
    assert 1.0 > values[0] > values[1] > values[2]


@pytest.mark.device
def test_ssim_works_on_images_smaller_than_the_window():
    a = structured(6, 9).to(DEVICE)
    assert metrics.ssim(a, a) == pytest.approx(1.0)
    assert math.isfinite(metrics.ssim(a, structured(6, 9, seed=5).to(DEVICE)))


# --- CLIP metrics -----------------------------------------------------------------


def test_patch_boxes_follow_appendix_b3_and_repeat_with_the_seed():
    boxes = metrics.patch_boxes(512, 384, seed=4)
    assert len(boxes) == 64
    for top, left, side in boxes:
        assert 64 <= side <= 224 and 0 <= top <= 512 - side and 0 <= left <= 384 - side
    assert boxes == metrics.patch_boxes(512, 384, seed=4)
    assert boxes != metrics.patch_boxes(512, 384, seed=5)
    # sides vary (random crop sizes, not one fixed size)
    assert len({side for _, _, side in boxes}) > 10


@pytest.mark.device
def test_clip_score_is_the_cosine_of_prompt_and_image(models):
    image = structured().to(DEVICE)
    text = text_embedding(models, "fire", NO_TEMPLATES)
    with torch.no_grad():
        emb = models.clip.encode_image(image)[0]
        expected = F.cosine_similarity(emb, models.clip.encode_text(["fire"])[0], dim=0)
    assert metrics.clip_score(models.clip, image, text) == pytest.approx(float(expected), abs=1e-5)


@pytest.mark.device
def test_patch_score_with_whole_image_crops_equals_the_clip_score(models):
    image = structured(32, 32).to(DEVICE)
    text = text_embedding(models, "stone wall", NO_TEMPLATES)
    whole = metrics.patch_clip_score(models.clip, image, text, n=5, image_size=32, min_size=32, max_size=32)
    assert whole == pytest.approx(metrics.clip_score(models.clip, image, text), abs=1e-5)


@pytest.mark.device
def test_patch_score_repeats_with_its_seed_and_depends_on_the_crops(models):
    image = structured(24, 32).to(DEVICE)
    text = text_embedding(models, "mosaic", NO_TEMPLATES)
    a = metrics.patch_clip_score(models.clip, image, text, n=8, seed=1)
    assert a == metrics.patch_clip_score(models.clip, image, text, n=8, seed=1)
    assert a != metrics.patch_clip_score(models.clip, image, text, n=8, seed=2)


@pytest.mark.device
def test_directional_similarity_is_one_minus_the_loss_and_antisymmetric(models):
    from clipstyle.method import losses as L

    out, content = structured(seed=1).to(DEVICE), structured(seed=2).to(DEVICE)
    text_dir = L.text_direction(
        text_embedding(models, "neon", NO_TEMPLATES), text_embedding(models, "a Photo", NO_TEMPLATES)
    )
    forward = metrics.directional_similarity(models.clip, out, content, text_dir)
    backward = metrics.directional_similarity(models.clip, content, out, text_dir)
    assert forward == pytest.approx(-backward, abs=1e-5)
    with torch.no_grad():
        e = F.normalize(models.clip.encode_image(torch.cat([out, content])), dim=-1)
    loss = L.directional_loss(e[:1], e[1], text_dir)[0]
    assert forward == pytest.approx(1 - float(loss), abs=1e-5)
    assert metrics.directional_similarity(models.clip, out, out, text_dir) == 0.0


@pytest.mark.device
def test_content_distance_is_the_loss_zero_on_itself_and_grows_with_change(models):
    a = structured(seed=1).to(DEVICE)
    assert metrics.content_distance(models.vgg, a, a) == 0.0
    near = metrics.content_distance(models.vgg, a, (a + 0.05).clamp(0, 1))
    far = metrics.content_distance(models.vgg, a, 1 - a)
    assert 0 < near < far


# --- all metrics, LPIPS optional --------------------------------------------------


@pytest.mark.device
def test_self_score_has_zero_content_distance_and_a_note_without_lpips(models):
    a = structured().to(DEVICE)
    fn, note = metrics.load_lpips()
    assert fn is None and "lpips" in note and "not installed" in note
    s = metrics.score_image(models, a, a, "fire", templates=NO_TEMPLATES, patch_crops=4, lpips_note=note)
    assert s.content_distance == 0.0 and s.ssim == pytest.approx(1.0) and s.directional_similarity == 0.0
    assert s.lpips is None and s.notes == [note] and s.finite()
    assert set(metrics.METRIC_NAMES) <= set(s.to_dict())


def test_images_of_different_sizes_are_refused(models):
    with pytest.raises(ValueError, match="differ in size"):
        metrics.score_image(models, structured(24, 32), structured(32, 32), "x", templates=NO_TEMPLATES)


def fake_lpips_module(calls):
    class LPIPS(torch.nn.Module):
        def __init__(self, net="alex", verbose=True):
            super().__init__()
            print("Setting up [LPIPS] perceptual loss")  # the real package prints; we must not
            calls.append(net)
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, a, b, normalize=False):
            calls.append(normalize)
            return ((a - b) ** 2).mean(dim=(1, 2, 3), keepdim=True) * self.w

    return types.SimpleNamespace(LPIPS=LPIPS)


@pytest.mark.device
def test_lpips_is_used_when_package_and_weights_exist_and_stays_silent(monkeypatch, tmp_path, capsys, models):
    calls = []
    monkeypatch.setitem(sys.modules, "lpips", fake_lpips_module(calls))
    weights = tmp_path / "alexnet.pth"
    monkeypatch.setattr(metrics, "_alexnet_weights_file", lambda: str(weights))
    fn, note = metrics.load_lpips(DEVICE)
    assert fn is None and "not in the cache" in note and calls == []  # never constructed: it would download
    weights.write_bytes(b"x")
    fn, note = metrics.load_lpips(DEVICE)
    assert note is None and calls == ["alex"]
    a, b = structured(seed=1), structured(seed=2)
    s = metrics.score_image(
        models, a.to(DEVICE), b.to(DEVICE), "fire", templates=NO_TEMPLATES, patch_crops=2, lpips_fn=fn
    )
    assert s.lpips == pytest.approx(float(((a - b) ** 2).mean())) and calls[-1] is True  # [0, 1] inputs
    assert capsys.readouterr().out == ""


# --- the command ----------------------------------------------------------------


@pytest.fixture
def fake_loader(monkeypatch):
    return counting_loader(monkeypatch, "score")


def test_score_json_self_score_and_different_sizes(tmp_path, photo, fake_loader):
    small = tmp_path / "styled.png"
    Image.open(photo).resize((32, 24)).rotate(180).save(small)  # another size than the content
    result = invoke(
        "score", str(photo), str(small), "-p", "starry night", "--content", str(photo), "--json", "--patch-crops", "4"
    )
    assert result.exit_code == 0, result.output
    own, styled = [json.loads(line) for line in result.output.splitlines()]
    assert len(fake_loader) == 1
    for record in (own, styled):
        for name in ("clip_score", "patch_clip_score", "directional_similarity", "content_distance", "ssim"):
            assert math.isfinite(record[name])
        assert record["lpips"] is None and "lpips" in record["notes"][0]
        assert record["templates"] == "imagenet-79" and record["prompt"] == "starry night"
        assert record["models"] == {
            "clip_model": "tiny",
            "clip_pretrained": "random",
            "clip_weights": None,
            "vgg_weights": "random",
        }
    assert own["content_distance"] == 0.0 and own["ssim"] == pytest.approx(1.0)
    assert styled["size"] == [32, 24] and styled["content_distance"] > 0 and styled["ssim"] < 0.9


def test_templates_choose_the_text_embedding(tmp_path, photo, fake_loader):
    templates = tmp_path / "templates.txt"
    templates.write_text("a painting of {}.\nart of the {}.\n")
    args = ["score", str(photo), "-p", "fire", "--content", str(photo), "--json", "--patch-crops", "2"]
    with_templates = json.loads(invoke(*args, "--templates", str(templates)).output)
    plain = json.loads(invoke(*args, "--no-templates").output)
    assert plain["templates"] == "none" and with_templates["templates"] == "templates.txt (2)"
    assert plain["clip_score"] != with_templates["clip_score"]
    assert plain["content_distance"] == with_templates["content_distance"] == 0.0  # text plays no part


def test_bad_files_are_reported_one_line_each_and_the_rest_scored(tmp_path, photo, fake_loader):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    result = invoke("score", broken, photo, tmp_path / "gone.png", "-p", "x", "--content", photo, "--patch-crops", "2")
    assert result.exit_code == 1
    lines = result.output.splitlines()
    # one line per bad file, naming it (the reasons are clipstyle.images' to word)
    assert sum(line.startswith(f"clipstyle: error: {broken}: ") for line in lines) == 1
    assert sum(line.startswith(f"clipstyle: error: {tmp_path / 'gone.png'}: ") for line in lines) == 1
    assert any(line.startswith(f"{photo}: clip_score ") and "content_distance 0.0000" in line for line in lines)


def test_score_reads_run_reports(tmp_path, photo, fake_loader):
    out = tmp_path / "out.png"
    Image.open(photo).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(out)
    report = tmp_path / "runs.jsonl"
    records = [
        {"input": str(photo), "prompt": "ink", "output": str(tmp_path / "failed.png"), "status": "failed"},
        {"input": str(photo), "prompt": "fire", "output": str(out), "status": "ok"},
    ]
    report.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = invoke("score", "--report", str(report), "--json", "--patch-crops", "2")
    assert result.exit_code == 0, result.output
    (record,) = [json.loads(line) for line in result.output.splitlines()]
    assert (record["image"], record["content"], record["prompt"]) == (str(out), str(photo), "fire")


def test_usage_errors_need_no_models(photo, fake_loader):
    result = invoke("score", photo)
    assert result.exit_code == 2 and "--prompt and --content" in result.output
    assert fake_loader == []
