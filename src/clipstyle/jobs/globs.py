"""Glob patterns expanded without entering a folder twice.

Python's glob follows symbolic links to folders, so with ``**`` a link that
points back up the tree (``photos/sub/loop -> ..``) is walked again and again
until the paths grow too long: 5 images became 205 inputs. This expansion
keeps glob's rules - ``*``, ``?`` and ``[...]`` within one path component,
``**`` for any number of folders when recursive (else like ``*``), names that
start with a dot only where the pattern's component does - and enters each
folder, known by its device and inode, once.
"""

from __future__ import annotations

import fnmatch
import glob
import os


def expand_glob(pattern: str, recursive: bool = False) -> list[str]:
    """The paths matching ``pattern``, as glob.glob gives them, without repeats through links."""
    parts = pattern.split(os.sep)
    base = os.sep if parts[0] == "" else ""
    parts = [p for p in parts if p]
    found: list[str] = []
    entered: set[tuple[int, int]] = set()

    def join(folder: str, name: str) -> str:
        return os.path.join(folder, name) if folder else name

    def folders(top: str):
        """``top`` and every folder below it (not hidden ones), each entered once."""
        stack = [top]
        while stack:
            folder = stack.pop()
            try:
                st = os.stat(folder or ".")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in entered:
                continue
            entered.add((st.st_dev, st.st_ino))
            yield folder
            stack.extend(
                reversed(
                    [
                        join(folder, name)
                        for name in _names(folder)
                        if not name.startswith(".") and os.path.isdir(join(folder, name))
                    ]
                )
            )

    def visit(folder: str, i: int) -> None:
        part, last = parts[i], i == len(parts) - 1
        if recursive and part == "**":
            for sub in list(folders(folder)):
                if last:
                    found.extend(join(sub, name) for name in _names(sub) if not name.startswith("."))
                else:
                    visit(sub, i + 1)
            return
        if not glob.has_magic(part):
            names = [part] if os.path.lexists(join(folder, part)) else []
        else:
            names = [
                n
                for n in _names(folder)
                if fnmatch.fnmatch(n, part) and (part.startswith(".") or not n.startswith("."))
            ]
        for name in names:
            path = join(folder, name)
            if last:
                found.append(path)
            elif os.path.isdir(path):
                visit(path, i + 1)

    if parts:
        visit(base, 0)
    return list(dict.fromkeys(found))


def _names(folder: str) -> list[str]:
    try:
        return sorted(os.listdir(folder or "."))
    except OSError:
        return []
