"""Ctrl-C and SIGTERM in the ``clipstyle`` command. The library itself installs no handler.

Start-up - importing torch and the other large libraries, checking options -
writes nothing, and a KeyboardInterrupt raised inside an import can be
swallowed (by a finaliser, or a library's broad ``except``) or leave the import
half done (a RecursionError later). So from the first line of the command
(:func:`install`) until a command starts the work that writes files, a signal
ends the process at once: ``clipstyle: interrupted``, the summary line (nothing
was done), exit code 130. Around that work (:func:`raising`) a signal raises
KeyboardInterrupt instead, so that temporary files are removed and the report
is flushed on the way out; it is also remembered, so that one a library
swallowed still stops the run at the next step (:func:`check`).

This module imports nothing heavy: it is imported before anything else.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

EXIT_CODE = 130  # for Ctrl-C and SIGTERM alike (README)
SIGNALS = (signal.SIGINT, signal.SIGTERM)

_started = time.monotonic()
_installed = False
_requested: int | None = None  # the signal received while raising(), if any
_received = 0  # signals received while raising() or deferred(), counted


def _exit_now(signum, frame) -> None:
    message = f"clipstyle: interrupted\n0 ok, 0 skipped, 0 failed in {time.monotonic() - _started:.1f} s\n"
    try:
        os.write(2, message.encode())
    finally:
        os._exit(EXIT_CODE)


def _raise(signum, frame) -> None:
    global _requested, _received
    _requested, _received = signum, _received + 1
    if _in_finaliser(frame):
        return  # raised there it would be printed with a traceback and dropped: check() raises it
    raise KeyboardInterrupt


def _in_finaliser(frame) -> bool:
    """Whether the interrupted code runs inside a ``__del__`` (a finaliser, called at any moment)."""
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _remember(signum, frame) -> None:
    global _requested, _received
    _requested, _received = signum, _received + 1


def install() -> None:
    """From now on (start-up), a signal ends the process at once. The command's first call."""
    global _installed, _started
    if threading.current_thread() is not threading.main_thread():
        return
    _started = time.monotonic()
    for signum in SIGNALS:
        signal.signal(signum, _exit_now)
    _installed = True


def installed() -> bool:
    """Whether this process is the clipstyle command (install() was called)."""
    return _installed


@contextlib.contextmanager
def _handled_by(handler):
    """Within: every signal of SIGNALS goes to ``handler``; after: to the handlers before."""
    previous = {signum: signal.signal(signum, handler) for signum in SIGNALS}
    try:
        yield
    finally:
        for signum, before in previous.items():
            signal.signal(signum, before)


@contextlib.contextmanager
def raising():
    """Within: a signal raises KeyboardInterrupt (and is remembered); after: as before."""
    global _requested
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _requested = None  # a new piece of work (a process may run commands in turn)
    with _handled_by(_raise):
        yield


@contextlib.contextmanager
def deferred():
    """Within raising(): a signal that comes is remembered and raised on the way out, not inside.

    For building and closing objects whose finaliser cannot bear being half made
    (a progress bar interrupted in its constructor prints a traceback when it is
    collected). Elsewhere it changes nothing.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is not _raise:
        yield
        return
    before = _received
    with _handled_by(_remember):
        yield
    if _received != before:  # only a signal that came within: one handled before is not raised again
        raise KeyboardInterrupt


def requested() -> bool:
    """Whether a signal came during raising(), even if something swallowed its KeyboardInterrupt."""
    return _requested is not None


def check() -> None:
    """Raise KeyboardInterrupt if a signal came and was swallowed on its way."""
    if _requested is not None:
        raise KeyboardInterrupt
