"""`clipstyle serve`'s region and colour controls (`run`'s --where, --mask, --invert-mask, --feather,
--preserve-color) through the one-pair plan the server builds: a real server, tiny random models."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from clipstyle.config import MAX_FEATHER
from clipstyle.serve.jobs import Job, JobQueue
from serve_support import TINY, get_json, jpeg, post_json, upload, wait_for

from conftest import counting_loader, invoke, tiny_models


def mask_png(width=48, height=32) -> bytes:
    """The left half white (stylized), the right half black (kept)."""
    img = Image.new("L", (width, height), 0)
    img.paste(255, (0, 0, width // 2, height))
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_region_job_is_the_cli_run_with_the_same_options_byte_for_byte(tmp_path, server, queue, photo, monkeypatch):
    """--where, --mask, --invert-mask, --feather and --preserve-color reach the plan as `clipstyle run`
    passes them: the same pixels and the same metadata (the mask named by its upload name and SHA-256)."""
    mask_file = tmp_path / "half.png"
    mask_file.write_bytes(mask_png())
    status, photo_info = upload(server, photo.read_bytes(), photo.name)
    assert status == 200
    status, mask_info = upload(server, mask_file.read_bytes(), "half.png")
    assert status == 200
    form = {
        **TINY,
        "seed": 3,
        "where": "  the yellow square ",
        "mask": mask_info["id"],
        "invert_mask": True,
        "feather": 2,
        "preserve_color": True,
    }
    status, body = post_json(f"{server}/api/jobs", {"upload": photo_info["id"], "prompts": ["fire"], "form": form})
    assert status == 200, body
    (job_id,) = body["jobs"]
    job = wait_for(server, job_id)
    assert job["status"] == "done", job["error"]
    region = {
        "where": "the yellow square",
        "mask": mask_info["id"],
        "mask_name": "half.png",
        "feather": 2.0,
        "invert_mask": True,
        "preserve_color": True,
    }
    assert job["region"] == region  # in the state, and so in the gallery record
    assert json.loads((queue.results / f"{job_id}.json").read_text())["region"] == region

    counting_loader(monkeypatch)
    out = tmp_path / "cli.png"
    cli = ["run", "-p", "fire", photo, "-o", out, "--preset", "draft", "--steps", 3, "--size", 32]
    cli += ["--crops", 2, "--crop-size", 16, "--seed", 3, "-q", "--where", "the yellow square"]
    cli += ["--mask", mask_file, "--invert-mask", "--feather", 2, "--preserve-color"]
    result = invoke(*cli)
    assert result.exit_code == 0, result.output
    web = Image.open(queue.results / job["png"])
    assert Image.open(out).tobytes() == web.tobytes()
    cli_meta = json.loads(Image.open(out).text["clipstyle"])
    web_meta = json.loads(web.text["clipstyle"])
    cli_meta.pop("models"), web_meta.pop("models")
    assert web_meta["region"]["mask"] == "half.png" and web_meta["region"]["where"] == "the yellow square"
    assert cli_meta == web_meta
    # without a region the same job is another image: the controls are not ignored
    status, body = post_json(
        f"{server}/api/jobs", {"upload": photo_info["id"], "prompts": ["fire"], "form": {**TINY, "seed": 3}}
    )
    plain = wait_for(server, body["jobs"][0])
    assert plain["region"] is None
    assert Image.open(queue.results / plain["png"]).tobytes() != web.tobytes()


def test_the_region_is_kept_across_restarts_and_its_mask_upload_with_it(server, queue):
    status, photo_info = upload(server, jpeg(), "photo.jpg")
    status, mask_info = upload(server, mask_png(), "m.png")
    status, other = upload(server, jpeg(20, 20), "unused.jpg")
    form = {**TINY, "mask": mask_info["id"], "preserve_color": False}
    status, body = post_json(f"{server}/api/jobs", {"upload": photo_info["id"], "prompts": ["fire"], "form": form})
    assert status == 200, body
    job = wait_for(server, body["jobs"][0])
    assert job["status"] == "done" and job["region"]["mask_name"] == "m.png"
    status, full = get_json(f"{server}/api/jobs/{job['id']}")
    assert json.loads(full["metadata"]["clipstyle"])["region"]["mask"] == "m.png"  # what "Use these settings" reads
    # a restart removes uploads no job uses: the photo and the mask stay, the unused one goes
    again = JobQueue(tiny_models(), queue.folder)
    assert again.jobs[job["id"]].region == job["region"]
    kept = {p.name for p in again.uploads.iterdir()}
    assert f"{mask_info['id']}.bin" in kept and f"{photo_info['id']}.bin" in kept
    assert f"{other['id']}.bin" not in kept


def test_a_preserve_colour_job_alone_is_a_region_job(server, queue):
    status, photo_info = upload(server, jpeg(), "photo.jpg")
    form = {**TINY, "preserve_color": True, "where": "", "mask": None, "feather": ""}
    status, body = post_json(f"{server}/api/jobs", {"upload": photo_info["id"], "prompts": ["fire"], "form": form})
    job = wait_for(server, body["jobs"][0])
    assert job["status"] == "done", job["error"]
    meta = json.loads(Image.open(queue.results / job["png"]).text["clipstyle"])
    assert meta["region"] == {"preserve_color": True}


def test_hostile_region_values_get_one_line_and_queue_nothing(server, queue):
    status, photo_info = upload(server, jpeg(), "photo.jpg")
    status, not_a_mask = upload(server, jpeg(), "second.jpg")
    cases = [
        ({"where": ["the sky"]}, "where: ['the sky'] is not text"),
        ({"where": {"a": 1}}, "is not text"),
        ({"where": 5}, "is not text"),
        ({"where": "x" * 1001}, "at most 1,000"),
        ({"where": "\ud800"}, "not valid text"),
        ({"feather": "Infinity"}, "feather must be between 0 and 10,000"),
        ({"feather": -1}, "feather must be between"),
        ({"feather": 1e9}, "feather must be between"),  # run's bound (config.MAX_FEATHER)
        ({"where": "\u200b \u200b"}, "where: the phrase has no visible character"),
        ({"feather": "NaN"}, "feather must be between"),
        ({"feather": True}, "feather: True is not a number"),
        ({"feather": [1]}, "is not a number"),
        ({"preserve_color": "yes"}, "preserve color: 'yes' is not true or false"),
        ({"preserve_color": 1}, "is not true or false"),
        ({"invert_mask": "false"}, "invert mask: 'false' is not true or false"),
        ({"invert_mask": True}, "invert mask needs a mask or a where phrase"),
        ({"mask": ["x"]}, "mask: ['x'] is not an upload id"),
        ({"mask": "0123456789abcdef"}, "no such upload"),
        ({"mask": "../../etc/passwd"}, "no such upload"),
        ({"mask": not_a_mask["id"][:-1] + "x"}, "no such upload"),
    ]
    for change, expected in cases:
        form = {**TINY, "where": "the sky", **change}
        if "where" in change or change.get("invert_mask") is True:
            form["where"] = change.get("where")
        status, body = post_json(f"{server}/api/jobs", {"upload": photo_info["id"], "prompts": ["fire"], "form": form})
        assert status == 400, (change, body)
        assert expected in body["error"] and "\n" not in body["error"], (change, body)
    assert queue.jobs == {}
    assert MAX_FEATHER == 10_000


def test_planted_region_records_are_skipped(tmp_path):
    folder = tmp_path / "served"
    results = folder / "results"
    results.mkdir(parents=True)
    good = {
        "where": "the sky",
        "mask": None,
        "mask_name": None,
        "feather": 4.0,
        "invert_mask": False,
        "preserve_color": False,
    }
    base = {
        "kind": "stylize",
        "upload": "0123456789abcdef",
        "input_name": "photo.jpg",
        "prompt": "fire",
        "status": "done",
    }
    bad = [
        {**good, "mask": "../../secret"},
        {**good, "mask_name": "a/b.png"},
        {**good, "feather": 1e9},
        {**good, "where": ["x"]},
        {**good, "preserve_color": "yes"},
        {**good, "extra": 1},
    ]
    for i, region in enumerate([good, *bad]):
        job_id = f"{i:012x}"
        assert (Job.from_record({**base, "id": job_id, "png": f"{job_id}.png", "region": region}, job_id) is None) == (
            i > 0
        ), region


def test_an_apply_job_takes_the_region_as_clipstyle_apply_does(tmp_path, server, queue, photo, monkeypatch):
    """Apply on a photo with the form's region and colour values: the same pixels and metadata as
    `clipstyle apply STYLE photo --mask ... --invert-mask --feather ... --preserve-color`; without them
    another image (the controls are not ignored, as they once were)."""
    from serve_support import start

    _, (style_job,) = start(server)
    assert wait_for(server, style_job)["status"] == "done"
    mask_file = tmp_path / "half.png"
    mask_file.write_bytes(mask_png())
    status, photo_info = upload(server, photo.read_bytes(), photo.name)
    status, mask_info = upload(server, mask_file.read_bytes(), "half.png")
    form = {"where": "", "mask": mask_info["id"], "invert_mask": True, "feather": 2, "preserve_color": True}
    status, body = post_json(f"{server}/api/jobs", {"apply": style_job, "upload": photo_info["id"], "form": form})
    assert status == 200, body
    job = wait_for(server, body["jobs"][0])
    assert job["status"] == "done", job["error"]
    assert job["region"] == {**form, "where": None, "mask_name": "half.png", "feather": 2.0}

    out = tmp_path / "cli.png"
    style = queue.results / f"{style_job}.style"
    cli = ["apply", style, photo, "-o", out, "-q", "--mask", mask_file, "--invert-mask", "--feather", 2]
    result = invoke(*cli, "--preserve-color")
    assert result.exit_code == 0, result.output
    web = Image.open(queue.results / job["png"])
    assert Image.open(out).tobytes() == web.tobytes()
    cli_meta, web_meta = json.loads(Image.open(out).text["clipstyle"]), json.loads(web.text["clipstyle"])
    assert web_meta["region"] == cli_meta["region"] and web_meta["region"]["mask"] == "half.png"

    status, body = post_json(f"{server}/api/jobs", {"apply": style_job, "upload": photo_info["id"]})
    plain = wait_for(server, body["jobs"][0])
    assert plain["status"] == "done" and plain["region"] is None
    assert Image.open(queue.results / plain["png"]).tobytes() != web.tobytes()


def test_an_apply_job_with_a_bad_region_is_refused_and_queues_nothing(server, queue):
    from serve_support import start

    _, (style_job,) = start(server)
    assert wait_for(server, style_job)["status"] == "done"
    status, photo_info = upload(server, jpeg(), "photo.jpg")
    cases = [
        ("a form", "form: not a JSON object"),
        ({"invert_mask": True}, "invert mask needs a mask or a where phrase"),
        ({"mask": "f" * 24}, "no such upload"),
        ({"where": "\u200b"}, "where: the phrase has no visible character"),
    ]
    before = set(queue.jobs)
    for form, message in cases:
        status, body = post_json(f"{server}/api/jobs", {"apply": style_job, "upload": photo_info["id"], "form": form})
        assert status == 400 and message in body["error"], (form, body)
    assert set(queue.jobs) == before
