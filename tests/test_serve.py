"""`clipstyle serve` at the HTTP level: a real server on a free 127.0.0.1 port, tiny random models."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from clipstyle.config import PRESETS, Settings
from clipstyle.serve.jobs import FORM_FIELDS, JobQueue
from serve_support import TINY, get_json, jpeg, post_json, request, running, start, upload, wait_for

from conftest import PATIENCE, counting_loader, invoke


def files_in(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_the_form_comes_from_settings_and_presets(server):
    status, config = get_json(f"{server}/api/config")
    assert status == 200
    defaults = Settings()
    assert [f["name"] for f in config["fields"]] == list(FORM_FIELDS)
    assert {f["name"]: f["default"] for f in config["fields"]} == {n: getattr(defaults, n) for n in FORM_FIELDS}
    assert config["presets"] == PRESETS
    status, _, page = request("GET", f"{server}/")
    assert status == 200 and b'id="fields"' in page
    for name in FORM_FIELDS:  # nothing re-typed in the page: fields are built from /api/config
        assert f'"{name}"'.encode() not in page
        assert str(getattr(defaults, name)).encode() not in page.split(b"<main>")[1]


def test_a_job_streams_progress_then_lands_in_the_gallery_with_its_files(server, queue):
    events = urllib.request.urlopen(f"{server}/api/events", timeout=PATIENCE)
    _info, (job_id,) = start(server, form={**TINY, "steps": 12, "seed": 5})
    steps, previews = [], set()
    while True:
        line = events.readline().decode()
        if not line.startswith("data: "):
            continue
        job = next((j for j in json.loads(line[6:])["jobs"] if j["id"] == job_id), None)
        if job is None:
            continue
        steps.append(job["step"])
        previews.add(job["preview"])
        if job["status"] == "done":
            break
        assert job["status"] in ("queued", "running")
    events.close()
    # the stream sends the latest state, so a loaded machine may see few of the 12 steps: at least one
    # before the end, in order
    assert steps == sorted(steps) and steps[-1] == 12 and steps[0] < 12
    assert len(previews - {0}) >= 2
    assert job["losses"][-1][0] == 12 and job["eta"] is None and job["seconds"] > 0
    # the PNG carries the same metadata as `clipstyle run` writes, and downloads under a readable name
    status, headers, body = request("GET", f"{server}/files/results/{job['png']}")
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert 'filename="photo-fire.png"' in headers["Content-Disposition"]
    img = Image.open(io.BytesIO(body))
    assert img.size == tuple(job["size"]) == (32, 24)
    meta = json.loads(img.text["clipstyle"])
    assert img.text["prompt"] == "fire" and meta["settings"]["steps"] == 12 and meta["base_seed"] == 5
    assert str(meta["seed"]) == job["seed"] and meta["input"] == "photo.jpg"
    assert "metadata" not in job  # the state sent at every step stays small
    status, full = get_json(f"{server}/api/jobs/{job_id}")
    assert status == 200 and full["metadata"] == img.text  # the page shows the PNG's own text
    assert full["settings"] == Settings(**{**{k: v for k, v in TINY.items() if k != "preset"}, "steps": 12}).to_dict()
    # the style file is a clipstyle style with the run's prompt and seed
    status, headers, body = request("GET", f"{server}/files/results/{job['style']}")
    assert status == 200 and 'filename="photo-fire.style"' in headers["Content-Disposition"]
    from clipstyle.styles.stylefile import load_style

    style_path = queue.results / job["style"]
    assert style_path.read_bytes() == body
    style = load_style(style_path)
    assert style.metadata["prompt"] == "fire" and str(style.metadata["seed"]) == job["seed"]
    assert style.metadata["input"] == "photo.jpg"  # the name it was uploaded under, not the stored <hash>.bin


def test_the_seed_is_derived_as_the_cli_derives_it(tmp_path, server, queue, photo, monkeypatch):
    """Same photo name, prompt, seed and settings: the web result is `clipstyle run`'s, byte for byte."""
    _, (job_id,) = start(server, form={**TINY, "seed": 3}, data=photo.read_bytes(), name=photo.name)
    job = wait_for(server, job_id)
    counting_loader(monkeypatch)
    out = tmp_path / "cli.png"
    result = invoke(
        "run",
        "-p",
        "fire",
        photo,
        "-o",
        out,
        "--preset",
        "draft",
        "--steps",
        3,
        "--size",
        32,
        "--crops",
        2,
        "--crop-size",
        16,
        "--seed",
        3,
        "-q",
    )
    assert result.exit_code == 0, result.output
    assert Image.open(out).tobytes() == Image.open(queue.results / job["png"]).tobytes()
    cli_text, web_text = Image.open(out).text, get_json(f"{server}/api/jobs/{job_id}")[1]["metadata"]
    cli_meta, web_meta = json.loads(cli_text.pop("clipstyle")), json.loads(web_text.pop("clipstyle"))
    # the CLI records the models its options name (tests swap in tiny ones behind them); the server the loaded ones
    cli_meta.pop("models"), web_meta.pop("models")
    assert cli_text == web_text and cli_meta == web_meta


def test_one_worker_runs_jobs_first_in_first_out_and_shows_positions(server, queue):
    _, ids = start(server, prompts=("one", "two", "three"), form={**TINY, "steps": 6})
    _, state = get_json(f"{server}/api/state")
    waiting = [i for i in ids if i != state["running"]]
    assert state["queue"] == waiting[-len(state["queue"]) :]  # in order; the first may already run
    seen_running = []
    while True:
        _, state = get_json(f"{server}/api/state")
        jobs = {j["id"]: j for j in state["jobs"]}
        running_now = [i for i in ids if jobs[i]["status"] == "running"]
        assert len(running_now) <= 1
        if running_now and running_now[0] not in seen_running:
            seen_running.append(running_now[0])
        if all(jobs[i]["status"] == "done" for i in ids):
            break
        time.sleep(0.005)
    finished = [jobs[i]["finished"] for i in ids]
    assert finished == sorted(finished)
    assert seen_running == [i for i in ids if i in seen_running]


def test_stop_keeps_the_last_image_and_cancel_drops_a_queued_job(server, queue):
    _, (first, second) = start(server, prompts=("long", "queued"), form={**TINY, "steps": 1000})
    while wait_for(server, first, ("running",))["step"] < 3:
        time.sleep(0.01)
    status, body = post_json(f"{server}/api/jobs/{second}/stop", {})
    assert status == 200 and body["status"] == "cancelled"
    status, body = post_json(f"{server}/api/jobs/{first}/stop", {})
    assert status == 200
    job = wait_for(server, first)
    assert job["status"] == "stopped" and 3 <= job["step"] < 1000
    assert job["style"] is None  # the network behind the last image is not handed out mid-run
    img = Image.open(queue.results / job["png"])
    assert img.size == (32, 24)
    assert json.loads(img.text["clipstyle"])["stopped_at_step"] == job["step"]
    assert json.loads(img.text["clipstyle"])["compute"]["device"] == "cpu"  # as a finished job's PNG says
    assert wait_for(server, second)["status"] == "cancelled"
    assert not (queue.results / f"{second}.png").exists()
    status, body = post_json(f"{server}/api/jobs/nosuchjob000/stop", {})
    assert status == 404


def test_apply_a_saved_style_to_another_photo(server, queue):
    _, (job_id,) = start(server)
    wait_for(server, job_id)
    status, other = upload(server, jpeg(40, 60), "other.png")
    status, body = post_json(f"{server}/api/jobs", {"apply": job_id, "upload": other["id"], "strength": 0.5})
    assert status == 200, body
    applied = wait_for(server, body["jobs"][0])
    assert applied["status"] == "done", applied["error"]
    img = Image.open(queue.results / applied["png"])
    assert img.size == (40, 60)  # the photo's own size, as `clipstyle apply`
    assert img.text["prompt"] == "fire" and json.loads(img.text["clipstyle"])["strength"] == 0.5
    assert json.loads(img.text["clipstyle"])["input"] == "other.png"  # not the stored <hash>.bin
    status, body = post_json(f"{server}/api/jobs", {"apply": applied["id"], "upload": other["id"]})
    assert status == 400 and "no style file" in body["error"]


def test_bad_uploads_get_one_clear_line(tmp_path, models):
    queue = JobQueue(models, tmp_path / "served", max_pixels=1000)
    with running(queue, max_upload=20000) as base:
        cases = [
            (b"not an image at all", "notes.jpg", 400, "notes.jpg: not an image"),
            (jpeg(48, 32)[:200], "cut.jpg", 400, "cut.jpg: "),
            (jpeg(60, 40), "big.jpg", 400, "big.jpg: image has 60x40 = 2,400 pixels, over the limit of 1,000"),
            (jpeg(100, 4), "thin.jpg", 400, "thin.jpg: image is 100x4"),
            (b"", "empty.jpg", 400, "empty.jpg: empty file"),
            (b"x" * 30000, "huge.jpg", 413, "over the upload limit"),
        ]
        for data, name, code, message in cases:
            status, body = upload(base, data, name)
            assert status == code, (name, body)
            assert body["error"].startswith(message) if code == 400 else message in body["error"], body
            assert "\n" not in body["error"] and str(tmp_path) not in body["error"]
        status, body = upload(base, jpeg(30, 20), "../../évil\x00name.jpg")
        assert status == 200 and body["name"] == "évilname.jpg"
    assert files_in(tmp_path / "served") == {f"uploads/{body['id']}.{s}" for s in ("bin", "jpg", "json")}


def test_bad_form_values_are_refused_before_anything_is_queued(server, queue):
    status, info = upload(server, jpeg())
    cases = [
        ({"steps": "abc"}, "steps: 'abc' is not an integer"),
        ({"steps": 0}, "steps must be between 1 and 100,000"),
        ({"lr": "-1"}, "learning rate must be positive"),
        ({"preset": "fast"}, "unknown preset 'fast'"),
        ({"precision": "fp8"}, "precision must be one of"),
        ({"seed": "x"}, "seed: 'x' is not an integer"),
    ]
    for form, message in cases:
        status, body = post_json(f"{server}/api/jobs", {"upload": info["id"], "prompts": ["fire"], "form": form})
        assert status == 400 and body["error"].startswith(message), body
    status, body = post_json(f"{server}/api/jobs", {"upload": info["id"], "prompts": ["  ", ""], "form": {}})
    assert status == 400 and body["error"] == "the prompt is empty"
    status, body = post_json(f"{server}/api/jobs", {"upload": "0123456789abcdef", "prompts": ["x"], "form": {}})
    assert status == 400 and "upload the photo again" in body["error"]
    status, _, body = request("POST", f"{server}/api/jobs", b"{not json", {"Content-Type": "application/json"})
    assert status == 400
    assert get_json(f"{server}/api/state")[1]["jobs"] == []


def test_files_come_only_from_the_servers_own_folder(server, queue, tmp_path):
    _, (job_id,) = start(server)
    job = wait_for(server, job_id)
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    upload_id = job["upload"]
    for path in [
        f"/files/results/{job_id}.json",
        f"/files/uploads/{upload_id}.bin",
        f"/files/uploads/{upload_id}.json",
        "/files/results/..%2F..%2Fsecret.txt",
        "/files/..%2Fsecret.txt/x",
        "/files/results/%2e%2e",
        f"/files/results/..%2Fuploads%2F{upload_id}.bin",
        "/files/etc/passwd",
        "/static/..%2Fjobs.py",
        "/static/../jobs.py",
        "/files/results/" + job["png"].upper(),
    ]:
        status, _, body = request("GET", server + path)
        assert status == 404, path
        assert b"secret" not in body and b"import" not in body
    for path in [
        f"/files/results/{job['png']}",
        f"/files/results/{job['style']}",
        f"/files/uploads/{upload_id}.jpg",
        "/static/app.js",
        f"/api/jobs/{job_id}/preview",
    ]:
        assert request("GET", server + path)[0] == 200, path


def test_changes_need_the_header_and_the_page_loads_nothing_from_elsewhere(server):
    status, _, _ = request("POST", f"{server}/api/jobs/x/stop", b"", {"X-Clipstyle": ""})
    assert status == 403
    status, _, _ = request("GET", f"{server}/api/state", None, {"Host": "attacker.example"})
    assert status == 400  # DNS rebinding: only 127.0.0.1 and localhost are this server
    status, headers, _ = request("GET", f"{server}/")
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    import re

    static = Path(__file__).parents[1] / "src" / "clipstyle" / "serve" / "static"
    urls = set()
    for f in static.iterdir():
        urls |= set(re.findall(r"(?:https?:)?//[\w.-]+\.\w+[^\s\"'`)]*", f.read_text()))
    assert urls == {"http://www.w3.org/2000/svg"}  # an XML namespace name, never fetched


def test_the_gallery_is_kept_between_starts_and_delete_removes_files(tmp_path, models):
    folder = tmp_path / "served"
    with running(JobQueue(models, folder, preview_seconds=0)) as base:
        _, (job_id,) = start(base)
        wait_for(base, job_id)
        _, (gone,) = start(base, prompts=("ice",))
        wait_for(base, gone)
        status, _ = post_json(f"{base}/api/jobs/{gone}", {}, method="DELETE")
        assert status == 200
    assert not any(name.startswith(gone) for name in files_in(folder / "results"))
    again = JobQueue(models, folder)
    assert list(again.jobs) == [job_id] and again.jobs[job_id].status == "done"
    with running(again) as base:
        _, state = get_json(f"{base}/api/state")
        assert [j["id"] for j in state["jobs"]] == [job_id]
        assert request("GET", f"{base}/api/jobs/{job_id}/preview")[0] == 200


def test_cli_serve_loads_models_once_and_stops_cleanly_on_sigterm(tmp_path, monkeypatch, photo):
    """The real command: jobs run, then SIGTERM mid-job stops it between two steps and leaves no partial file."""
    import os
    import signal

    import clipstyle.cli.serve as serve_cli

    calls = counting_loader(monkeypatch, "serve")
    bound = []
    real_bind = serve_cli.bind

    def bind(host, port):
        sock = real_bind("127.0.0.1", 0)  # tests listen on loopback only, on a free port
        bound.append(sock.getsockname()[1])
        return sock

    monkeypatch.setattr(serve_cli, "bind", bind)
    outcome = {}

    def drive():
        try:
            while not bound:
                time.sleep(0.01)
            base = f"http://127.0.0.1:{bound[0]}"
            deadline = time.monotonic() + PATIENCE
            while True:
                try:
                    get_json(f"{base}/api/state")
                    break
                except OSError:
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
            outcome["config"] = get_json(f"{base}/api/config")[1]
            _, (first,) = start(base, data=photo.read_bytes())
            outcome["first"] = wait_for(base, first)
            _, (second,) = start(base, prompts=("long",), form={**TINY, "steps": 1000})
            while wait_for(base, second, ("running",))["step"] < 2:
                time.sleep(0.01)
            outcome["second"] = second
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    # A SIGTERM that comes after the command has returned must not end the test run.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    thread = threading.Thread(target=drive, daemon=True)
    thread.start()
    folder = tmp_path / "served"
    try:
        result = invoke("serve", "--folder", folder, "--port", 0, catch_exceptions=True)
        thread.join(10)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.exit_code == 130, result.output
    assert len(calls) == 1 and outcome["first"]["status"] == "done"
    helps = {f["name"]: f["help"] for f in outcome["config"]["fields"]}
    assert helps["steps"].startswith("Optimisation steps") and helps["lambda_tv"].startswith("Weight of total")
    files = files_in(folder)
    first = outcome["first"]["id"]
    assert {f"results/{first}.{s}" for s in ("png", "style", "json")} <= files
    assert not [f for f in files if outcome["second"] in f or f.endswith(".tmp") or "/." in f]


def test_cli_serve_warns_on_open_hosts_and_refuses_a_busy_port(tmp_path, monkeypatch):
    import clipstyle.cli.serve as serve_cli

    counting_loader(monkeypatch, "serve")
    real_bind = serve_cli.bind
    monkeypatch.setattr(serve_cli, "bind", lambda host, port: real_bind("127.0.0.1", 0))
    monkeypatch.setattr("uvicorn.Server.run", lambda self, sockets=None: None)
    result = invoke("serve", "--host", "0.0.0.0", "--folder", tmp_path / "a")
    assert result.exit_code == 0
    assert "warning: listening on 0.0.0.0: anyone who can reach this machine can use its CPU" in result.output
    result = invoke("serve", "--folder", tmp_path / "b")
    assert "warning" not in result.output and "serving on http://127.0.0.1:" in result.output
    monkeypatch.setattr(serve_cli, "bind", real_bind)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = invoke("serve", "--port", port, "--folder", tmp_path / "c")
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        (
            f"clipstyle: error: 127.0.0.1:{port}: cannot listen there "
            "(Address already in use); choose another --port or --host"
        )
    ]
