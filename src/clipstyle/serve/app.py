"""The HTTP side of ``clipstyle serve``: routes, progress events and the page.

Starlette (a small ASGI toolkit) serves the page in ``static/`` and a JSON
API; uvicorn runs it. Progress goes to the page as server-sent events: the
whole state (queue, jobs, steps, losses) each time it changes, at most ten
times a second. Images are fetched by URL, so events stay small.

Routes (the page uses all of them; so can a script):

    GET  /                         the page
    GET  /api/config               the form: fields and defaults from Settings, presets
    GET  /api/state                queue and jobs, in short (JSON); /api/events streams it
    GET  /api/jobs/<id>            one job in full: settings, PNG metadata, notes
    POST /api/uploads              the photo's (or film's) bytes as the body, its name in X-Filename
    POST /api/jobs                 {"upload", "prompts": [...], "form": {...}}
                                   or {"upload", "apply": job id, "form": {the region values}}
                                   (a film upload takes only "apply": a saved style over every frame)
    POST /api/jobs/<id>/stop       cancel a queued job, or stop a running one keeping its last image
    DELETE /api/jobs/<id>          remove a finished job and its files
    GET  /api/jobs/<id>/preview    the job's current image
    GET  /files/results/<id>.png   (or .style, or .mp4 for a film) downloads; /files/uploads/<id>.jpg the
                                   photo as shown (a film's first frame)

Safety: nothing is loaded from the internet (a Content-Security-Policy says
so to the browser too); files come only from the server's own folder, by
names the server made; changing requests need the ``X-Clipstyle`` header,
which a page from another site cannot send without this server's consent
(no CORS is granted); only this machine's own names and IP addresses are
accepted as Host (on the loopback address ``127.0.0.1``, ``localhost`` and
``[::1]``), so a page on another site that rebinds its name to this server's
address is refused (no DNS rebinding); every answer says
``Cross-Origin-Resource-Policy: same-origin``, so another site's page cannot
embed the images either. Bodies are bounded before they are read.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from clipstyle.errors import ClipstyleError
from clipstyle.serve.jobs import JobQueue, NoSpace, QueueFull, clean_name, form_schema

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_UPLOAD = 50 * 1024 * 1024  # bytes; the pixel limit is checked after
MAX_BODY = 64 * 1024  # bytes of a JSON request (16 prompts of 1000 characters fit, escaped, several times)
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; media-src 'self'; "
    "connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
MEDIA_TYPES = {".png": "image/png", ".mp4": "video/mp4"}  # results; a .style is octet-stream
EVENT_INTERVAL = 0.1  # seconds between looks at the state
KEEPALIVE = 15.0  # seconds between comments on an idle event stream


def host_name(header: str | None) -> str | None:
    """The name in a Host header, lower case, without the port (``[::1]`` keeps its brackets); None
    when it is absent or malformed."""
    if not header or any(c.isspace() or c in "/\\@?#" for c in header):
        return None
    if header.startswith("["):
        end = header.find("]")
        rest = header[end + 1 :]
        if end < 0 or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        return header[: end + 1].lower()
    name, _, port = header.partition(":")
    if not name or (port and not port.isdigit()) or ":" in port:
        return None
    return name.lower()


def is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name[1:-1] if name.startswith("[") and name.endswith("]") else name)
    except ValueError:
        return False
    return "." in name or name.startswith("[")


class _Headers:
    """The Host check, security headers on every response, and the ``X-Clipstyle`` header required on
    changing requests.

    ``hosts``: the names accepted in the Host header (lower case, IPv6 in brackets); ``any_ip``: also
    any IP address literal (a server on the network is reached by its address). A DNS rebinding
    attack reaches the server under the attacker's own name, which is neither."""

    def __init__(self, app, hosts: tuple[str, ...] = LOOPBACK_HOSTS, any_ip: bool = False):
        self.app = app
        self.hosts = {h.lower() for h in hosts}
        self.any_ip = any_ip

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.lower(): v for k, v in scope["headers"]}
        host = host_name(headers.get(b"host", b"").decode("latin-1"))
        if host is None or not (host in self.hosts or (self.any_ip and is_ip_literal(host))):
            response = JSONResponse({"error": "refused: this server does not answer to that host name"}, 400)
            return await response(scope, receive, self._wrap(send))
        if scope["method"] not in ("GET", "HEAD") and headers.get(b"x-clipstyle") != b"1":
            response = JSONResponse(
                {"error": "refused: requests that change something need the X-Clipstyle: 1 header"}, status_code=403
            )
            return await response(scope, receive, self._wrap(send))
        return await self.app(scope, receive, self._wrap(send))

    @staticmethod
    def _wrap(send):
        async def wrapped(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [
                    *message["headers"],
                    (b"content-security-policy", CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"cross-origin-resource-policy", b"same-origin"),
                ]
            await send(message)

        return wrapped


def _error(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _refused(exc: ClipstyleError) -> JSONResponse:
    """A refusal, with the status that says why: 429 for a full queue, 507 for a full disk, else 400."""
    status = 429 if isinstance(exc, QueueFull) else 507 if isinstance(exc, NoSpace) else 400
    return _error(str(exc), status)


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The body, or None when it is over ``limit`` bytes: refused by its Content-Length before
    anything is read, else as soon as the bytes read pass the limit."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def make_app(
    queue: JobQueue,
    *,
    help_texts: dict | None = None,
    max_upload: int = DEFAULT_MAX_UPLOAD,
    loopback: bool = True,
    hosts: tuple[str, ...] = (),
    closing: Callable[[], bool] = lambda: False,
) -> Starlette:
    """The web app over ``queue``. ``closing()`` turns true when the server shuts down (ends event streams).

    ``loopback``: the server listens on this machine only, and answers only to 127.0.0.1, localhost
    and [::1]; else also to any IP address and to ``hosts`` (the machine's names)."""
    schema = {**form_schema(help_texts), "max_upload": max_upload}

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def config(request: Request) -> Response:
        return JSONResponse(schema)

    async def state(request: Request) -> Response:
        return JSONResponse(queue.state())

    async def events(request: Request) -> Response:
        async def stream():
            sent, quiet = -1, 0.0
            yield "retry: 1000\n\n"
            while not closing():
                if queue.version != sent:
                    data = queue.state()
                    sent, quiet = data["version"], 0.0
                    yield f"data: {json.dumps(data)}\n\n"
                elif quiet >= KEEPALIVE:
                    quiet = 0.0
                    yield ": keepalive\n\n"
                await asyncio.sleep(EVENT_INTERVAL)
                quiet += EVENT_INTERVAL

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        )

    async def upload(request: Request) -> Response:
        data = await _read_body(request, max_upload)
        if data is None:
            return _error(f"the file is over the upload limit of {max_upload // (1024 * 1024)} MB", 413)
        name = clean_name(unquote(request.headers.get("x-filename", "upload")))
        if not data:
            return _error(f"{name}: empty file")
        try:
            info = await asyncio.to_thread(queue.add_upload, data, name)
        except ClipstyleError as exc:
            return _refused(exc)
        return JSONResponse(info)

    async def submit(request: Request) -> Response:
        raw = await _read_body(request, MAX_BODY)
        if raw is None:
            return _error(f"the request is over {MAX_BODY // 1024} KB", 413)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return _error("the request is not JSON")
        if not isinstance(body, dict):
            return _error("the request is not a JSON object")
        try:
            if body.get("apply"):
                form = body.get("form")
                jobs = [queue.submit_apply(body["apply"], body.get("upload"), body.get("strength", 1.0), form)]
            else:
                prompts = body.get("prompts")
                if isinstance(prompts, str):
                    prompts = prompts.splitlines()
                jobs = queue.submit_stylize(body.get("upload"), prompts, body.get("form") or {})
        except ClipstyleError as exc:
            return _refused(exc)
        return JSONResponse({"jobs": [j.id for j in jobs]})

    async def job(request: Request) -> Response:
        try:
            return JSONResponse(queue.job(request.path_params["job"]))
        except KeyError:
            return _error("no such job", 404)

    async def stop(request: Request) -> Response:
        try:
            job = queue.stop(request.path_params["job"])
        except KeyError:
            return _error("no such job", 404)
        return JSONResponse({"status": job.status})

    async def delete(request: Request) -> Response:
        try:
            queue.delete(request.path_params["job"])
        except KeyError:
            return _error("no such job", 404)
        except ClipstyleError as exc:
            return _error(str(exc), 409)
        return JSONResponse({"deleted": request.path_params["job"]})

    async def preview(request: Request) -> Response:
        found = queue.preview(request.path_params["job"])
        if found is None:
            return _error("no image yet", 404)
        data, media = found
        return Response(data, media_type=media, headers={"Cache-Control": "no-store"})

    async def files(request: Request) -> Response:
        folder, name = request.path_params["folder"], request.path_params["name"]
        path = queue.served_file(folder, name)
        if path is None:
            return _error("not found", 404)
        headers = {"Cache-Control": "no-store"}
        job = queue.jobs.get(path.stem) if folder == "results" else None
        if job is not None:
            filename = queue.download_name(job, path.suffix)
            return FileResponse(
                path,
                filename=filename,
                headers=headers,
                media_type=MEDIA_TYPES.get(path.suffix, "application/octet-stream"),
            )
        return FileResponse(path, headers=headers)

    routes = [
        Route("/", index),
        Route("/api/config", config),
        Route("/api/state", state),
        Route("/api/events", events),
        Route("/api/uploads", upload, methods=["POST"]),
        Route("/api/jobs", submit, methods=["POST"]),
        Route("/api/jobs/{job}/stop", stop, methods=["POST"]),
        Route("/api/jobs/{job}", job, methods=["GET"]),
        Route("/api/jobs/{job}", delete, methods=["DELETE"]),
        Route("/api/jobs/{job}/preview", preview),
        Route("/files/{folder}/{name}", files),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    accepted = LOOPBACK_HOSTS if loopback else (*LOOPBACK_HOSTS, *hosts)
    return Starlette(routes=routes, middleware=[Middleware(_Headers, hosts=accepted, any_ip=not loopback)])
