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
    POST /api/uploads              the photo's bytes as the body, its name in X-Filename
    POST /api/jobs                 {"upload", "prompts": [...], "form": {...}} or {"upload", "apply": job id}
    POST /api/jobs/<id>/stop       cancel a queued job, or stop a running one keeping its last image
    DELETE /api/jobs/<id>          remove a finished job and its files
    GET  /api/jobs/<id>/preview    the job's current image
    GET  /files/results/<id>.png   (or .style) downloads; /files/uploads/<id>.jpg the photo as shown

Safety: nothing is loaded from the internet (a Content-Security-Policy says
so to the browser too); files come only from the server's own folder, by
names the server made; changing requests need the ``X-Clipstyle`` header,
which a page from another site cannot send without this server's consent
(no CORS is granted); on the loopback address only ``127.0.0.1`` and
``localhost`` are accepted as Host (no DNS rebinding).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from clipstyle.errors import ClipstyleError
from clipstyle.serve.jobs import JobQueue, form_schema

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_UPLOAD = 50 * 1024 * 1024  # bytes; the pixel limit is checked after
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
EVENT_INTERVAL = 0.1  # seconds between looks at the state
KEEPALIVE = 15.0  # seconds between comments on an idle event stream


class _Headers:
    """Security headers on every response, and the ``X-Clipstyle`` header required on changing requests."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.lower(): v for k, v in scope["headers"]}
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
                ]
            await send(message)

        return wrapped


def _error(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def make_app(
    queue: JobQueue,
    *,
    help_texts: dict | None = None,
    max_upload: int = DEFAULT_MAX_UPLOAD,
    loopback: bool = True,
    closing: Callable[[], bool] = lambda: False,
) -> Starlette:
    """The web app over ``queue``. ``closing()`` turns true when the server shuts down (ends event streams)."""
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
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_upload:
            return _error(f"the file is over the upload limit of {max_upload // (1024 * 1024)} MB", 413)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_upload:
                return _error(f"the file is over the upload limit of {max_upload // (1024 * 1024)} MB", 413)
            chunks.append(chunk)
        name = unquote(request.headers.get("x-filename", "upload"))
        if size == 0:
            return _error(f"{name}: empty file")
        try:
            info = await asyncio.to_thread(queue.add_upload, b"".join(chunks), name)
        except ClipstyleError as exc:
            return _error(str(exc))
        return JSONResponse(info)

    async def submit(request: Request) -> Response:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return _error("the request is not JSON")
        if not isinstance(body, dict):
            return _error("the request is not a JSON object")
        try:
            if body.get("apply"):
                jobs = [queue.submit_apply(body["apply"], body.get("upload"), body.get("strength", 1.0))]
            else:
                prompts = body.get("prompts")
                if isinstance(prompts, str):
                    prompts = prompts.splitlines()
                form = body.get("form") or {}
                if not isinstance(prompts, list) or not isinstance(form, dict):
                    return _error("prompts must be a list and form an object")
                jobs = queue.submit_stylize(body.get("upload"), prompts, form)
        except ClipstyleError as exc:
            return _error(str(exc))
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
                media_type="image/png" if path.suffix == ".png" else "application/octet-stream",
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
    middleware = [Middleware(_Headers)]
    if loopback:
        middleware.insert(0, Middleware(TrustedHostMiddleware, allowed_hosts=["127.0.0.1", "localhost"]))
    return Starlette(routes=routes, middleware=middleware)
