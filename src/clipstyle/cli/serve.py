"""``clipstyle serve``: a local web app to make, watch, keep and queue stylizations."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import click

from clipstyle.cli.common import (
    UserError,
    debug_option,
    echo_warning,
    load_models_from_options,
    max_pixels_option,
    model_options,
    stop_on_sigterm,
)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def form_help() -> dict:
    """The help of `clipstyle run`'s options, by setting name: the page shows the same words."""
    from clipstyle.cli.run import run

    return {p.name: p.help for p in run.params if getattr(p, "help", None)}


def machine_names() -> tuple[str, ...]:
    """This machine's own names, accepted as Host when serving on the network (with any IP address)."""
    names = {socket.gethostname().lower(), socket.getfqdn().lower()}
    return tuple(sorted(n for n in names if n))


def check_folder(folder: Path) -> None:
    """The server's folder can be made (or is a folder), checked before anything loads or is written."""
    if folder.exists():
        if not folder.is_dir():
            raise UserError(f"{folder}: --folder is not a folder")
        return
    parent = folder.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{folder}: cannot create the server's folder there (no write permission in {parent})")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, so a port in use is one clear line before any model loads."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(
            f"{host}:{port}: cannot listen there ({exc.strerror or exc}); choose another --port or --host"
        ) from None
    sock.listen(64)
    sock.set_inheritable(True)
    return sock


@click.command(context_settings={"max_content_width": 100})
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on. 0.0.0.0 lets anyone on the network use the device and see the images.",
)
@click.option("--port", type=click.IntRange(0, 65535), default=7860, show_default=True, help="Port to listen on.")
@click.option(
    "--folder",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("clipstyle-serve"),
    show_default=True,
    help="The server's own folder: uploads, results, style files; the gallery is kept there between starts.",
)
@model_options
@max_pixels_option("uploaded images")
@click.option(
    "--max-upload-mb",
    type=click.IntRange(1),
    default=50,
    show_default=True,
    help="Refuse uploads (photos, masks, films) larger than this many megabytes.",
)
@click.option(
    "--upload-space-mb",
    type=click.IntRange(1),
    default=2048,
    show_default=True,
    help="Disk space for uploads: when full, uploads no job uses are removed, oldest first, else new ones refused.",
)
@debug_option
@stop_on_sigterm
def serve(
    host,
    port,
    folder,
    clip_model,
    clip_pretrained,
    clip_weights,
    vgg_weights,
    device,
    max_pixels,
    max_upload_mb,
    upload_space_mb,
):
    """Start a local web app: upload a photo, type a prompt, watch it form, keep the results.

    \b
      clipstyle serve                      # then open http://127.0.0.1:7860
      clipstyle serve --device cuda:1 --port 8000 --folder ~/styles

    The form has run's style images, blend weights and phrases to avoid, and
    its region and colour controls (a where phrase, a mask upload, invert,
    feather, preserve colour). A film uploaded in the same box
    is restyled with a finished result's style, frame by frame (needs
    clipstyle[video]), and plays in the gallery.

    Jobs from every tab queue on one device; the models load once (their
    weights as for `clipstyle run`: local files, else the cache, else a
    download). Results, style files and their parameters stay in --folder.
    The page loads nothing from the internet. Ctrl-C (or SIGTERM) stops after
    the current step; files are written whole or not at all.
    """
    try:
        import uvicorn

        from clipstyle.serve.app import make_app
    except ImportError as exc:
        raise UserError(
            f"clipstyle serve needs the web extra ({exc.name} is missing): pip install 'clipstyle[web]'"
        ) from None
    from clipstyle import interrupts
    from clipstyle.serve.jobs import JobQueue

    loopback = host in LOOPBACK
    check_folder(folder)
    sock = bind(host, port)  # before anything slow: a port in use fails at once
    try:
        # the models before the folder: a server that cannot start leaves nothing behind
        models = load_models_from_options(clip_model, clip_pretrained, clip_weights, vgg_weights, device=device)
        queue = JobQueue(models, folder, max_pixels=max_pixels, upload_space=upload_space_mb * 1024 * 1024)
        if queue.skipped:
            echo_warning(
                folder / "results",
                f"{len(queue.skipped)} record(s) not loaded (not as clipstyle serve writes them): "
                + ", ".join(queue.skipped[:5]),
            )
        queue.start()
        server = None
        app = make_app(
            queue,
            help_texts=form_help(),
            max_upload=max_upload_mb * 1024 * 1024,
            loopback=loopback,
            hosts=machine_names(),
            closing=lambda: server is not None and server.should_exit,
        )
        server = uvicorn.Server(
            uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5, lifespan="off")
        )
        shown = f"[{host}]" if ":" in host else host
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else shown}:{sock.getsockname()[1]}"
        if not loopback:
            echo_warning(
                None,
                f"listening on {host}: anyone who can reach this machine can use its "
                f"{queue.models.device.type.upper()} and see every image; there is no login",
            )
        click.echo(f"clipstyle: serving on {url} ({queue.models.device}); Ctrl-C stops", err=True)
        try:
            # uvicorn raises the signal that stopped it again once it has stopped: here that is a
            # KeyboardInterrupt (exit 130, "clipstyle: interrupted"), not the start-up handler's
            # summary of a run, and the queue is closed before the process ends.
            with interrupts.raising():
                server.run(sockets=[sock])
        finally:
            queue.close()  # after a signal too: the running job ends between two steps, nothing half-written
    finally:
        sock.close()
