"""The loss terms pinned by hand-computed values (CLIPstyler, section 3)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipstyle.method import losses as L

# Total variation -------------------------------------------------------------


def test_tv_of_a_constant_image_is_zero():
    images = torch.full((2, 3, 9, 7), 0.37)
    assert torch.equal(L.total_variation(images), torch.zeros(2))


def test_tv_of_a_2x2_image_is_the_sum_of_four_plain_l2_norms():
    # [[a, b], [c, d]]: horizontal (a-b, c-d), vertical (a-c, b-d), diagonals (c-b) and (a-d).
    a, b, c, d = 0.1, 0.2, 0.3, 0.5
    image = torch.tensor([[a, b], [c, d]]).view(1, 1, 2, 2)
    expected = math.hypot(a - b, c - d) + math.hypot(a - c, b - d) + abs(c - b) + abs(a - d)
    assert L.total_variation(image).item() == pytest.approx(expected, rel=1e-6)


def test_tv_norms_run_over_all_channels_of_one_image_and_are_per_image():
    one = torch.tensor([[0.1, 0.2], [0.3, 0.5]]).view(1, 1, 2, 2)
    three = one.expand(1, 3, 2, 2)
    # the same differences in 3 channels: each L2 norm grows by sqrt(3), not 3 (not squared)
    assert L.total_variation(three).item() == pytest.approx(math.sqrt(3) * L.total_variation(one).item(), rel=1e-6)
    batch = torch.cat([three, torch.zeros(1, 3, 2, 2), 2 * three])
    tv = L.total_variation(batch)
    assert tv.shape == (3,)
    assert tv[1] == 0
    assert tv[2].item() == pytest.approx(2 * tv[0].item(), rel=1e-6)


# Directional loss --------------------------------------------------------------


def unit(*values):
    return F.normalize(torch.tensor(values, dtype=torch.float32), dim=-1)


def test_directional_loss_is_zero_when_aligned_two_when_opposite_one_when_orthogonal():
    source = unit(1.0, 0.0, 0.0)
    image = torch.tensor([[0.0, 7.0, 0.0]])  # normalised first: (0, 1, 0); minus source: (-1, 1, 0)
    aligned = unit(-1.0, 1.0, 0.0)
    assert L.directional_loss(image, source, aligned).item() == pytest.approx(0.0, abs=1e-6)
    assert L.directional_loss(image, source, -aligned).item() == pytest.approx(2.0, abs=1e-6)
    assert L.directional_loss(image, source, unit(0.0, 0.0, 1.0)).item() == pytest.approx(1.0, abs=1e-6)


def test_directional_loss_normalises_the_image_embedding_before_the_difference():
    source = unit(1.0, 0.0)
    text_dir = unit(-1.0, 1.0)
    # normalise(image) = (0, 1) for every scale, so the direction (-1, 1) is the text direction.
    for scale in (0.01, 1.0, 100.0):
        image = torch.tensor([[0.0, scale]])
        assert L.directional_loss(image, source, text_dir).item() == pytest.approx(0.0, abs=1e-5)


def test_directional_loss_is_one_value_per_row_with_broadcast_source_and_direction():
    source = unit(1.0, 0.0, 0.0)
    text_dir = unit(0.0, 1.0, 0.0)
    images = torch.tensor([[1.0, 1.0, 0.0], [1.0, -1.0, 0.0], [1.0, 0.0, 1.0]])
    per_row = L.directional_loss(images, source, text_dir)
    assert per_row.shape == (3,)
    one_by_one = torch.cat([L.directional_loss(images[i : i + 1], source, text_dir) for i in range(3)])
    torch.testing.assert_close(per_row, one_by_one)
    # per-row sources and directions give the same as broadcast ones
    torch.testing.assert_close(L.directional_loss(images, source.expand(3, -1), text_dir.expand(3, -1)), per_row)
    assert per_row[0] < per_row[2] < per_row[1]  # towards, across, against the direction


def test_directional_loss_gradient_moves_the_image_along_the_text_direction():
    source = unit(1.0, 0.0, 0.0)
    text_dir = unit(0.0, 1.0, 0.0)
    image = torch.tensor([[1.0, 0.1, 0.2]], requires_grad=True)
    L.directional_loss(image, source, text_dir).sum().backward()
    assert image.grad[0, 1] < 0  # descending the loss increases the text-direction component


def test_text_direction_is_normalised_style_minus_source():
    style, source = torch.tensor([3.0, 1.0]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(L.text_direction(style, source), torch.tensor([1.0, 0.0]))


# Threshold rejection -----------------------------------------------------------


def test_threshold_rejection_zeroes_exactly_the_patches_under_tau():
    losses = torch.tensor([0.1, 0.69, 0.7, 0.9, 1.5])
    torch.testing.assert_close(L.reject_below(losses, 0.7), torch.tensor([0.0, 0.0, 0.7, 0.9, 1.5]))


def test_rejected_patches_pass_no_gradient():
    losses = torch.tensor([0.3, 0.8, 1.2], requires_grad=True)
    L.reject_below(losses, 0.7).mean().backward()
    torch.testing.assert_close(losses.grad, torch.tensor([0.0, 1 / 3, 1 / 3]))


# Content loss ------------------------------------------------------------------


def test_content_loss_of_identical_features_is_zero():
    torch.manual_seed(0)
    feats = {"relu4_2": torch.randn(2, 8, 4, 4), "relu5_2": torch.randn(2, 8, 2, 2)}
    assert torch.equal(L.content_loss(feats, {k: v.clone() for k, v in feats.items()}), torch.zeros(2))


def test_content_loss_sums_the_per_layer_mean_squared_errors_per_image():
    feats = {"a": torch.zeros(2, 2, 3, 3), "b": torch.zeros(2, 4, 1, 1)}
    feats["a"][1] = 1.0  # image 1 differs by 1 everywhere at layer a: MSE 1
    feats["b"][1, 0] = 2.0  # and by 2 in one of 4 values at layer b: MSE 4/4 = 1
    target = {"a": torch.zeros(1, 2, 3, 3), "b": torch.zeros(1, 4, 1, 1)}  # one target for the batch
    torch.testing.assert_close(L.content_loss(feats, target), torch.tensor([0.0, 2.0]))


# Text embeddings: average the templates, then normalise (CLIPstyler) -------------


class FakeTextEncoder:
    """encode_text with embeddings of very different norms, so the order of
    averaging and normalising changes the result."""

    table = {
        "a {}": torch.tensor([10.0, 0.0, 0.0]),
        "the {}": torch.tensor([0.0, 1.0, 0.0]),
    }

    def __init__(self):
        self.calls: list[list[str]] = []

    def __call__(self, texts):
        self.calls.append(list(texts))
        rows = []
        for text in texts:
            template = next(t for t in self.table if t.format(text.split()[-1]) == text)
            rows.append(self.table[template])
        return torch.stack(rows)


def test_embed_texts_averages_before_normalising():
    encode = FakeTextEncoder()
    emb = L.embed_texts(encode, ["a cat", "the cat"])
    averaged_first = F.normalize(torch.tensor([5.0, 0.5, 0.0]), dim=-1)
    normalised_first = F.normalize(torch.tensor([0.5, 0.5, 0.0]), dim=-1)  # StyleGAN-NADA's order
    torch.testing.assert_close(emb, averaged_first)
    assert not torch.allclose(emb, normalised_first, atol=1e-2)
    assert emb.norm().item() == pytest.approx(1.0)


def test_text_embedding_puts_the_prompt_in_every_template_and_caches_it():
    from clipstyle.method.text import text_embedding

    encode = FakeTextEncoder()

    class Clip:
        encode_text = encode

    class FakeModels:
        clip = Clip()
        device = torch.device("cpu")
        text_cache: dict = {}

    templates = ("a {}", "the {}")
    emb = text_embedding(FakeModels, "cat", templates)
    assert encode.calls == [["a cat", "the cat"]]
    torch.testing.assert_close(emb, F.normalize(torch.tensor([5.0, 0.5, 0.0]), dim=-1))
    again = text_embedding(FakeModels, "cat", templates)
    assert encode.calls == [["a cat", "the cat"]]  # computed once per text
    torch.testing.assert_close(again, emb)
