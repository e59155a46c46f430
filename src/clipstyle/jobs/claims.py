"""Claiming a job before computing it, so that runs sharing an output folder share the work.

A claim is a lock file beside the job's output, ``.<output name>.lock``,
created atomically (``O_CREAT | O_EXCL``: of two processes, exactly one gets
it) and holding the claimer's pid, host and start time. It is removed when the
job ends, however it ends, and renewed (its modification time) every
``REFRESH_SECONDS`` while it is held. A lock whose run is gone is stale and
taken over:

- on this host, when its process no longer exists, when its pid now belongs to
  a process started after the lock was made, or when the machine has restarted
  since it was made;
- from another host (or one this user cannot read), when it has not been
  renewed for ``LOST_AFTER_SECONDS``: its process cannot be asked from here;
- an empty or garbled lock (a claimer killed between creating and filling it)
  after ``EMPTY_LOCK_SECONDS``.

A lock path that is not a regular file (a directory, a link, a FIFO) was not
made by clipstyle: it is never read, opened or removed, and the job fails with
one line naming it. Taking a claim also removes the temporary files that a run
killed while writing the job's outputs left (images.write_atomic names them).
"""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from clipstyle.errors import ClipstyleError
from clipstyle.images import temporary_of

HOST = socket.gethostname()
EMPTY_LOCK_SECONDS = 60.0  # an empty lock older than this was left by a claimer that died
REFRESH_SECONDS = 60.0  # a held lock's modification time is renewed this often
# A lock from another host not renewed for this long belongs to a run that is gone. Ten renewals: a
# busy machine may miss some, and the two hosts' clocks (or a network file system's) may differ a little.
LOST_AFTER_SECONDS = 10 * REFRESH_SECONDS


class LockError(ClipstyleError):
    """A lock path that is not a lock file (a directory, a link, a FIFO): the job cannot be claimed."""


@dataclass
class Claim:
    """A held claim; :meth:`release` removes its lock file."""

    lock: Path | None  # None: nothing was created (the folder does not allow it)
    text: str | None = None  # what this process wrote into it, to remove (and renew) only its own

    def release(self) -> None:
        if self.lock is None:
            return
        _Refresher.forget(self.lock)
        if self.text is None or _ours(self.lock, self.text):  # not when another run took it over meanwhile
            _unlink(self.lock)


def _ours(lock: Path, text: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(lock).st_mode) and lock.read_text(encoding="utf-8") == text
    except (OSError, ValueError):
        return False


def lock_path(output: Path) -> Path:
    return output.with_name(f".{output.name}.lock")


def claim(output: Path, also: tuple[Path, ...] = (), leftovers: Leftovers | None = None) -> Claim | str:
    """Claim ``output``: a :class:`Claim`, or (a string) who holds it, when a live run does.

    Once claimed, temporary files a killed run left for ``output`` and the
    files of ``also`` (the job's other outputs) are removed (``leftovers``: a
    run's :class:`Leftovers`, so that each folder is listed once). Raises
    :class:`LockError` when the lock path is not a file clipstyle made. A lock
    that cannot be created for another reason (a read-only folder) gives a
    Claim that holds nothing: writing the output fails with its own message.
    """
    held = _claim(lock_path(Path(output)))
    if isinstance(held, Claim):
        leftovers = Leftovers() if leftovers is None else leftovers
        for path in (Path(output), *map(Path, also)):
            leftovers.remove(path)
    return held


def _claim(lock: Path) -> Claim | str:
    made = _create(lock)
    if made is not False:
        return made
    holder, stale = _inspect(lock)
    if not stale:
        return _describe(holder, lock)
    # Stale. Two runs may find it so at once: whoever takes the breaker lock
    # checks again and replaces it; the other sees the new, live lock.
    breaker = lock.with_name(lock.name + ".break")
    taken = _create(breaker)
    if taken is False:
        if _inspect(breaker)[1]:
            _unlink(breaker)  # left by a run killed while replacing a lock
        return _describe(holder, lock)
    try:
        holder, stale = _inspect(lock)
        if not stale:
            return _describe(holder, lock)
        _unlink(lock)
        made = _create(lock)
        return made if made is not False else _describe(_inspect(lock)[0], lock)
    finally:
        taken.release()


def _create(lock: Path) -> Claim | bool:
    """Create ``lock`` holding this process: its Claim (holding nothing when it cannot be made); False
    when something is there already."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    except OSError:
        return Claim(None)
    text = json.dumps({"pid": os.getpid(), "host": HOST, "started": time.time()})
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    _Refresher.keep(lock, text)
    return Claim(lock, text)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"))


def _inspect(lock: Path) -> tuple[dict | None, bool]:
    """Who holds ``lock`` (None when it says nothing readable), and whether that run is gone."""
    try:
        st = os.lstat(lock)
    except FileNotFoundError:
        return None, True  # gone meanwhile: try again
    except OSError as exc:
        raise LockError(f"cannot check the lock file: {exc.strerror or exc}", lock) from None
    if not stat.S_ISREG(st.st_mode):  # never opened: a FIFO would block, a link may point anywhere
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")
        raise LockError(f"the lock file is {kind}, which clipstyle never makes; remove it to run this pair", lock)
    age = time.time() - st.st_mtime
    try:
        holder = json.loads(lock.read_text(encoding="utf-8"))
    except PermissionError:  # another user's, made under a strict umask: its process cannot be asked
        return None, age > LOST_AFTER_SECONDS
    except FileNotFoundError:
        return None, True
    except (OSError, ValueError):
        holder = None
    if not isinstance(holder, dict):  # empty or garbled: its claimer died while writing it, or is writing it now
        return None, age > EMPTY_LOCK_SECONDS
    if holder.get("host") != HOST:
        return holder, age > LOST_AFTER_SECONDS
    return holder, _gone(holder)


def _describe(holder: dict | None, lock: Path) -> str:
    who = "" if holder is None else f"pid {holder.get('pid')} on {holder.get('host')}, "
    return f"{who}lock {lock}"


def _gone(holder: dict) -> bool:
    """Whether the run that wrote ``holder`` (a lock of this host) no longer exists."""
    started, boot = holder.get("started"), _boot_time()
    if not isinstance(started, (int, float)):
        return not _alive(holder.get("pid"))
    if boot is not None and started < boot:
        return True  # made before the machine restarted: its pid may now be another process's
    if not _alive(holder.get("pid")):
        return True
    since = _process_start(holder["pid"], boot)
    return since is not None and since > started + 2.0  # the pid was reused after the lock was made


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    if os.name != "posix":  # no safe way to ask without extra packages: honour it
        return True
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # exists, owned by another user (or not a pid at all)
        return True
    return True


def _process_start(pid: int, boot: float | None) -> float | None:
    """When process ``pid`` started, as a time (Linux), or None where unknown."""
    if boot is None:
        return None
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time in clock ticks
    except (OSError, ValueError, IndexError):
        return None


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


def renew() -> None:
    """Renew (touch) every lock this process holds now; a thread does it every REFRESH_SECONDS."""
    _Refresher.renew()


class Leftovers:
    """Temporary files that writers killed while writing (images.write_atomic) left beside outputs,
    each folder listed once, when first asked about (a folder of thousands listed for every pair
    would cost a rerun more than its work); a run keeps one."""

    def __init__(self) -> None:
        self._folders: dict[Path, dict[str, list[Path]]] = {}

    def of(self, path: Path) -> list[Path]:
        """What is left for ``path``."""
        folder = Path(path).parent
        if folder not in self._folders:
            found: dict[str, list[Path]] = {}
            try:
                with os.scandir(folder) as entries:
                    for entry in entries:
                        target = temporary_of(entry.name) if entry.name.endswith(".tmp") else None
                        if target is not None:
                            found.setdefault(target, []).append(folder / entry.name)
            except OSError:
                pass
            self._folders[folder] = found
        return self._folders[folder].get(Path(path).name, [])

    def remove(self, path: Path) -> None:
        """Remove what is left for ``path`` (its claim is held: nobody else writes it)."""
        for left in self.of(path):
            _unlink(left)
        self._folders[Path(path).parent].pop(Path(path).name, None)


class _Refresher:
    """Renews the modification time of every lock this process holds, every REFRESH_SECONDS, from a
    daemon thread (started with the first claim): how other hosts tell a live claim from a lost one."""

    _held: dict[Path, str] = {}
    _guard = threading.Lock()
    _thread: threading.Thread | None = None
    _pid: int | None = None

    @classmethod
    def keep(cls, lock: Path, text: str) -> None:
        with cls._guard:
            cls._held[lock] = text
            if cls._thread is None or cls._pid != os.getpid():  # a forked child has no thread
                cls._pid = os.getpid()
                cls._thread = threading.Thread(target=cls._run, name="clipstyle-claims", daemon=True)
                cls._thread.start()

    @classmethod
    def forget(cls, lock: Path) -> None:
        with cls._guard:
            cls._held.pop(lock, None)

    @classmethod
    def renew(cls) -> None:
        with cls._guard:
            held = list(cls._held.items())
        for lock, text in held:
            if _ours(lock, text):
                try:
                    os.utime(lock)
                except OSError:
                    pass

    @classmethod
    def _run(cls) -> None:
        while True:
            time.sleep(REFRESH_SECONDS)
            cls.renew()
