"""`clipstyle serve` attacked: planted records, hostile form values and uploads, cross-site and
rebinding requests, floods, full and read-only folders, restarts. Each test is one finding of
docs/security.md ("clipstyle serve"); servers bind 127.0.0.1 on free ports and stop by themselves."""

from __future__ import annotations

import errno
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from clipstyle.errors import ClipstyleError, OutputError
from clipstyle.jobs.pairs import pair_seed
from clipstyle.serve.jobs import MAX_STEPS, Job, JobQueue
from serve_support import TINY, get_json, jpeg, post_json, request, running, start, upload, wait_for

from conftest import PATIENCE, counting_loader, invoke

ROOT = Path(__file__).parents[1]


def files_in(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def raw_post(url: str, body: bytes):
    """POST ``body`` as JSON, byte for byte (json.dumps would not write what an attacker sends)."""
    return request("POST", url, body, {"Content-Type": "application/json"})


def one_line_error(status_body) -> str:
    status, _, body = status_body
    data = json.loads(body)
    assert set(data) == {"error"} and "\n" not in data["error"] and "Traceback" not in data["error"]
    return data["error"]


# --- records on disk ----------------------------------------------------------------------------------


def good_record(job_id: str, upload_id: str = "0123456789abcdef") -> dict:
    return {
        "id": job_id,
        "kind": "stylize",
        "upload": upload_id,
        "input_name": "photo.jpg",
        "prompt": "fire",
        "status": "done",
        "png": f"{job_id}.png",
        "style": None,
        "metadata": {"prompt": "fire"},
        "losses": [[10, 1.5]],
        "size": [32, 24],
        "seed": 12,
    }


def test_planted_records_never_name_another_file(tmp_path, models):
    """Critical: a record naming ../../etc/passwd (or any file but its own) was served by the preview route.
    Records are checked field by field on load; the preview reads the job's own PNG name anyway."""
    folder = tmp_path / "served"
    results = folder / "results"
    results.mkdir(parents=True)
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    Image.new("RGB", (8, 8)).save(results / "aaaaaaaaaaaa.png")
    bad = {
        "111111111111": {"png": "../../secret.txt"},
        "222222222222": {"png": str(secret)},
        "333333333333": {"png": "aaaaaaaaaaaa.png"},  # another job's file
        "444444444444": {"style": "../../secret.txt"},
        "555555555555": {"upload": "../../secret"},
        "666666666666": {"style_of": "../x"},
        "777777777777": {"status": "running"},
        "888888888888": {"input_name": "a/b\x00.jpg"},
        "999999999999": {"metadata": {"x": ["not text"]}},
        "aaaaaaaaaaab": {"kind": "shell"},
        "aaaaaaaaaaac": {"prompt": ["fire"]},
        "aaaaaaaaaaad": {"losses": "x"},
        "aaaaaaaaaaae": {"unknown_field": 1},
        "aaaaaaaaaaaf": {"seed": 1.5},
    }
    for job_id, change in bad.items():
        Image.new("RGB", (8, 8)).save(results / f"{job_id}.png")
        (results / f"{job_id}.json").write_text(json.dumps({**good_record(job_id), **change}))
    (results / "bbbbbbbbbbbb.json").write_text(json.dumps({**good_record("cccccccccccc")}))  # id not its name
    (results / "dddddddddddd.json").write_text("[" * 100000)  # nesting deeper than the parser's recursion
    Image.new("RGB", (8, 8)).save(results / "eeeeeeeeeeee.png")
    (results / "eeeeeeeeeeee.json").write_text(json.dumps(good_record("eeeeeeeeeeee")))
    queue = JobQueue(models, folder, preview_seconds=0)
    assert list(queue.jobs) == ["eeeeeeeeeeee"]  # the one record as the server writes them
    assert sorted(queue.skipped) == sorted([f"{i}.json" for i in bad] + ["bbbbbbbbbbbb.json", "dddddddddddd.json"])
    with running(queue) as base:
        for job_id in [*bad, "bbbbbbbbbbbb", "cccccccccccc"]:
            status, _, body = request("GET", f"{base}/api/jobs/{job_id}/preview")
            assert status == 404 and b"secret" not in body
        assert request("GET", f"{base}/api/jobs/eeeeeeeeeeee/preview")[0] == 200
    # a record changed after it was loaded still cannot lead the preview elsewhere
    queue.jobs["eeeeeeeeeeee"].png = "../../secret.txt"
    data, media = queue.preview("eeeeeeeeeeee")
    assert media == "image/png" and data == (results / "eeeeeeeeeeee.png").read_bytes()


def test_every_record_the_server_writes_is_loaded_again(server, queue, models):
    _, (job_id,) = start(server, prompts=("fire <b>é</b>\u202e",))
    wait_for(server, job_id)
    _, body = post_json(f"{server}/api/jobs", {"apply": job_id, "upload": queue.jobs[job_id].upload, "strength": 0.5})
    (applied,) = body["jobs"]
    assert wait_for(server, applied)["status"] == "done"
    for made in (job_id, applied):
        record = json.loads((queue.results / f"{made}.json").read_text())
        assert Job.from_record(record, made) is not None
    again = JobQueue(models, queue.folder)
    assert sorted(again.jobs) == sorted([job_id, applied]) and again.skipped == []


# --- form values --------------------------------------------------------------------------------------


def test_hostile_form_values_get_one_line_and_queue_nothing(server):
    status, info = upload(server, jpeg())
    uid = info["id"]
    url = f"{server}/api/jobs"
    cases = [
        ({"preset": ["draft"]}, "unknown preset ['draft']"),
        ({"preset": {"a": 1}}, "unknown preset {'a': 1}"),
        ({"seed": 1.7}, "seed: 1.7 is not an integer"),
        ({"seed": "1.7"}, "seed: '1.7' is not an integer"),
        ({"seed": True}, "seed: True is not an integer"),
        ({"seed": [1]}, "seed: [1] is not an integer"),
        ({"steps": True}, "steps: True is not an integer"),
        ({"steps": [3]}, "steps: [3] is not an integer"),
        ({"steps": 2.5}, "steps: 2.5 is not an integer"),
        ({"lr": {"x": 1}}, "lr: {'x': 1} is not a number"),
        ({"size": 10**400}, "size: 1000000000000000000000000000000000000..."),
        ({"size": 2**31}, "size: 2147483648 is too large"),
        ({"steps": MAX_STEPS + 1}, f"steps: at most {MAX_STEPS:,} on this server"),
        ({"source": "x" * 5000}, "source: 5,000 characters, at most 1,000"),
        ({"source": "\u200b "}, "the source text is empty"),
    ]
    for form, message in cases:
        got = one_line_error(raw_post(url, json.dumps({"upload": uid, "prompts": ["fire"], "form": form}).encode()))
        assert got.startswith(message), (form, got)
    raw = [  # what json.dumps would not write: Infinity, NaN, lone surrogates
        (b'{"upload": "%s", "prompts": ["fire"], "form": {"seed": Infinity}}', "seed: inf is not an integer"),
        (b'{"upload": "%s", "prompts": ["fire"], "form": {"seed": -Infinity}}', "seed: -inf is not an integer"),
        (b'{"upload": "%s", "prompts": ["fire"], "form": {"lr": NaN}}', "lr: nan is not a number"),
        (b'{"upload": "%s", "prompts": ["fire"], "form": {"lambda_tv": Infinity}}', "lambda tv: inf is not"),
        (b'{"upload": "%s", "prompts": ["fire\\ud800"], "form": {}}', "the prompt is not valid UTF-8"),
        (b'{"upload": "%s", "prompts": [1, 2], "form": {}}', "prompts must be a list of texts"),
        (b'{"upload": "%s", "prompts": {"a": 1}, "form": {}}', "prompts must be a list of texts"),
        (b'{"upload": "%s", "prompts": ["fire"], "form": [1]}', "form must be an object"),
        (b'{"upload": ["%s"], "prompts": ["fire"], "form": {}}', "no such upload"),
        (b'{"upload": "%s", "apply": ["x"]}', "that result has no style file"),
        (b'{"upload": "%s", "prompts": ["fire"], "form": {"source": "a\\ud800"}}', "the source text is not valid"),
    ]
    for body, message in raw:
        got = one_line_error(raw_post(url, body.replace(b"%s", uid.encode())))
        assert got.startswith(message), (body, got)
    got = one_line_error(raw_post(url, json.dumps({"upload": uid, "prompts": ["x" * 1001]}).encode()))
    assert got == "a prompt has 1,001 characters: at most 1,000"
    assert get_json(f"{server}/api/state")[1]["jobs"] == []


def test_a_size_the_cli_refuses_is_refused_at_once(server, queue, monkeypatch, tmp_path, photo):
    """`--size 3000` (27 GB) was queued and ran, unstoppable; serve now checks memory as run does, at submit."""
    import clipstyle.jobs.memory as memory

    counting_loader(monkeypatch)

    monkeypatch.setattr(memory, "host_memory", lambda: 2 * 10**9)
    status, info = upload(server, jpeg(48, 32))
    status, body = post_json(
        f"{server}/api/jobs", {"upload": info["id"], "prompts": ["fire"], "form": {**TINY, "size": 1024, "crops": 64}}
    )
    assert status == 400 and "needs at least" in body["error"] and "lower the size" in body["error"], body
    assert get_json(f"{server}/api/state")[1]["jobs"] == []
    result = invoke("run", "-p", "fire", photo, "-o", tmp_path / "x.png", "--size", 1024, "--crops", 64)
    assert result.exit_code == 1 and "needs at least" in result.output  # the CLI refuses the same


# --- bounds -------------------------------------------------------------------------------------------


def test_the_queue_is_bounded_and_refuses_politely(tmp_path, models):
    queue = JobQueue(models, tmp_path / "served", preview_seconds=0, max_queued=2)
    with running(queue) as base:
        _, (first,) = start(base, form={**TINY, "steps": MAX_STEPS})
        wait_for(base, first, ("running",))
        status, info = upload(base, jpeg())
        body = {"upload": info["id"], "prompts": ["a", "b"], "form": TINY}
        assert post_json(f"{base}/api/jobs", body)[0] == 200
        status, refused = post_json(f"{base}/api/jobs", {**body, "prompts": ["c"]})
        assert status == 429 and refused["error"].startswith("2 jobs are waiting, at most 2"), refused
        assert len(get_json(f"{base}/api/state")[1]["jobs"]) == 3
        post_json(f"{base}/api/jobs/{first}/stop", {})


def test_submitting_and_cancelling_in_a_loop_keeps_the_state_bounded(tmp_path, models):
    """Cancelled (and failed) jobs have no result: at most max_queued of them are kept, the oldest
    forgotten, with the uploads only they used; once 960 jobs queued and cancelled grew every page's state."""
    queue = JobQueue(models, tmp_path / "served", preview_seconds=0, max_queued=3)
    first = queue.add_upload(jpeg(), "first.jpg")
    kept = queue.add_upload(jpeg(40, 30), "kept.jpg")
    ids = []
    for upload_id in (first["id"], *[kept["id"]] * 5):  # not started: every job waits, then is cancelled
        (job,) = queue.submit_stylize(upload_id, ["fire"], TINY)
        queue.stop(job.id)
        ids.append(job.id)
    assert list(queue.jobs) == ids[-3:] and all(j.status == "cancelled" for j in queue.jobs.values())
    assert first["id"] not in {j.upload for j in queue.jobs.values()}  # its upload is no longer held
    queue.upload_space = queue.upload_bytes()  # full: room is made from uploads no job uses
    queue.add_upload(jpeg(32, 24), "new.jpg")
    assert not (queue.uploads / f"{first['id']}.bin").exists()


def test_apply_strength_beyond_any_number_is_one_line(server):
    _, (job_id,) = start(server)
    wait_for(server, job_id)
    status, info = upload(server, jpeg(), "other.jpg")
    for strength in (10**400, "1e400", float("inf")):
        body = json.dumps({"apply": job_id, "upload": info["id"], "strength": strength}).encode()
        got = one_line_error(raw_post(f"{server}/api/jobs", body))
        assert got.startswith(("strength: ", "strength must be between 0 and 1")), (strength, got)


def test_a_huge_body_is_refused_before_it_is_read(server):
    """A 100 MB body was read whole; now its Content-Length alone is refused (no byte of it is sent here)."""
    host, port = server.removeprefix("http://").split(":")
    for path, length in (("/api/jobs", 100 * 1024**2), ("/api/uploads", 10 * 1024**3)):
        with socket.create_connection((host, int(port))) as sock:
            sock.settimeout(PATIENCE)  # the answer comes at once, without the body
            head = (
                f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Clipstyle: 1\r\n"
                f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
            )
            sock.sendall(head.encode())
            answer = sock.recv(65536).decode("latin-1")
        assert answer.startswith("HTTP/1.1 413"), answer[:200]
    status, _, _ = raw_post(f"{server}/api/jobs", b'{"prompts": ["' + b"x" * 70000 + b'"]}')
    assert status == 413


def test_uploads_share_a_disk_budget_and_unused_ones_go_first(tmp_path, models):
    queue = JobQueue(models, tmp_path / "served")
    a = queue.add_upload(jpeg(48, 32), "a.jpg")
    time.sleep(0.01)
    b = queue.add_upload(jpeg(40, 30), "b.jpg")
    (waiting,) = queue.submit_stylize(b["id"], ["fire"], TINY)  # b is used by a job, a by none
    queue.upload_space = queue.upload_bytes()  # full
    c = queue.add_upload(jpeg(32, 24), "c.jpg")  # makes room: a, unused and oldest, is removed
    assert {p.name.split(".")[0] for p in queue.uploads.iterdir()} == {b["id"], c["id"]}
    (other,) = queue.submit_stylize(c["id"], ["fire"], TINY)
    with pytest.raises(ClipstyleError, match=r"upload space \(\d+ MB\) is full"):
        queue.add_upload(jpeg(60, 40), "d.jpg")
    assert {p.name.split(".")[0] for p in queue.uploads.iterdir()} == {b["id"], c["id"]}
    assert queue.upload_bytes() <= queue.upload_space
    queue.stop(waiting.id), queue.stop(other.id)  # cancelled: not kept, so b and c are used by no kept job
    with running(queue) as base:
        status, body = upload(base, jpeg(60, 40), "d.jpg")
        assert status == 507 and "upload space" in body["error"]
        with pytest.raises(ClipstyleError, match="upload the photo again"):
            queue.upload_info(a["id"])
    # at the next start, uploads no kept job refers to are removed (the waiting jobs were dropped)
    JobQueue(models, tmp_path / "served")
    assert list(queue.uploads.iterdir()) == []


def test_the_same_bytes_under_another_name_leave_the_first_upload_alone(server, queue):
    """Re-uploading a photo's bytes as b.jpg renamed a.jpg's upload and so changed its seed."""
    data = jpeg()
    _, a = upload(server, data, "a.jpg")
    _, b = upload(server, data, "b.jpg")
    assert a["id"] != b["id"] and a["sha256"] == b["sha256"]
    assert upload(server, data, "a.jpg")[1]["id"] == a["id"]  # the same name again: the same upload
    assert queue.upload_info(a["id"])["name"] == "a.jpg"
    status, body = post_json(f"{server}/api/jobs", {"upload": a["id"], "prompts": ["fire"], "form": TINY})
    job = queue.jobs[body["jobs"][0]]
    assert job.input_name == "a.jpg" and job.seed == pair_seed(0, "a.jpg", "fire")


# --- hostile uploads ----------------------------------------------------------------------------------


def test_hostile_uploads_are_refused_or_kept_harmless(server, queue):
    svg = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'
    html = b"<!doctype html><script>alert(1)</script>"
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, format="PNG")  # 400 million pixels in a small file
    for data, name, message in [
        (svg, "x.svg", "x.svg: not an image"),
        (html, "x.html", "x.html: not an image"),
        (bomb.getvalue(), "bomb.png", "bomb.png: image has 20000x20000"),
        (jpeg()[:300], "cut.jpg", "cut.jpg: "),
    ]:
        status, body = upload(server, data, name)
        assert status == 400 and body["error"].startswith(message), (name, body)
    # a polyglot: a real GIF with HTML after it. It is an image, so it is kept, but its bytes are
    # never served: the page gets a JPEG made from its pixels
    gif = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(gif, format="GIF")
    status, info = upload(server, gif.getvalue() + html, "poly.gif")
    assert status == 200
    status, headers, body = request("GET", f"{server}/files/uploads/{info['id']}.jpg")
    assert status == 200 and body[:3] == b"\xff\xd8\xff" and b"<script>" not in body
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert request("GET", f"{server}/files/uploads/{info['id']}.bin")[0] == 404
    assert files_in(queue.uploads) == {f"{info['id']}.{s}" for s in ("bin", "jpg", "json")}  # nothing of the others


def test_names_and_prompts_with_markup_control_and_bidi_characters(server, queue):
    name = "<img src=x onerror=alert(1)>\u202egpj.exe\u0007\r\n.jpg"
    status, info = upload(server, jpeg(), name)
    assert status == 200 and info["name"] == "<img src=x onerror=alert(1)>gpj.exe.jpg"  # no control, no bidi
    prompt = "</script><b>fire</b> \u202eerif"
    status, body = post_json(f"{server}/api/jobs", {"upload": info["id"], "prompts": [prompt], "form": TINY})
    job = wait_for(server, body["jobs"][0])
    status, headers, raw = request("GET", f"{server}/api/jobs/{job['id']}")
    assert headers["Content-Type"] == "application/json" and json.loads(raw)["prompt"] == prompt
    status, headers, _ = request("GET", f"{server}/files/results/{job['png']}")
    disposition = headers["Content-Disposition"]
    assert "<" not in disposition and "\u202e" not in disposition and "/" not in disposition.split("filename")[1]
    # the page writes every server value as text, never as markup
    script = (ROOT / "src/clipstyle/serve/static/app.js").read_text()
    assert "innerHTML" not in script and "outerHTML" not in script and "insertAdjacentHTML" not in script


# --- cross-site and host tricks -----------------------------------------------------------------------


def test_cross_site_requests_and_host_tricks(server):
    port = server.rsplit(":", 1)[1]
    form = "application/x-www-form-urlencoded"
    for method, path, headers in [
        ("POST", "/api/uploads", {"X-Clipstyle": "", "Content-Type": form}),  # a plain HTML form post
        ("POST", "/api/jobs", {"X-Clipstyle": "0", "Content-Type": "text/plain"}),
        ("DELETE", "/api/jobs/aaaaaaaaaaaa", {"X-Clipstyle": "", "Origin": "http://evil.example"}),
    ]:
        assert request(method, server + path, b"x=1", headers)[0] == 403
    # the preflight another site's page needs to send the header gets no permission
    status, headers, _ = request(
        "OPTIONS",
        f"{server}/api/jobs",
        None,
        {
            "Origin": "http://evil.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-clipstyle",
        },
    )
    assert not any(k.lower().startswith("access-control-allow") for k in headers)
    for host, code in [
        (f"127.0.0.1:{port}", 200),
        (f"localhost:{port}", 200),
        (f"[::1]:{port}", 200),  # --host ::1 refused its own Host header
        ("[::1]", 200),
        ("evil.example", 400),  # DNS rebinding
        (f"127.0.0.1.evil.example:{port}", 400),
        ("localhost.evil.example", 400),
        (f"evil.example@127.0.0.1:{port}", 400),
        ("127.0.0.1:80:80", 400),
        ("[::1]x", 400),
        ("", 400),
    ]:
        assert request("GET", f"{server}/api/state", None, {"Host": host})[0] == code, host
    for path in ("/", "/api/state", "/static/app.js"):
        assert request("GET", server + path)[1]["Cross-Origin-Resource-Policy"] == "same-origin", path


def test_on_the_network_ip_addresses_and_the_machine_names_are_accepted_other_names_not(tmp_path, models):
    with running(JobQueue(models, tmp_path / "s"), loopback=False, hosts=("studio",)) as base:
        for host, code in [
            ("192.168.1.20:7860", 200),
            ("[fe80::1]:7860", 200),
            ("studio:7860", 200),
            ("evil.example", 400),
            ("1.2.3.4.nip.io", 400),
        ]:
            assert request("GET", f"{base}/api/state", None, {"Host": host})[0] == code, host


def test_traversal_in_every_route_that_takes_an_id(server, queue, tmp_path):
    _, (job_id,) = start(server)
    wait_for(server, job_id)
    (tmp_path / "secret.json").write_text('{"secret": 1}')
    for bad in ["..%2F..%2Fsecret", "..", "%2e%2e%2f%2e%2e%2fsecret", job_id + "%00", job_id.upper(), "a" * 5000]:
        for method, path in [
            ("GET", f"/api/jobs/{bad}"),
            ("GET", f"/api/jobs/{bad}/preview"),
            ("POST", f"/api/jobs/{bad}/stop"),
            ("DELETE", f"/api/jobs/{bad}"),
            ("GET", f"/files/results/{bad}.png"),
            ("GET", f"/files/uploads/{bad}.jpg"),
        ]:
            status, _, body = request(method, server + path, b"{}" if method == "POST" else None)
            assert status == 404 and b"secret" not in body, (method, path, status)
    assert job_id in queue.jobs


# --- deleting, stopping, failing writes ---------------------------------------------------------------


def test_delete_and_apply_while_running_or_waiting(tmp_path, models):
    """A deleted style source broke a queued apply with `internal error: KeyError`."""
    queue = JobQueue(models, tmp_path / "served", preview_seconds=0)
    with running(queue) as base:
        _, (source,) = start(base)
        wait_for(base, source)
        _, (long,) = start(base, prompts=("long",), form={**TINY, "steps": MAX_STEPS})
        wait_for(base, long, ("running",))
        status, body = post_json(f"{base}/api/jobs/{long}", {}, method="DELETE")
        assert status == 409 and body["error"] == "stop the job first"
        status, other = upload(base, jpeg(40, 30), "other.jpg")
        _, applied = post_json(f"{base}/api/jobs", {"apply": source, "upload": other["id"]})
        (apply_id,) = applied["jobs"]
        status, body = post_json(f"{base}/api/jobs/{source}", {}, method="DELETE")
        assert status == 409 and "uses its style" in body["error"]
        (queue.results / f"{source}.style").unlink()  # gone from disk all the same
        post_json(f"{base}/api/jobs/{long}/stop", {})
        job = wait_for(base, apply_id)
        assert job["status"] == "failed" and job["error"] == "the style was deleted before this job ran"
        assert not (queue.results / f"{apply_id}.png").exists()


def test_a_running_apply_job_can_be_stopped(server, queue, monkeypatch):
    """Apply jobs ignored Stop: a large photo held the device to the end. Now Stop ends them between tiles."""
    import clipstyle.jobs.apply as apply_module

    _, (source,) = start(server)
    wait_for(server, source)
    tiles = []

    def endless_render(*args, callback, **kwargs):  # a render that never ends unless its callback stops it
        while True:
            tiles.append(1)
            callback(len(tiles), 10**9)
            time.sleep(0.01)

    monkeypatch.setattr(apply_module, "render", endless_render)
    status, other = upload(server, jpeg(40, 30), "other.jpg")
    _, body = post_json(f"{server}/api/jobs", {"apply": source, "upload": other["id"]})
    (apply_id,) = body["jobs"]
    wait_for(server, apply_id, ("running",))
    while not tiles:
        time.sleep(0.01)
    assert post_json(f"{server}/api/jobs/{apply_id}/stop", {})[0] == 200
    job = wait_for(server, apply_id)
    assert job["status"] == "cancelled" and job["png"] is None
    assert not any(apply_id in f for f in files_in(queue.folder))


def test_a_read_only_folder_gives_a_clear_error_and_keeps_the_entry(server, queue, monkeypatch, tmp_path):
    _, (job_id,) = start(server)
    wait_for(server, job_id)
    real_unlink = Path.unlink

    def read_only(self, missing_ok=False):
        if self.parent in (queue.results, queue.uploads):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", read_only)
    status, body = post_json(f"{server}/api/jobs/{job_id}", {}, method="DELETE")
    assert status == 409 and body["error"] == "cannot delete the result: Read-only file system"
    assert job_id in queue.jobs and (queue.results / f"{job_id}.png").exists()
    assert [j["id"] for j in get_json(f"{server}/api/state")[1]["jobs"]] == [job_id]
    monkeypatch.setattr(Path, "unlink", real_unlink)
    assert post_json(f"{server}/api/jobs/{job_id}", {}, method="DELETE")[0] == 200
    assert not any(job_id in f for f in files_in(queue.folder))


def test_a_full_disk_leaves_no_orphan_files_and_no_server_path(server, queue, monkeypatch, tmp_path):
    import clipstyle.serve.jobs as serve_jobs

    real = serve_jobs.write_atomic
    calls = []

    def full_after_one(path, write, overwrite=False):
        calls.append(path)
        if len(calls) > 1:
            raise OutputError("cannot write: No space left on device", path)
        return real(path, write, overwrite)

    monkeypatch.setattr(serve_jobs, "write_atomic", full_after_one)
    status, body = upload(server, jpeg(), "photo.jpg")
    assert status == 507 and body["error"].startswith("cannot keep photo.jpg: the server's disk is full"), body
    assert str(tmp_path) not in body["error"] and "uploads/" not in body["error"]
    assert files_in(queue.folder) == set()  # the first file written is removed too
    monkeypatch.setattr(serve_jobs, "write_atomic", real)

    # a style file that cannot be written: the job fails in one line, its PNG does not stay
    import clipstyle.jobs.run as run_module

    def no_space(path, network, metadata, overwrite=False):
        raise OutputError("cannot write: No space left on device", path)

    monkeypatch.setattr(run_module, "save_style", no_space)
    _, (job_id,) = start(server)
    job = wait_for(server, job_id)
    assert job["status"] == "failed" and "No space left on device" in job["error"], job
    assert str(tmp_path) not in job["error"] and str(queue.folder.resolve()) not in job["error"]
    assert not any(job_id in f for f in files_in(queue.folder))


# --- stopping the server ------------------------------------------------------------------------------


def test_a_restart_removes_what_a_killed_server_left(tmp_path, models):
    folder = tmp_path / "served"
    queue = JobQueue(models, folder)
    info = queue.add_upload(jpeg(), "photo.jpg")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    left = queue.results / f".abcdefabcdef.png.{dead_pid}-3.tmp"
    live = queue.results / f".abcdefabcdef.style.{os.getppid()}-1.tmp"  # a writer that is still running
    unfinished = [queue.results / "abcdefabcdef.png", queue.results / "abcdefabcdef.style"]  # killed before its record
    skipped = [queue.results / "bbbbbbbbbbbb.png", queue.results / "bbbbbbbbbbbb.json"]  # a record not loaded
    for path in (left, live, *unfinished, *skipped):
        path.write_bytes(b"partial")
    again = JobQueue(models, folder)
    assert not left.exists() and live.exists()
    assert not any(p.exists() for p in unfinished) and all(p.exists() for p in skipped)
    assert again.skipped == ["bbbbbbbbbbbb.json"]
    assert not (queue.uploads / f"{info['id']}.bin").exists()  # no job refers to it


def test_serve_without_weights_leaves_no_folder(tmp_path, monkeypatch):
    import clipstyle.cli.serve as serve_cli

    def no_weights(*args, **kwargs):
        raise ClipstyleError("CLIP weights not found (offline)")

    monkeypatch.setattr(serve_cli, "load_models_from_options", no_weights)
    monkeypatch.setattr(serve_cli, "bind", lambda host, port: socket.socket())
    result = invoke("serve", "--folder", tmp_path / "new" / "served")
    assert result.exit_code == 1 and "weights not found" in result.output
    assert not (tmp_path / "new").exists()


SERVE_CHILD = """
import sys
sys.path.insert(0, sys.argv[2])
import clipstyle.cli.serve as serve
from conftest import tiny_models
serve.load_models_from_options = lambda *a, **k: tiny_models()
from clipstyle.cli import main
main(["serve", "--port", "0", "--folder", sys.argv[1]])
"""


def test_sigterm_after_a_finished_job_ends_cleanly(tmp_path):
    """The real command in its own process: after a job finished, SIGTERM printed `interrupted: 0 ok, ...`
    (the start-up handler's line, exiting before the queue was closed)."""
    import signal

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, "-c", SERVE_CHILD, str(tmp_path / "served"), str(ROOT / "tests")],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = ""
        while "serving on" not in line:
            line = child.stderr.readline()
            assert line, "the server ended before serving"
        base = line.split("serving on ")[1].split()[0]
        _, (job_id,) = start(base)
        assert wait_for(base, job_id)["status"] == "done"
        child.send_signal(signal.SIGTERM)
        rest = child.stderr.read()
        code = child.wait()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert code == 130
    assert rest.strip() == "clipstyle: interrupted", rest
    assert {f"results/{job_id}.{s}" for s in ("png", "style", "json")} <= files_in(tmp_path / "served")
    assert not [f for f in files_in(tmp_path / "served") if f.endswith(".tmp")]


def test_benchmark_serve_start_imports_what_exists():
    """benchmarks/serve_start.py imported load_models from a module that had moved (docs/serve.md cites it)."""
    import ast
    import importlib

    source = (ROOT / "benchmarks/serve_start.py").read_text()
    child = next(
        n.value.value
        for n in ast.walk(ast.parse(source))
        if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "CHILD"
    )
    imports = [n for n in ast.walk(ast.parse(child)) if isinstance(n, ast.ImportFrom)]
    assert imports
    for node in imports:
        module = importlib.import_module(node.module)
        for alias in node.names:
            assert hasattr(module, alias.name), f"{node.module}.{alias.name}"


def test_cli_serve_names_the_records_it_did_not_load(tmp_path, monkeypatch):
    import clipstyle.cli.serve as serve_cli

    counting_loader(monkeypatch, "serve")
    real_bind = serve_cli.bind
    monkeypatch.setattr(serve_cli, "bind", lambda host, port: real_bind("127.0.0.1", 0))
    monkeypatch.setattr("uvicorn.Server.run", lambda self, sockets=None: None)
    results = tmp_path / "served" / "results"
    results.mkdir(parents=True)
    (results / "111111111111.json").write_text(json.dumps({**good_record("111111111111"), "png": "../../x.png"}))
    result = invoke("serve", "--folder", tmp_path / "served")
    assert result.exit_code == 0, result.output
    assert f"warning: {results}: 1 record(s) not loaded (not as clipstyle serve writes them): 111111111111.json" in (
        result.output
    )
