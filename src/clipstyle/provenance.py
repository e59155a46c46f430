"""What every file clipstyle writes says about how it was made, written once.

- :func:`stamp`: the record put into the PNGs that run, apply and mask write:
  ``Software`` (the PNG convention) and a ``clipstyle`` entry with the version
  and whatever the caller adds (settings, models, seed, region...). Style files
  carry the same version in their header (clipstyle.styles.stylefile).
- :func:`file_sha256` and :func:`bytes_sha256`: how an input, a mask, a style
  or an upload is identified in those records (by content, never by its path).
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

from clipstyle import __version__

SOFTWARE = f"clipstyle {__version__}"


def stamp(**fields) -> dict:
    """PNG text metadata: ``{"Software": "clipstyle X", "clipstyle": {"version": X, **fields}}``.

    Extra top-level text chunks (e.g. ``prompt``) are the caller's to add."""
    return {"Software": SOFTWARE, "clipstyle": {"version": __version__, **fields}}


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in chunks, remembered while the file's size and
    modification time stay the same (a mask or a style is hashed for every output). Raises OSError."""
    st = os.stat(path)
    return _file_sha256(str(path), st.st_mtime_ns, st.st_size, st.st_ino)


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, _mtime: int, _size: int, _inode: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
