"""`clipstyle serve` restyling a film with a saved style: the upload checks, progress in frames, Stop
between frames, the film in the gallery; and the page's words when PyAV is missing. A real server on
127.0.0.1, tiny random models, films the tests make (tests/videos.py)."""

from __future__ import annotations

import json
import sys

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from clipstyle.serve.jobs import Job, JobQueue
from serve_support import TINY, get_json, jpeg, post_json, request, running, start, upload, wait_for

from conftest import tiny_models

FRAMES = 16


@pytest.fixture
def film(tmp_path):
    pytest.importorskip("av")
    from videos import make_video

    return make_video(tmp_path / "clip.mp4", frames=FRAMES)


def styled(server) -> str:
    """A finished stylize job (its style file is what a film is restyled with)."""
    _, (job_id,) = start(server)
    assert wait_for(server, job_id)["status"] == "done"
    return job_id


def frames_seen(monkeypatch, queue, each=None) -> list:
    """(step, steps) of the running film job each time a frame is rendered (clipstyle.jobs.film.render);
    ``each(n)`` is called before the n-th frame (from 1)."""
    import clipstyle.jobs.film as film_module

    seen, render = [], film_module.render

    def counted(*args, **kwargs):
        (job,) = [j for j in queue.jobs.values() if j.film and j.status == "running"]
        seen.append((job.step, job.steps))
        if each is not None:
            each(len(seen), job)
        return render(*args, **kwargs)

    monkeypatch.setattr(film_module, "render", counted)
    return seen


def test_a_film_is_restyled_frame_by_frame_and_kept_in_the_gallery(server, queue, film, tmp_path, monkeypatch):
    from videos import audio_packets, decoded_frames

    style_job = styled(server)
    status, info = upload(server, film.read_bytes(), "clip.mp4")
    assert status == 200, info
    assert info["film"]["frames"] == FRAMES and (info["width"], info["height"]) == (48, 32)
    status, _, view = request("GET", f"{server}/files/uploads/{info['id']}.jpg")  # its first frame, for the page
    assert status == 200 and view[:2] == b"\xff\xd8"
    etas = []
    seen = frames_seen(monkeypatch, queue, lambda n, job: etas.append(job.public()["eta"]))
    status, body = post_json(f"{server}/api/jobs", {"apply": style_job, "upload": info["id"], "strength": 0.8})
    assert status == 200, body
    (job_id,) = body["jobs"]
    job = wait_for(server, job_id)
    assert job["status"] == "done", job["error"]
    # progress in frames: before the n-th frame is rendered, n - 1 are done, of the film's 16
    assert seen == [(n, FRAMES) for n in range(FRAMES)]
    assert etas[0] is None and all(e is not None for e in etas[1:])  # a time left once a frame is done
    assert (job["step"], job["steps"], job["size"]) == (FRAMES, FRAMES, [48, 32])
    assert job["film"] is True and job["video"] == f"{job_id}.mp4" and job["png"] is None
    # downloadable and playable: a film of every frame, the audio copied, under a readable name
    status, headers, data = request("GET", f"{server}/files/results/{job['video']}")
    assert status == 200 and headers["Content-Type"] == "video/mp4"
    assert 'filename="clip-fire-applied.mp4"' in headers["Content-Disposition"]
    got = tmp_path / "got.mp4"
    got.write_bytes(data)
    assert len(decoded_frames(got)) == FRAMES
    assert audio_packets(got) == audio_packets(film)
    status, headers, part = request("GET", f"{server}/files/results/{job['video']}", headers={"Range": "bytes=0-99"})
    assert status == 206 and part == data[:100]  # a player seeks by ranges
    status, full = get_json(f"{server}/api/jobs/{job_id}")
    record = json.loads(full["metadata"]["clipstyle"])
    assert record["input"] == "clip.mp4" and record["strength"] == 0.8
    # the page's <video> may load it: the policy allows media from the server itself
    status, headers, _ = request("GET", f"{server}/")
    assert "media-src 'self'" in headers["Content-Security-Policy"]
    # kept across a restart, with the film it was made from
    again = JobQueue(tiny_models(), queue.folder)
    assert again.jobs[job_id].video == f"{job_id}.mp4" and again.skipped == []
    assert again.upload_info(info["id"])["film"]["frames"] == FRAMES


def test_stop_ends_a_film_between_frames_and_keeps_nothing(server, queue, film, monkeypatch):
    style_job = styled(server)
    status, info = upload(server, film.read_bytes(), "clip.mp4")
    holder = {}
    seen = frames_seen(monkeypatch, queue, lambda n, job: n == 4 and holder.setdefault("stop", queue.stop(job.id)))
    status, body = post_json(f"{server}/api/jobs", {"apply": style_job, "upload": info["id"]})
    (job_id,) = body["jobs"]
    job = wait_for(server, job_id)
    assert job["status"] == "cancelled" and job["step"] == 4  # ended after the frame it was rendering
    assert len(seen) == 4
    assert not [p.name for p in queue.results.iterdir() if job_id in p.name]  # no film, no temporary file
    assert "fire" in queue.job(style_job)["prompt"]  # the rest of the gallery is untouched


def test_hostile_or_truncated_films_are_refused_in_one_line_and_leave_nothing(tmp_path, film):
    from videos import make_video

    data = film.read_bytes()
    faststart = make_video(tmp_path / "fs.mp4", frames=40, faststart=True).read_bytes()
    cases = [
        (b"just some text", "notes.mp4", "notes.mp4: cannot read it as a video"),
        (data[: len(data) // 2], "half.mp4", "half.mp4: cannot read it as a video"),
        # the index first: it opens and decodes, but holds fewer frames than it states
        (faststart[: len(faststart) * 6 // 10], "cut.mp4", "cut.mp4: is truncated or damaged"),
        (make_video(tmp_path / "a.mp4", video=False).read_bytes(), "sound.mp4", "sound.mp4: holds audio only"),
        (
            make_video(tmp_path / "big.mp4", size=(64, 48), frames=2).read_bytes(),
            "big.mkv",
            "big.mkv: frames of 64x48 pixels, over the limit of 2,000",
        ),
    ]
    queue = JobQueue(tiny_models(), tmp_path / "served", max_pixels=2000)
    with running(queue) as base:
        for body, name, expected in cases:
            status, answer = upload(base, body, name)
            assert status == 400 and answer["error"].startswith(expected), (name, answer)
            assert "\n" not in answer["error"] and str(tmp_path) not in answer["error"]
        assert list(queue.uploads.iterdir()) == []  # nothing kept, no temporary file
        status, ok = upload(base, data, "clip.mp4")  # 48x32 frames: within the limit
        assert status == 200, ok


def test_a_film_takes_only_a_saved_style_and_is_no_mask(server, queue, film):
    status, info = upload(server, film.read_bytes(), "clip.mp4")
    status, body = post_json(f"{server}/api/jobs", {"upload": info["id"], "prompts": ["fire"], "form": TINY})
    assert status == 400 and body["error"] == (
        "clip.mp4: a film is restyled with a saved style: use Apply on a finished result"
    )
    status, photo = upload(server, jpeg(), "photo.jpg")
    form = {**TINY, "mask": info["id"]}
    status, body = post_json(f"{server}/api/jobs", {"upload": photo["id"], "prompts": ["fire"], "form": form})
    assert status == 400 and body["error"] == "clip.mp4: a mask is an image, not a film"
    assert queue.jobs == {}


def test_films_share_the_upload_space(tmp_path, film):
    data = film.read_bytes()
    queue = JobQueue(tiny_models(), tmp_path / "served", upload_space=len(data) * 3 // 2)
    with running(queue) as base:
        status, first = upload(base, data, "one.mp4")
        assert status == 200
        status, second = upload(base, data, "two.mp4")  # the first, used by no job, makes room
        assert status == 200
        assert sorted(p.name for p in queue.uploads.iterdir()) == sorted(
            f"{second['id']}.{s}" for s in ("mp4", "jpg", "json")
        )
        assert queue.upload_bytes() <= queue.upload_space
    small = JobQueue(tiny_models(), tmp_path / "small", upload_space=len(data) // 2)
    with running(small) as base:
        status, answer = upload(base, data, "one.mp4")
        assert status == 507 and "upload space" in answer["error"]
        assert list(small.uploads.iterdir()) == []


def test_without_pyav_the_page_says_how_to_install_it(server, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` fails as when PyAV is not installed
    status, answer = upload(server, b"\x00\x00\x00\x18ftypmp42 not read", "clip.mp4")
    assert status == 400
    assert answer["error"] == "clip.mp4: reading and writing video needs PyAV: pip install 'clipstyle[video]'"
    status, photo = upload(server, jpeg(), "photo.jpg")  # photos do not need it
    assert status == 200


def test_the_config_says_whether_films_can_be_uploaded(tmp_path, monkeypatch):
    from clipstyle.serve.jobs import form_schema

    assert form_schema()["films"]["available"] is (_has_av())
    monkeypatch.setitem(sys.modules, "av", None)
    films = form_schema()["films"]
    assert films["available"] is False and "pip install 'clipstyle[video]'" in films["hint"]
    assert ".mp4" in films["suffixes"]


def _has_av() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


def test_planted_film_records_never_name_another_file(tmp_path):
    base = {"kind": "apply", "upload": "0123456789abcdef", "input_name": "clip.mp4", "prompt": "fire"}
    job_id = "abcdefabcdef"
    good = {**base, "id": job_id, "status": "done", "video": f"{job_id}.mp4", "film": True, "png": None}
    assert Job.from_record(good, job_id) is not None
    for change in (
        {"video": "../../secret.mp4"},
        {"video": "bbbbbbbbbbbb.mp4"},
        {"video": f"{job_id}.png"},
        {"video": None},  # neither an image nor a film
        {"film": "yes"},
    ):
        assert Job.from_record({**good, **change}, job_id) is None, change


def test_a_film_refuses_the_region_controls_as_clipstyle_apply_does(server, queue, film):
    style_job = styled(server)
    status, info = upload(server, film.read_bytes(), "clip.mp4")
    before = set(queue.jobs)
    form = {"preserve_color": True}
    status, body = post_json(f"{server}/api/jobs", {"apply": style_job, "upload": info["id"], "form": form})
    assert status == 400 and body["error"] == "clip.mp4: the region and colour controls work on photos, not on films"
    assert set(queue.jobs) == before
    status, body = post_json(f"{server}/api/jobs", {"apply": style_job, "upload": info["id"], "form": {"where": ""}})
    assert status == 200, body  # empty controls (the page always sends them) are no region
    assert wait_for(server, body["jobs"][0])["status"] == "done"
