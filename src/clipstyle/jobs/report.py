"""Run reports: one JSON line per finished file, written as each ends; reading them back."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from clipstyle.errors import ClipstyleError, OutputError
from clipstyle.jobs.inputs import check_folder_writable


class Report:
    """JSON lines, one record per pair, appended and flushed as each pair ends. ``path=None``: no file.

    The file is created with the first record, so a run that stops before any
    pair ends leaves none. A record that cannot be written (a full disk) does
    not stop the run: it is kept, and written before the next one or at
    :meth:`close`; ``warn(message)`` hears of it once. A record is appended
    whole or not at all, so the file never holds half a line. Records still
    unwritten at the end are in ``lost``, an OutputError naming the file.
    """

    def __init__(self, path: str | Path | None, warn=None):
        self.path = None if path is None else Path(path)
        self.lost: OutputError | None = None
        self._fd: int | None = None
        self._pending: list[bytes] = []
        self._warn, self._warned = warn, False
        if self.path is not None:
            check_report_file(self.path)

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        # file names that are not valid UTF-8 are written with backslash escapes
        line = json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n"
        self._pending.append(line.encode("utf-8", "backslashreplace"))
        self._flush()

    def _flush(self) -> None:
        try:
            if self._fd is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)  # made with the first record, as the file
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o666)
            while self._pending:
                _append(self._fd, self._pending[0])
                self._pending.pop(0)
            os.fsync(self._fd)
        except OSError as exc:
            self.lost = OutputError(
                f"{len(self._pending)} report records could not be written "
                f"({exc.strerror or exc}); the outputs are kept: rerun to record them",
                self.path,
            )
            if self._warn is not None and not self._warned:
                self._warned = True
                self._warn(
                    f"cannot write the report ({exc.strerror or exc}): the run goes on, and its records "
                    "are written when there is room again, at the latest at the end"
                )
        else:
            self.lost = None

    def close(self) -> None:
        """Write what is still kept, and close the file. Never raises: see ``lost``."""
        if self._pending:
            self._flush()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def check_report_file(path: Path) -> None:
    """A --report path that can be appended to, checked without creating or opening anything: a new
    file in a folder that can be made, a report (JSON lines) already there, or a device (such as
    /dev/full). Refused: a folder, a pipe or socket (opening one blocks until a reader comes, and
    a signal cannot stop that), and any other file, such as an image, that a JSON line would spoil."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        check_folder_writable(path.parent, "report's folder")
        return
    except OSError as exc:
        raise OutputError(f"cannot open the report: {exc.strerror or exc}", path) from None
    if stat.S_ISDIR(st.st_mode):
        raise OutputError("cannot open the report: is a folder", path)
    if stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode):
        raise OutputError("cannot open the report: is a pipe or socket; give a regular file", path)
    if not os.access(path, os.W_OK):
        raise OutputError("cannot open the report: permission denied", path)
    if stat.S_ISREG(st.st_mode) and st.st_size:
        try:
            with open(path, "rb") as fh:
                head = fh.read(64).lstrip()
        except OSError as exc:
            raise OutputError(f"cannot open the report: {exc.strerror or exc}", path) from None
        if head and not head.startswith(b"{"):
            raise OutputError("exists and is not a report (JSON lines); give another --report file", path)


def _append(fd: int, data: bytes) -> None:
    """Append ``data`` whole, or leave the file as it was (a full disk can take part of a write)."""
    start = os.fstat(fd).st_size
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except OSError:
        try:
            os.ftruncate(fd, start)
        except OSError:  # not a regular file (/dev/full), or truncating failed as well
            pass
        raise


def escape_undecodable(text: str) -> str:
    """``text`` as valid UTF-8: bytes of file names that are not UTF-8 (lone surrogates
    in Python) become backslash escapes, as the report writes them (``\\udce9``)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def resolve_path(path: str, base: Path) -> str:
    """A path from a report: as written (relative to where the command ran), or,
    if that does not exist, relative to the folder of the file that names it."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return str(p)
    beside = base / p
    return str(beside) if beside.exists() else str(p)


def read_json_lines(path: str | Path) -> list[dict]:
    """Objects of a JSON-lines file (or of one JSON array). Raises ClipstyleError naming the line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ClipstyleError("file not found", path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ClipstyleError(f"cannot read: {getattr(exc, 'strerror', None) or exc}", path) from None
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ClipstyleError(f"not valid JSON ({exc.msg}, line {exc.lineno})", path) from None
    else:
        items = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ClipstyleError(f"line {number} is not JSON ({exc.msg})", path) from None
    bad = [i for i, item in enumerate(items, 1) if not isinstance(item, dict)]
    if bad:
        raise ClipstyleError(f"record {bad[0]} is not a JSON object", path)
    return items


def read_report(path: str | Path) -> list[dict]:
    """Records of a ``clipstyle run --report`` file, with ``input`` and ``output``
    resolved (see :func:`resolve_path`) and one record per (input, prompt): the last
    ok or skipped one (its output exists), else the last failed one."""
    path = Path(path)
    chosen: dict[tuple[str, str], dict] = {}
    for number, record in enumerate(read_json_lines(path), 1):
        missing = [k for k in ("input", "prompt", "output", "status") if k not in record]
        if missing:
            raise ClipstyleError(f"record {number} has no {', '.join(missing)} field (not a run report?)", path)
        record = dict(
            record,
            input=resolve_path(str(record["input"]), path.parent),
            output=resolve_path(str(record["output"]), path.parent),
        )
        key = (os.path.abspath(record["input"]), record["prompt"])
        previous = chosen.get(key)
        good = record["status"] in ("ok", "skipped")
        if previous is None or good or previous["status"] not in ("ok", "skipped"):
            chosen[key] = record
    return list(chosen.values())
