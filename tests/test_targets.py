"""Style images, weighted blends and --avoid on the planted colour CLIP of test_functional.

ColourClip embeds an image as its colour (chroma) and a text by its colour word, so where an
output's embedding moves is known: towards a red style image it gets redder, a 0.7/0.3 blend
of red and blue leans red, and --avoid "blue" makes it less blue. Each test is also run with
its term switched off (monkeypatched), and then its criterion must fail: the tests have teeth.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipstyle.method import targets as T
from clipstyle.method.loop import stylize_many
from clipstyle.method.targets import StyleImage, Target, Targets
from clipstyle.models.encoders import Models
from clipstyle.prompts import split_weight
from test_functional import SETTINGS, ColourClip, content_vgg, scene

from conftest import DEVICE

pytestmark = pytest.mark.device


def run(targets: Targets | None, prompt: str | None = None) -> torch.Tensor:
    models = Models(ColourClip().to(DEVICE), content_vgg().to(DEVICE))
    label = prompt if targets is None else targets.label()
    (result,) = stylize_many([scene()], [label], [0], models=models, settings=SETTINGS, targets=[targets])
    assert result.error is None
    return result.tensor


def embedding(images: torch.Tensor) -> torch.Tensor:
    return F.normalize(ColourClip().encode_image(images)[0], dim=-1)


def change(out: torch.Tensor) -> torch.Tensor:
    """The unit direction from the photo's embedding to the output's."""
    return F.normalize(embedding(out) - embedding(scene()), dim=-1)


def word(name: str) -> torch.Tensor:
    """The text direction of a colour word (from the neutral source), as the method computes it."""
    clip = ColourClip()
    return F.normalize(
        F.normalize(clip.encode_text([name])[0], dim=-1) - F.normalize(clip.encode_text(["photo"])[0], dim=-1), dim=-1
    )


def red_painting() -> StyleImage:
    """A style image that is red with some texture; no word says so."""
    g = torch.Generator().manual_seed(1)
    image = torch.tensor([0.85, 0.15, 0.1]).view(1, 3, 1, 1) + 0.08 * torch.randn(1, 3, 40, 56, generator=g)
    return StyleImage.from_image(image.clamp(0, 1), "red-painting.png")


@pytest.fixture(scope="module")
def control() -> torch.Tensor:
    """The neutral text as prompt: no CLIP pull at all."""
    return run(None, SETTINGS.source)


def similarity(out: torch.Tensor, target: torch.Tensor) -> float:
    """Cosine between the output's move from the photo and the way to ``target`` (an embedding):
    the embeddings share a large constant part, so whole-embedding cosines are all near 1."""
    return float(change(out) @ F.normalize(target - embedding(scene()), dim=-1))


def test_a_style_image_moves_the_output_towards_its_embedding(control):
    style = red_painting()
    target = embedding(style_tensor(style))
    out = run(Targets((Target(image=style),)))
    assert similarity(out, target) > 0.5
    assert similarity(out, target) > similarity(control, target) + 0.3


def style_tensor(style: StyleImage) -> torch.Tensor:
    from clipstyle.images import to_tensor

    return to_tensor(style.image)


def test_a_switched_off_style_image_term_fails_that_criterion(control, monkeypatch):
    # the style image's embedding replaced by the photo's own crops: the direction is 0, no pull
    monkeypatch.setattr(
        T, "style_image_embedding", lambda models, style, settings: T.crops_embedding(models, scene(), settings)
    )
    style = red_painting()
    target = embedding(style_tensor(style))
    out = run(Targets((Target(image=style),)))
    assert not similarity(out, target) > similarity(control, target) + 0.3


def blend(w_red: float, w_blue: float) -> Targets:
    return Targets((Target("red", weight=w_red), Target("blue", weight=w_blue)))


def leans_red(out: torch.Tensor) -> float:
    """How much nearer the output's change is to red's direction than to blue's."""
    d = change(out)
    return float(d @ word("red") - d @ word("blue"))


def test_a_blend_of_07_red_and_03_blue_lands_nearer_red():
    out_73, out_37 = run(blend(0.7, 0.3)), run(blend(0.3, 0.7))
    assert leans_red(out_73) > 0.1  # nearer the first
    assert leans_red(out_73) > leans_red(out_37) + 0.2  # and the weights, not the order, say so


def test_a_blend_whose_weights_are_switched_off_fails_that_criterion(monkeypatch):
    # every weight taken as 1: an even blend
    real = T.target_direction
    monkeypatch.setattr(
        T,
        "target_direction",
        lambda models, targets, settings, content: real(
            models, Targets(tuple(Target(t.text, t.image) for t in targets.targets)), settings, content
        ),
    )
    import clipstyle.method.loop as loop

    monkeypatch.setattr(loop, "target_direction", T.target_direction)
    assert not leans_red(run(blend(0.7, 0.3))) > 0.1


def test_a_blend_may_hold_a_style_image():
    out = run(Targets((Target("blue", weight=0.3), Target(image=red_painting(), weight=0.7))))
    assert leans_red(out) > 0.1


def purple() -> Targets:
    return Targets((Target("red"), Target("blue")))


def test_avoid_lowers_the_similarity_to_the_avoided_concept():
    plain, avoided = run(purple()), run(purple().with_avoid(["blue"]))
    assert float(change(avoided) @ word("blue")) < float(change(plain) @ word("blue")) - 0.1
    assert float(change(avoided) @ word("red")) > 0.3  # the style stays


def test_avoid_switched_off_fails_that_criterion(monkeypatch):
    import clipstyle.method.loop as loop

    monkeypatch.setattr(loop, "avoid_penalty", lambda emb, src, dirs: torch.zeros(emb.shape[0], device=emb.device))
    plain, avoided = run(purple()), run(purple().with_avoid(["blue"]))
    assert not float(change(avoided) @ word("blue")) < float(change(plain) @ word("blue")) - 0.1


def test_a_plain_target_is_exactly_the_prompt():
    models = Models(ColourClip().to(DEVICE), content_vgg().to(DEVICE))
    a = T.target_direction(models, Targets.of("red"), SETTINGS, scene())
    assert torch.equal(a.cpu(), word("red"))
    (r1,) = stylize_many([scene()], ["red"], [0], models=models, settings=SETTINGS.replace(steps=3))
    (r2,) = stylize_many(
        [scene()], ["red"], [0], models=models, settings=SETTINGS.replace(steps=3), targets=[Targets.of("red")]
    )
    assert torch.equal(r1.tensor, r2.tensor)
    assert "avoid" not in r1.losses


def test_avoid_is_reported_in_the_losses_and_the_total():
    models = Models(ColourClip().to(DEVICE), content_vgg().to(DEVICE))
    settings = SETTINGS.replace(steps=2, log_every=1)
    (r,) = stylize_many(
        [scene()], ["x"], [0], models=models, settings=settings, targets=[Targets((Target("blue"),), ("blue",))]
    )
    parts = r.losses
    weighted = (
        settings.lambda_patch * parts["patch"]
        + settings.lambda_dir * parts["dir"]
        + settings.lambda_content * parts["content"]
        + settings.lambda_tv * parts["tv"]
    )
    assert parts["avoid"] > 0
    assert parts["total"] == pytest.approx(weighted + parts["avoid"], rel=1e-5)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("starry night:0.7", ("starry night", 0.7)),
        ("watercolor", ("watercolor", None)),
        ("ratio 16\\:9", ("ratio 16:9", None)),
        ("ratio 16\\:9:2", ("ratio 16:9", 2.0)),
        ("a:b | c", ("a:b | c", None)),
        ("x:.5", ("x", 0.5)),
        ("x:1e3", ("x:1e3", None)),
    ],
)
def test_blend_weights_are_read_from_a_last_colon_and_a_number(text, expected):
    assert split_weight(text) == expected


def test_targets_are_checked():
    from clipstyle.errors import ClipstyleError

    for bad in (
        lambda: Target("x", weight=0),
        lambda: Target("x", weight=float("nan")),
        lambda: Target(" "),
        lambda: Target(),
        lambda: Targets(()),
        lambda: Targets((Target("x"),), ("\u200b",)),
        lambda: Targets((Target("x"),), ("y",), -1),
    ):
        with pytest.raises(ClipstyleError):
            bad()


def test_labels_and_records_name_images_by_name_and_sha256():
    style = red_painting()
    spec = Targets((Target("starry night", weight=0.7), Target(image=style, weight=0.3)), ("letters",))
    assert spec.label() == "starry night:0.7 + [red-painting.png]:0.3"
    assert not spec.plain and Targets.of("x").plain
    assert spec.record() == {
        "targets": [
            {"text": "starry night", "weight": 0.7},
            {"image": "red-painting.png", "image_sha256": style.sha256, "weight": 0.3},
        ],
        "avoid": ["letters"],
        "avoid_weight": 0.5,
    }


def test_stylize_takes_targets_and_avoid_beside_its_old_signature(models, tiny_settings):
    from clipstyle import stylize

    photo = scene(32)
    plain = stylize(photo, "red", models=models, settings=tiny_settings)
    assert plain.prompt == "red" and "avoid" not in plain.losses
    style = red_painting()
    result = stylize(
        photo,
        models=models,
        settings=tiny_settings,
        targets=[Target("red", weight=0.7), Target(image=style, weight=0.3)],
        avoid=["letters"],
    )
    assert result.prompt == "red:0.7 + [red-painting.png]:0.3"
    assert "avoid" in result.losses and result.image.size == plain.image.size
    # the prompt joins the targets with weight 1; a string is a text and a StyleImage an image
    both = stylize(photo, "red", models=models, settings=tiny_settings, targets=[style])
    assert both.prompt == "red:1 + [red-painting.png]:1"
    from clipstyle.errors import ClipstyleError

    with pytest.raises(ClipstyleError):
        stylize(photo, models=models, settings=tiny_settings)


def test_a_pair_with_targets_travels_to_worker_processes(tmp_path):
    import pickle

    from clipstyle.jobs.inputs import InputFile
    from clipstyle.jobs.pairs import RunJob

    spec = Targets((Target("x", weight=0.7), Target(image=red_painting(), weight=0.3)), ("letters",))
    job = RunJob(InputFile(tmp_path / "a.png", "a.png"), spec.label(), tmp_path / "o.png", 1, target=spec)
    back = pickle.loads(pickle.dumps(job))
    assert back.target == spec and back.target_record() == spec.record()
    assert back.target.targets[1].image.image.tobytes() == red_painting().image.tobytes()


def test_a_set_takes_each_members_own_style_image_direction():
    """Trained on a set (film frames, --train-on), a style image's direction starts from the content
    being trained on at that step (S minus that member's crops), as one photo's does; text parts are the
    same for every member. Once only the first member's was used for all."""
    from clipstyle.method.loop import _PairState

    models = Models(ColourClip().to(DEVICE), content_vgg().to(DEVICE))
    warm = scene().flip(1)  # another member: its red and blue swapped
    members = [scene().to(DEVICE), warm.to(DEVICE)]
    target = Targets((Target("blue", weight=0.5), Target(image=red_painting(), weight=0.5)))
    settings = SETTINGS.replace(steps=8)
    pair = _PairState(0, members, target.label(), 3, models, models.vgg, settings, None, target=target)
    with torch.no_grad():
        wanted = [T.target_direction(models, target, settings, m) for m in members]
    assert float(wanted[0] @ wanted[1]) < 0.99  # the members' directions differ
    assert set(pair.choice) == {0, 1}  # both members are trained on
    for step, member in enumerate(pair.choice):
        pair.use(step)
        torch.testing.assert_close(pair.text_dir, wanted[member])
    text_only = Targets((Target("blue", weight=0.5), Target("red", weight=0.5)))
    pair = _PairState(0, members, text_only.label(), 3, models, models.vgg, settings, None, target=text_only)
    assert all(c[2] is pair.text_dir for c in pair.set_constants)  # one direction, shared
