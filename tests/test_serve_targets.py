"""`clipstyle serve`'s style images, blend weights and avoided phrases (`run`'s --style-image, --blend,
--avoid, --avoid-weight) through the one-pair plan the server builds: a real server, tiny random models."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image, ImageDraw

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from clipstyle.serve.jobs import Job, JobQueue
from serve_support import TINY, get_json, jpeg, post_json, upload, wait_for

from conftest import counting_loader, invoke, tiny_models


def painting(path=None) -> bytes:
    """A small 'painting': diagonal stripes and a disc."""
    img = Image.new("RGB", (40, 40), (30, 40, 120))
    draw = ImageDraw.Draw(img)
    for x in range(-40, 40, 8):
        draw.line([(x, 0), (x + 40, 40)], fill=(230, 180, 40), width=3)
    draw.ellipse([12, 12, 28, 28], fill=(200, 40, 40))
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    if path is not None:
        path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def same_as_cli(tmp_path, queue, job, photo, *options) -> None:
    """The served job's PNG is `clipstyle run`'s with ``options``, pixels and metadata."""
    out = tmp_path / f"cli-{job['id']}.png"
    base = ["run", photo, "-o", out, "--preset", "draft", "--steps", 3, "--size", 32, "--crops", 2]
    result = invoke(*base, "--crop-size", 16, "--seed", 3, "-q", *options)
    assert result.exit_code == 0, result.output
    web = Image.open(queue.results / job["png"])
    assert Image.open(out).tobytes() == web.tobytes()
    cli_meta, web_meta = json.loads(Image.open(out).text["clipstyle"]), json.loads(web.text["clipstyle"])
    cli_meta.pop("models"), web_meta.pop("models")
    assert cli_meta == web_meta
    assert Image.open(out).text.get("prompt") == web.text.get("prompt")


def submit(server, upload_id, prompts, **form):
    return post_json(f"{server}/api/jobs", {"upload": upload_id, "prompts": prompts, "form": {**TINY, **form}})


def test_style_image_and_blend_jobs_are_the_cli_runs_byte_for_byte(tmp_path, server, queue, photo, monkeypatch):
    style_file = tmp_path / "monet.png"
    painting(style_file)
    _, photo_info = upload(server, photo.read_bytes(), photo.name)
    _, style_info = upload(server, style_file.read_bytes(), "monet.png")
    # a style image alone: one more job beside the prompt, named as run names it
    status, body = submit(server, photo_info["id"], ["fire"], seed=3, style_images=[{"upload": style_info["id"]}])
    assert status == 200, body
    plain_id, image_id = body["jobs"]
    plain, alone = wait_for(server, plain_id), wait_for(server, image_id)
    assert plain["status"] == alone["status"] == "done", (plain["error"], alone["error"])
    assert plain["prompt"] == "fire" and plain["target"] is None
    assert alone["prompt"] == "[monet.png]"
    # a blend of a weighted prompt and a weighted style image, avoiding a phrase, in one network
    status, body = submit(
        server,
        photo_info["id"],
        ["fire:0.7"],
        seed=3,
        style_images=[{"upload": style_info["id"], "weight": "0.3"}],
        blend=True,
        avoid=["written text, letters", " "],
        avoid_weight=0.2,
    )
    assert status == 200, body
    blend = wait_for(server, body["jobs"][0])
    assert blend["status"] == "done", blend["error"]
    assert blend["prompt"] == "fire:0.7 + [monet.png]:0.3"
    assert blend["target"] == {
        "targets": [
            {"text": "fire", "weight": 0.7},
            {"image": style_info["id"], "name": "monet.png", "weight": 0.3},
        ],
        "avoid": ["written text, letters"],
        "avoid_weight": 0.2,
        "blend": True,
    }
    counting_loader(monkeypatch)
    same_as_cli(tmp_path, queue, alone, photo, "--style-image", style_file)
    same_as_cli(
        tmp_path,
        queue,
        blend,
        photo,
        "--blend",
        "-p",
        "fire:0.7",
        "--style-image",
        f"{style_file}:0.3",
        "--avoid",
        "written text, letters",
        "--avoid-weight",
        0.2,
    )
    meta = json.loads(Image.open(queue.results / blend["png"]).text["clipstyle"])
    assert meta["target"]["targets"][1]["image"] == "monet.png"  # the upload's name, not the stored <id>.bin
    from clipstyle.styles.stylefile import load_style

    assert load_style(queue.results / blend["style"]).metadata["target"]["avoid"] == ["written text, letters"]


def test_avoid_alone_makes_every_prompt_a_job_that_avoids_it(server, queue):
    _, info = upload(server, jpeg(), "photo.jpg")
    status, body = submit(server, info["id"], ["fire", "ice"], avoid=["letters"])
    assert status == 200, body
    jobs = [wait_for(server, j) for j in body["jobs"]]
    assert [j["prompt"] for j in jobs] == ["fire", "ice"]
    for job in jobs:
        assert job["status"] == "done", job["error"]
        assert job["target"]["avoid"] == ["letters"] and job["target"]["avoid_weight"] == 0.5  # config's default
        meta = json.loads(Image.open(queue.results / job["png"]).text["clipstyle"])
        assert meta["target"]["avoid"] == ["letters"]


def test_targets_are_kept_across_restarts_with_their_style_images(server, queue):
    _, photo_info = upload(server, jpeg(), "photo.jpg")
    _, style_info = upload(server, painting(), "brush.png")
    _, other = upload(server, jpeg(20, 20), "unused.jpg")
    status, body = submit(server, photo_info["id"], [], style_images=[{"upload": style_info["id"]}])
    assert status == 200, body
    job = wait_for(server, body["jobs"][0])
    assert job["status"] == "done", job["error"]
    status, full = get_json(f"{server}/api/jobs/{job['id']}")
    assert full["target"]["targets"][0]["name"] == "brush.png"  # what "Use these settings" reads
    again = JobQueue(tiny_models(), queue.folder)
    assert again.jobs[job["id"]].target == job["target"] and again.skipped == []
    kept = {p.name for p in again.uploads.iterdir()}
    assert f"{style_info['id']}.bin" in kept and f"{other['id']}.bin" not in kept


def test_hostile_target_values_get_one_line_and_queue_nothing(server, queue, tmp_path):
    _, info = upload(server, jpeg(), "photo.jpg")
    _, style = upload(server, painting(), "s.png")
    _, same_name = upload(server, jpeg(30, 30), "s.png")  # another picture under the same name
    one = [{"upload": style["id"]}]
    cases = [
        ([], {}, "the prompt is empty"),
        (["fire"], {"style_images": "abc"}, "style images must be a list of uploads"),
        (["fire"], {"style_images": [style["id"]]}, "is not an upload and a weight"),
        (["fire"], {"style_images": [{"upload": style["id"], "path": "/etc/passwd"}]}, "is not an upload and"),
        (["fire"], {"style_images": [{"upload": "../../etc/passwd"}]}, "no such upload"),
        (["fire"], {"style_images": [{"upload": style["id"], "weight": 0}]}, "must be a number above 0"),
        (["fire"], {"style_images": [{"upload": style["id"], "weight": "Infinity"}]}, "must be a number above 0"),
        (["fire"], {"style_images": [{"upload": style["id"], "weight": True}]}, "weight: True is not a number"),
        (["fire"], {"style_images": [{"upload": style["id"], "weight": [1]}]}, "is not a number"),
        (["fire"], {"style_images": one * 16}, "17 prompts and style images: at most 16"),
        (["fire"], {"blend": "yes"}, "blend: 'yes' is not true or false"),
        (["fire"], {"blend": True}, "a blend needs at least two targets"),
        (["fire:0", "ice"], {"blend": True}, "a target's weight must be a number above 0"),
        (["fire"], {"avoid": "letters"}, "avoid must be a list of texts"),
        (["fire"], {"avoid": [1]}, "avoid must be a list of texts"),
        (["fire"], {"avoid": ["x" * 1001]}, "at most 1,000"),
        (["fire"], {"avoid": ["\u200b"]}, "an --avoid phrase is empty"),
        (["fire"], {"avoid": ["\ud800"]}, "not valid text"),
        (["fire"], {"avoid": ["a"] * 17}, "at most 16"),
        (["fire"], {"avoid": ["a"], "avoid_weight": -1}, "avoid weight must be 0 or more"),
        (["fire"], {"avoid": ["a"], "avoid_weight": "NaN"}, "avoid weight must be 0 or more"),
        (["fire"], {"avoid": ["a"], "avoid_weight": {"x": 1}}, "is not a number"),
        ([], {"style_images": [{"upload": style["id"]}, {"upload": same_name["id"]}]}, "both named '[s.png]'"),
    ]
    for prompts, form, expected in cases:
        status, body = submit(server, info["id"], prompts, **form)
        assert status == 400, (form, body)
        assert expected in body["error"] and "\n" not in body["error"], (form, body)
    assert queue.jobs == {}


def test_a_film_is_no_style_image(server, queue, tmp_path):
    pytest.importorskip("av")
    from videos import make_video

    _, info = upload(server, jpeg(), "photo.jpg")
    _, film = upload(server, make_video(tmp_path / "clip.mp4", frames=4).read_bytes(), "clip.mp4")
    status, body = submit(server, info["id"], ["fire"], style_images=[{"upload": film["id"]}])
    assert status == 400 and body["error"] == "clip.mp4: a style image is an image, not a film"
    assert queue.jobs == {}


def test_planted_target_records_are_skipped():
    good = {
        "targets": [{"text": "fire", "weight": 0.7}, {"image": "0123456789abcdef", "name": "m.png", "weight": 0.3}],
        "avoid": ["letters"],
        "avoid_weight": 0.5,
        "blend": True,
    }
    bad = [
        {**good, "targets": [{"image": "../../secret", "name": "m.png", "weight": 1.0}]},
        {**good, "targets": [{"image": "0123456789abcdef", "name": "a/b.png", "weight": 1.0}]},
        {**good, "targets": [{"text": "fire", "weight": 0}]},
        {**good, "targets": [{"text": ["fire"], "weight": 1.0}]},
        {**good, "targets": []},
        {**good, "avoid": [1]},
        {**good, "avoid_weight": -1},
        {**good, "blend": "yes"},
        {**good, "path": "/etc/passwd"},
    ]
    base = {"kind": "stylize", "upload": "0123456789abcdef", "input_name": "photo.jpg", "prompt": "x", "status": "done"}
    for i, target in enumerate([good, *bad]):
        job_id = f"{i:012x}"
        record = {**base, "id": job_id, "png": f"{job_id}.png", "target": target}
        assert (Job.from_record(record, job_id) is None) == (i > 0), target
