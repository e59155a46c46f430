"""Claiming a job before computing it, so that runs sharing an output folder share the work.

A claim is a lock file beside the job's output, ``.<output name>.lock``,
created atomically (``O_CREAT | O_EXCL``: of two processes, exactly one gets
it) and holding the claimer's pid, host and start time. It is removed when the
job ends, however it ends. A lock left behind by a run that was killed is
stale and taken over: on the same host when its process no longer exists (or
the machine has restarted since it was made); an empty lock (a claimer killed
between creating and filling it) after a minute. A lock from another host is
honoured, since its process cannot be checked from here: if that run is gone,
delete the file (the skipped record names it).
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

HOST = socket.gethostname()
EMPTY_LOCK_SECONDS = 60.0  # an empty lock older than this was left by a claimer that died


@dataclass
class Claim:
    """A held claim; :meth:`release` removes its lock file."""

    lock: Path | None  # None: nothing was created (the folder does not allow it)

    def release(self) -> None:
        if self.lock is None:
            return
        try:
            self.lock.unlink()
        except OSError:  # already gone (removed by hand, or the folder went away)
            pass


def lock_path(output: Path) -> Path:
    return output.with_name(f".{output.name}.lock")


def claim(output: Path) -> Claim | str:
    """Claim ``output``: a :class:`Claim`, or (a string) who holds it, when another live process does.

    A lock that cannot be created for another reason (a read-only folder) gives
    a Claim that holds nothing: writing the output fails with its own message.
    """
    lock = lock_path(Path(output))
    made = _create(lock)
    if made is not False:
        return Claim(made)
    holder = _read(lock)
    if not _stale(holder, lock):
        return _describe(holder, lock)
    # Stale. Two runs may find it so at once: whoever takes the breaker lock
    # checks again and replaces it; the other sees the new, live lock.
    breaker = lock.with_name(lock.name + ".break")
    taken = _create(breaker)
    if taken is False:
        if _stale(_read(breaker), breaker):
            Claim(breaker).release()  # left by a run killed while replacing a lock
        return _describe(holder, lock)
    try:
        holder = _read(lock)
        if not _stale(holder, lock):
            return _describe(holder, lock)
        Claim(lock).release()
        made = _create(lock)
        return Claim(made) if made is not False else _describe(_read(lock), lock)
    finally:
        Claim(taken).release()


def _create(lock: Path) -> Path | None | bool:
    """Create ``lock`` holding this process: the path; False when it exists; None when it cannot be made."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    except OSError:
        return None
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump({"pid": os.getpid(), "host": HOST, "started": time.time()}, fh)
    return lock


def _read(lock: Path) -> dict | None:
    try:
        holder = json.loads(lock.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _describe(holder: dict | None, lock: Path) -> str:
    who = "" if holder is None else f"pid {holder.get('pid')} on {holder.get('host')}, "
    return f"{who}lock {lock}"


def _stale(holder: dict | None, lock: Path) -> bool:
    if holder is None:
        try:
            return time.time() - lock.stat().st_mtime > EMPTY_LOCK_SECONDS
        except OSError:
            return True  # gone meanwhile: try again
    if holder.get("host") != HOST:
        return False
    started, boot = holder.get("started"), _boot_time()
    if isinstance(started, (int, float)) and boot is not None and started < boot:
        return True  # made before the machine restarted: its pid may now be another process's
    return not _alive(holder.get("pid"))


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    if os.name != "posix":  # no safe way to ask without extra packages: honour it
        return True
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _boot_time() -> float | None:
    """When this machine started (Linux), or None where unknown."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except (OSError, ValueError):
        pass
    return None
