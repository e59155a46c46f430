"""Errors a user can cause. Each one renders as one line naming the file and the reason."""

from __future__ import annotations

import errno
from pathlib import Path


class ClipstyleError(Exception):
    """An error caused by input, settings or environment, not by a bug.

    ``path`` is the file the error is about (if any); the CLI prints
    ``clipstyle: error: <path>: <reason>``.
    """

    def __init__(self, reason: str, path: str | Path | None = None):
        super().__init__(reason)
        self.reason = reason
        self.path = None if path is None else str(path)

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}" if self.path else self.reason


class ImageError(ClipstyleError):
    """An input image that cannot be read or used."""


class WeightsError(ClipstyleError):
    """Model weights that are missing, unreachable, corrupt or for another architecture."""


class DeviceError(ClipstyleError):
    """A requested device that is absent."""


class MaskError(ClipstyleError):
    """A mask that is missing, unreadable, of the wrong shape, or selects nothing."""


class NonFiniteLossError(ClipstyleError):
    """The optimisation diverged (NaN or inf in the losses)."""


class OutputError(ClipstyleError):
    """An output that cannot be written."""


def require_file(path: Path, what: str, error: type[ClipstyleError]) -> None:
    """``path`` is a non-empty regular file, else ``error`` naming it ("<what> file not found", ...)."""
    try:
        if not path.exists():
            raise error(f"{what} file not found", path)
        if not path.is_file():
            raise error(f"{what} path is not a file", path)
        if path.stat().st_size == 0:
            raise error(f"empty {what} file", path)
    except OSError as exc:
        raise error(f"cannot read: {exc.strerror or exc}", path) from None


# The largest text file a command reads whole (--from-file, --templates): about 100,000 paths.
# /dev/zero or a huge file given by mistake ends with one line instead of exhausting memory.
# (Here rather than in config.py, which imports this module.)
MAX_TEXT_BYTES = 16 * 1024 * 1024


def read_text(
    path: str | Path, what: str, limit: int | None = None, error: type[ClipstyleError] = ClipstyleError
) -> str:
    """A small UTF-8 text file given by a user (a list of inputs, templates), read whole but never more
    than ``limit`` bytes (default MAX_TEXT_BYTES): anything larger, /dev/zero included, is refused."""
    limit = MAX_TEXT_BYTES if limit is None else limit
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise error(f"cannot read {what}: {exc.strerror or exc}", path) from None
    return decode_text(data, path, what, limit, error)


def decode_text(data: bytes | str, path, what: str, limit: int, error: type[ClipstyleError] = ClipstyleError) -> str:
    """``data`` read from ``path`` (at most ``limit`` + 1 bytes) as text, or one line saying why not."""
    if len(data) > limit:
        raise error(f"cannot read {what}: larger than {limit // (1024 * 1024)} MiB", path)
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"cannot read {what}: not UTF-8 text", path) from None


# How allocation failures read where they are not a MemoryError or torch's OutOfMemoryError:
# CUDA and MPS ("... out of memory"), torch's CPU allocator ("[enforce fail at alloc_cpu.cpp]
# DefaultCPUAllocator: can't allocate memory"), cuBLAS and cuDNN ("CUBLAS_STATUS_ALLOC_FAILED"),
# and the OS (ENOMEM).
_OUT_OF_MEMORY_WORDS = (
    "out of memory",
    "can't allocate memory",
    "cannot allocate memory",
    "not enough memory",
    "status_alloc_failed",
)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure, on any device."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    if isinstance(exc, OSError) and exc.errno == errno.ENOMEM:
        return True
    text = str(exc).lower()
    return any(words in text for words in _OUT_OF_MEMORY_WORDS)


def format_error(exc: BaseException) -> str:
    """One line for any error: ``<file>: <reason>`` for our own errors and for OS errors."""
    if isinstance(exc, ClipstyleError):
        return str(exc)
    if is_out_of_memory(exc):
        return "out of memory"
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or exc}"
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"internal error: {type(exc).__name__}: {first} (run with --debug for the traceback)"
