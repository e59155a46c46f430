"""Films: apply and run on videos the tests make themselves (PyAV), timing, audio, rotation, pixel
aspect, interrupts, broken files, training over frames, and the flicker measure."""

from __future__ import annotations

import json
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch

from clipstyle import video
from clipstyle.method.unet import StyleNet
from clipstyle.styles.stylefile import load_style, save_style

from conftest import TINY_32, counting_loader, invoke, records
from videos import audio_packets, decoded_frames, frame_times, make_video, pattern, subtitle_packets

pytest.importorskip("av")


@pytest.fixture
def style(tmp_path):
    torch.manual_seed(1)
    path = tmp_path / "ink.style"
    save_style(path, StyleNet(), {"prompt": "ink painting"})
    return path


@pytest.fixture
def clip(tmp_path):
    return make_video(tmp_path / "clip.mp4", frames=16, fps=12)


def leftovers(folder) -> list[str]:
    """Hidden temporary files a write left behind."""
    return sorted(p.name for p in folder.rglob(".*.tmp"))


def test_apply_keeps_frames_rate_duration_and_audio_bytes(tmp_path, style, clip):
    out, report = tmp_path / "styled.mp4", tmp_path / "r.jsonl"
    result = invoke("apply", style, clip, "-o", out, "--report", report, "-q")
    assert result.exit_code == 0, result.output
    src, dst = video.probe(clip), video.probe(out)
    assert dst.frames == src.frames == 16 and len(decoded_frames(out)) == 16
    assert dst.fps == src.fps == 12
    assert abs(dst.duration - src.duration) <= 1 / 12
    assert dst.audio_streams == 1 and audio_packets(out) == audio_packets(clip)  # copied, not re-encoded
    assert frame_times(out) == frame_times(clip)
    # the frames are the style's, not the input's
    assert np.abs(decoded_frames(out)[3].astype(int) - decoded_frames(clip)[3].astype(int)).mean() > 10
    (record,) = records(report)
    assert record["status"] == "ok" and record["frames"] == 16 and record["audio_streams"] == 1
    assert record["size"] == [48, 32] and record["seconds_restyle"] > 0
    assert video.read_record(out)["styles"][0]["file"] == "ink.style"
    assert video.read_record(out)["compute"] == record["compute"] and record["compute"]["device"] == "cpu"
    assert leftovers(tmp_path) == []


def test_subtitles_are_copied_where_the_container_holds_them_and_named_where_not(tmp_path, style):
    """A holiday film's captions are kept in a .mkv, byte for byte; a container that cannot hold them
    (.mp4 takes only mov_text) gets the film without them and a warning naming the stream, never silence."""
    captions = [(0, 500, "Hello"), (700, 400, "the sea")]
    film = make_video(tmp_path / "trip.mkv", subtitles=captions)
    report = tmp_path / "r.jsonl"
    kept = invoke("apply", style, film, "-o", tmp_path / "kept.mkv", "--report", report)
    assert kept.exit_code == 0, kept.output
    assert subtitle_packets(tmp_path / "kept.mkv") == subtitle_packets(film) == [(0.0, b"Hello"), (0.7, b"the sea")]
    assert audio_packets(tmp_path / "kept.mkv") == audio_packets(film)
    assert "not copied" not in kept.stderr
    lost = invoke("apply", style, film, "-o", tmp_path / "lost.mp4", "--report", report)
    assert lost.exit_code == 0, lost.output
    (warning,) = [line for line in lost.stderr.splitlines() if "not copied" in line]
    assert (
        warning
        == f"clipstyle: warning: {film}: not copied: subtitle stream 1 (srt): .mp4 cannot hold it (.mkv can hold most)"
    )
    assert video.probe(tmp_path / "lost.mp4").frames == 16 and audio_packets(tmp_path / "lost.mp4") == audio_packets(
        film
    )
    first, second = records(report)
    assert (first["subtitle_streams"], first["not_copied"]) == (1, [])
    assert (second["subtitle_streams"], len(second["not_copied"])) == (0, 1)


def test_frames_batched_equal_frames_one_at_a_time(tmp_path, style, clip, monkeypatch):
    import clipstyle.jobs.film as film

    batches = []
    real = film.render_batch
    monkeypatch.setattr(film, "render_batch", lambda nets, x, **kw: batches.append(len(x)) or real(nets, x, **kw))
    net = load_style(style).network
    cpu = torch.device("cpu")
    lossless = video.Encoding(crf=0)  # x264 at CRF 0: what it decodes is what it was given, after yuv420p
    one = film.restyle_film(clip, tmp_path / "one.mp4", net, device=cpu, batch=1, encoding=lossless)
    five = film.restyle_film(clip, tmp_path / "five.mp4", net, device=cpu, batch=5, encoding=lossless)
    assert batches == [5, 5, 5] and one.frames == five.frames == 16  # 16 = 5 + 5 + 5 + a last frame alone
    a, b = decoded_frames(tmp_path / "one.mp4"), decoded_frames(tmp_path / "five.mp4")
    assert max(np.abs(x.astype(int) - y.astype(int)).max() for x, y in zip(a, b)) <= 2


def test_variable_frame_rate_is_kept(tmp_path, style):
    times = [0, 80, 160, 300, 340, 500, 580, 700, 720, 900]
    clip = make_video(tmp_path / "vfr.mp4", frames=len(times), times_ms=times)
    out = tmp_path / "vfr-ink.mp4"
    assert invoke("apply", style, clip, "-o", out, "-q").exit_code == 0
    assert frame_times(out) == pytest.approx([t / 1000 for t in times], abs=1e-3)


@pytest.mark.parametrize(
    "kind, options, display",
    [("rotated", {"rotation": 90}, (32, 48)), ("anamorphic", {"sample_aspect": Fraction(2, 1)}, (96, 32))],
)
def test_rotation_and_pixel_aspect_are_kept(tmp_path, style, kind, options, display):
    clip = make_video(tmp_path / f"{kind}.mp4", frames=6, audio=False, **options)
    assert video.probe(clip).display_size == display
    out = tmp_path / f"{kind}-out.mp4"
    assert invoke("apply", style, clip, "-o", out, "-q").exit_code == 0
    made = video.probe(out)
    assert made.display_size == display, made
    assert (made.rotation, made.sample_aspect or 1) == (options.get("rotation", 0), options.get("sample_aspect", 1))
    if "rotation" in options:  # the frames a style trains on are upright, as a viewer sees them
        (frame,), _ = video.sample_frames(clip, 1)
        assert (frame.shape[1], frame.shape[0]) == display


def test_size_caps_the_frames_keeping_the_aspect(tmp_path, style, clip):
    out = tmp_path / "small.mp4"
    assert invoke("apply", style, clip, "-o", out, "--size", "24", "-q").exit_code == 0
    assert (video.probe(out).width, video.probe(out).height) == (24, 16)


def test_interrupt_mid_film_leaves_nothing_and_a_rerun_finishes(tmp_path, style, clip, monkeypatch):
    import clipstyle.jobs.film as film

    real, calls = film.render, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(film, "render", interrupted)
    out = tmp_path / "styled.mp4"
    result = invoke("apply", style, clip, "-o", out, "-q")
    assert result.exit_code == 130 and len(calls) == 5
    assert not out.exists() and leftovers(tmp_path) == []
    monkeypatch.setattr(film, "render", real)
    assert invoke("apply", style, clip, "-o", out, "-q").exit_code == 0
    assert video.probe(out).frames == 16
    again = invoke("apply", style, clip, "-o", out)
    assert again.exit_code == 0 and "skipped" in again.output  # the same settings: done
    other = invoke("apply", style, clip, "-o", out, "--crf", "30")
    assert other.exit_code == 1 and "made with other settings (encoding)" in other.output


def test_a_folder_of_images_and_films_with_broken_ones(tmp_path, style):
    folder = tmp_path / "holiday"
    folder.mkdir()
    make_video(folder / "beach.mp4", frames=8)
    from PIL import Image

    Image.fromarray(pattern(0)).save(folder / "sunset.png")
    whole = make_video(tmp_path / "whole.mp4", frames=12).read_bytes()
    (folder / "truncated.mp4").write_bytes(whole[: len(whole) // 2])
    indexed_first = make_video(tmp_path / "fast.mp4", frames=24, audio=False, faststart=True).read_bytes()
    (folder / "cut.mp4").write_bytes(indexed_first[: len(indexed_first) * 85 // 100])  # opens, then ends early
    (folder / "notes.mp4").write_text("this is not a film\n")
    make_video(folder / "voice.m4a.mp4", video=False)  # audio only
    out = tmp_path / "out"
    result = invoke("apply", style, folder, "-o", out, "-q")
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("clipstyle: error:")]
    assert len(errors) == 4, result.output
    for name, why in (
        ("truncated.mp4", "cannot read"),
        ("cut.mp4", "truncated or damaged"),
        ("notes.mp4", "cannot read"),
        ("voice.m4a.mp4", "audio only"),
    ):
        (line,) = [e for e in errors if name in e]
        assert why in line
    assert video.probe(out / "beach-ink.mp4").frames == 8
    assert (out / "sunset-ink.png").exists()
    assert sorted(p.name for p in out.iterdir()) == ["beach-ink.mp4", "sunset-ink.png"]


def test_a_film_without_a_stated_frame_count_shows_progress_and_warns_when_cut_short(tmp_path, style, monkeypatch):
    """Matroska and WebM state no frame count: the duration gives the bar its total, and a film whose
    frames fall well short of it (cut while copying) is said to be, in one warning; the rest is kept."""
    whole = make_video(tmp_path / "whole.mkv", frames=48)
    assert video.probe(whole).frames == 0 and video.probe(whole).expected_frames == 48
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 6 // 10])
    totals, transcode = [], video.transcode

    def watched(*args, progress=None, **kwargs):
        def seen(done, total):
            totals.append(total)
            progress(done, total)

        return transcode(*args, progress=seen, **kwargs)

    monkeypatch.setattr(video, "transcode", watched)
    result = invoke("apply", style, whole, "-o", tmp_path / "whole-ink.mkv")
    assert result.exit_code == 0 and "truncated" not in result.output
    assert set(totals) == {48}  # not 1/1, 2/2, ...: a bar with a time left
    result = invoke("apply", style, cut, "-o", tmp_path / "cut-ink.mkv")
    assert result.exit_code == 0, result.output
    frames = video.probe(tmp_path / "cut-ink.mkv").expected_frames
    assert 0 < frames < 40
    (warning,) = [line for line in result.output.splitlines() if "truncated" in line]
    assert warning.endswith("suggests about 48: it may be truncated") and "cut.mkv" in warning


def test_without_pyav_a_film_gets_one_line_on_how_to_install_it(tmp_path, style, clip, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)
    result = invoke("apply", style, clip, "-o", tmp_path / "x.mp4")
    assert result.exit_code == 1
    (line,) = [x for x in result.output.splitlines() if x.startswith("clipstyle: error:")]
    assert "pip install 'clipstyle[video]'" in line and "clip.mp4" in line


def test_a_film_to_a_png_and_an_unknown_codec_are_refused_before_any_work(tmp_path, style, clip):
    result = invoke("apply", style, clip, "-o", tmp_path / "x.png")
    assert result.exit_code != 0 and "needs a video" in result.output
    result = invoke("apply", style, clip, "-o", tmp_path / "x.mp4", "--codec", "no-such-codec")
    assert result.exit_code == 2 and "no-such-codec" in result.output
    assert not (tmp_path / "x.mp4").exists()


def test_run_trains_on_frames_spread_over_the_film_and_renders_it(tmp_path, clip, monkeypatch):
    loads = counting_loader(monkeypatch)
    out, kept, report = tmp_path / "fire.mp4", tmp_path / "fire.style", tmp_path / "r.jsonl"
    args = ["run", "-p", "fire", clip, "-o", out, "--save-style", kept, "--train-frames", "4", "--report", report]
    result = invoke(*args, *TINY_32)
    assert result.exit_code == 0, result.output
    assert video.probe(out).frames == 16 and audio_packets(out) == audio_packets(clip)
    meta = load_style(kept).metadata
    assert meta["trained_on"]["members"][0]["frames"] == [2, 6, 10, 14]  # the middles of four quarters
    assert meta["train_frames"] == 4 and meta["input"] == "clip.mp4"
    (record,) = records(report)
    assert record["status"] == "ok" and record["frames"] == 16 and record["trained_on"]["images"] == 4
    assert video.read_record(out)["compute"] == record["compute"] and "threads" in record["compute"]
    assert len(loads) == 1
    again = invoke(*args, *TINY_32)  # done with these settings: skipped, nothing loaded
    assert again.exit_code == 0 and len(loads) == 1 and records(report)[-1]["status"] == "skipped"
    other = invoke(*[a if a != "4" else "3" for a in args], *TINY_32)
    assert other.exit_code == 1 and "train_frames" in records(report)[-1]["error"]


def test_train_on_a_set_saves_one_style_recording_its_images(tmp_path, monkeypatch):
    from PIL import Image

    counting_loader(monkeypatch)
    folder = tmp_path / "set"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(pattern(4 * i)).save(folder / f"f{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    kept = tmp_path / "set.style"
    result = invoke("run", "-p", "fire", "--train-on", folder, "--save-style", kept, *TINY_32[:-1])
    assert result.exit_code == 0, result.output
    assert "broken.png" in result.output and "left out of the set" in result.output
    meta = load_style(kept).metadata
    assert [m["input"] for m in meta["trained_on"]["members"]] == ["f0.png", "f1.png", "f2.png"]
    assert len(meta["input_sha256"]) == 4 and meta["input"] == "set"
    refused = invoke("run", "-p", "fire", "--train-on", folder, tmp_path / "x.png", "--save-style", kept)
    assert refused.exit_code == 2 and "clipstyle apply" in refused.output
    needs = invoke("run", "-p", "fire", "--train-on", folder, *TINY_32)
    assert needs.exit_code == 1 and "--save-style" in needs.output


# --- training over several frames -------------------------------------------------------------------------


def scene(index: int, t: int) -> torch.Tensor:
    """Frame ``t`` of scene ``index``: the moving pattern in that scene's own colours."""
    img = np.roll(pattern(3 * t, 32, 32), index, axis=2)
    img = 255 - img if index % 2 else img
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float() / 255


def held_out_direction_loss(models, net, frames, prompt, settings) -> float:
    """The global CLIP directional loss (1 - cos) of ``net`` on ``frames``, averaged."""
    import torch.nn.functional as F

    from clipstyle.method import losses as L
    from clipstyle.method.text import text_embedding

    direction = L.text_direction(
        text_embedding(models, prompt, settings.templates), text_embedding(models, settings.source, settings.templates)
    )
    with torch.no_grad():
        values = []
        for x in frames:
            source = F.normalize(models.clip.encode_image(x).float(), dim=-1)
            out = models.clip.encode_image(models.clip.resize(net(x))).float()
            values.append(float(L.directional_loss(out, source, direction[None]).mean()))
    return float(np.mean(values))


def test_a_style_trained_on_four_frames_holds_better_on_unseen_frames_than_one_trained_on_one(shared_models):
    """Four scenes of a film, one training frame each (or only the first scene's), the same 40 steps;
    scored on another frame of each scene. What it shows: the loop really trains over the set
    (each content its own CLIP source and VGG target) and that generalises to frames unseen.
    What it cannot: random-weight CLIP has no notion of style, so nothing about looks."""
    from clipstyle.config import Settings
    from clipstyle.method.loop import stylize_many
    from clipstyle.prompts import NO_TEMPLATES

    settings = Settings(steps=40, size=32, crops=4, crop_size=16, templates=NO_TEMPLATES, log_every=10)
    train, held = [scene(s, 0) for s in range(4)], [scene(s, 4) for s in range(4)]
    for seed in (0, 1):
        four = stylize_many([train], ["fire"], [seed], models=shared_models, settings=settings)[0]
        one = stylize_many([train[:1]], ["fire"], [seed], models=shared_models, settings=settings)[0]
        loss4 = held_out_direction_loss(shared_models, four.network, held, "fire", settings)
        loss1 = held_out_direction_loss(shared_models, one.network, held, "fire", settings)
        assert loss4 < loss1 - 0.02, (seed, loss4, loss1)


def test_a_set_of_one_is_the_plain_run(shared_models, tiny_settings):
    from clipstyle.method.loop import stylize_many

    x = scene(0, 0)
    alone = stylize_many([x], ["fire"], [3], models=shared_models, settings=tiny_settings)[0]
    as_set = stylize_many([[x]], ["fire"], [3], models=shared_models, settings=tiny_settings)[0]
    assert torch.equal(alone.tensor, as_set.tensor)


# --- flicker -----------------------------------------------------------------------------------------------


def test_warping_follows_motion_and_masks_what_leaves_the_frame():
    import cv2

    from clipstyle.evaluation.flicker import pair_error

    engine = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    a, b = pattern(0, 96, 64), pattern(2, 96, 64)  # the square moves 4 px right, 2 px down
    grey = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in (a, b)]
    fa, fb = a.astype(np.float32) / 255, b.astype(np.float32) / 255
    (warped,), masked = pair_error(cv2, engine, grey[0], grey[1], [fa], [fb])
    unwarped = float(((fa - fb) ** 2).sum(-1).mean() / 3)
    assert warped < unwarped / 4, (warped, unwarped)
    assert 0 <= masked < 0.5


def test_flicker_of_a_styled_moving_pattern_is_reported_next_to_the_original(tmp_path, style, clip):
    from clipstyle.evaluation.flicker import warping_error

    steady = tmp_path / "steady.mp4"
    assert invoke("apply", style, clip, "-o", steady, "-q").exit_code == 0
    # the same style, with every other frame brightened: flicker that warping cannot explain
    flicker = tmp_path / "flicker.mp4"
    count = [0]

    def blink(rgb):
        count[0] += 1
        return np.clip(rgb.astype(int) + (60 if count[0] % 2 else 0), 0, 255).astype(np.uint8)

    video.transcode(steady, flicker, lambda frames: np.stack([blink(f) for f in frames]))
    itself = warping_error(clip, clip)
    assert itself.warping_error == itself.original_warping_error and itself.ratio == 1
    good, bad = warping_error(clip, steady), warping_error(clip, flicker)
    assert good.original_warping_error == bad.original_warping_error == itself.original_warping_error
    assert good.pairs == 15 and bad.warping_error > 3 * good.warping_error
    result = invoke("score", "--video", clip, steady, "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["warping_error"] == pytest.approx(good.warping_error)
    assert shown["original_warping_error"] == pytest.approx(good.original_warping_error)
    short = make_video(tmp_path / "short.mp4", frames=5)
    refused = invoke("score", "--video", clip, short)
    assert refused.exit_code == 1 and "fewer frames" in refused.output


def test_options_for_images_only_are_refused_for_films(tmp_path, style, clip, monkeypatch):
    counting_loader(monkeypatch)
    result = invoke("run", "-p", "fire", clip, "-o", tmp_path / "x.mp4", "--contrast", *TINY_32)
    assert result.exit_code == 1 and "--contrast" in result.output and "films" in result.output
    result = invoke("apply", style, clip, "-o", tmp_path / "y.mp4", "--preserve-color")
    assert result.exit_code == 1 and "--preserve-color" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4", "ink.style"]
