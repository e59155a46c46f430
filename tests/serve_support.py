"""Running `clipstyle serve`'s app for tests: a real server on a free 127.0.0.1 port, in a thread,
that stops when the test ends; and small HTTP helpers over urllib."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request

from conftest import PATIENCE

HEADERS = {"X-Clipstyle": "1"}
TINY = {"preset": "draft", "steps": 3, "size": 32, "crops": 2, "crop_size": 16}
"""A form for tiny models: a few steps on a 32-pixel picture."""


def jpeg(width=48, height=32) -> bytes:
    """A small JPEG with some structure."""
    from PIL import Image

    img = Image.new("RGB", (width, height))
    img.putdata([(x * 5 % 256, y * 7 % 256, 128) for y in range(height) for x in range(width)])
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


@contextlib.contextmanager
def running(queue, **options):
    """Serve ``queue`` on 127.0.0.1 at a free port; yields the base URL; stops the server and the queue after."""
    import uvicorn

    from clipstyle.serve.app import make_app

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    server = None
    app = make_app(queue, closing=lambda: server is not None and server.should_exit, **options)
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=2)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    queue.start()
    thread.start()
    deadline = time.monotonic() + PATIENCE
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(PATIENCE)  # the one bound against hangs (conftest), not a guess at the machine's speed
        queue.close(PATIENCE)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"


def request(method: str, url: str, body: bytes | None = None, headers: dict | None = None):
    """(status, headers, body bytes); errors are answers too."""
    req = urllib.request.Request(url, data=body, method=method, headers={**HEADERS, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=PATIENCE) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def get_json(url: str):
    status, _, body = request("GET", url)
    return status, json.loads(body)


def post_json(url: str, data, method: str = "POST"):
    status, _, body = request(method, url, json.dumps(data).encode(), {"Content-Type": "application/json"})
    return status, json.loads(body)


def upload(base: str, data: bytes, name: str = "photo.jpg"):
    status, _, body = request(
        "POST",
        f"{base}/api/uploads",
        data,
        {"X-Filename": urllib.request.quote(name), "Content-Type": "application/octet-stream"},
    )
    return status, json.loads(body)


def start(base, prompts=("fire",), form=TINY, data=None, name="photo.jpg"):
    """Upload a photo and submit one job per prompt: (the upload's info, the job ids)."""
    status, info = upload(base, data or jpeg(), name)
    assert status == 200, info
    status, body = post_json(f"{base}/api/jobs", {"upload": info["id"], "prompts": list(prompts), "form": form})
    assert status == 200, body
    return info, body["jobs"]


def wait_for(base: str, job_id: str, statuses=("done", "stopped", "failed", "cancelled"), timeout: float = PATIENCE):
    """The job's record once its status is one of ``statuses``."""
    deadline = time.monotonic() + timeout
    while True:
        _, state = get_json(f"{base}/api/state")
        job = next(j for j in state["jobs"] if j["id"] == job_id)
        if job["status"] in statuses:
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job['status']}"
        time.sleep(0.02)
