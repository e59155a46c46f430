"""Run reports: one JSON line per finished file, written as each ends; reading them back."""

from __future__ import annotations

import json
import os
from pathlib import Path

from clipstyle.errors import ClipstyleError, OutputError


class Report:
    """JSON lines, one record per pair, appended and flushed as each pair ends. ``path=None``: no file."""

    def __init__(self, path: str | Path | None):
        self.path = None if path is None else Path(path)
        self._fh = None
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                # file names that are not valid UTF-8 are written with backslash escapes
                self._fh = open(self.path, "a", encoding="utf-8", errors="backslashreplace")
            except OSError as exc:
                raise OutputError(f"cannot open the report: {exc.strerror}", self.path) from None

    def write(self, record: dict) -> None:
        if self._fh is not None:
            self._fh.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


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
        record = dict(record, input=resolve_path(str(record["input"]), path.parent),
                      output=resolve_path(str(record["output"]), path.parent))
        key = (os.path.abspath(record["input"]), record["prompt"])
        previous = chosen.get(key)
        good = record["status"] in ("ok", "skipped")
        if previous is None or good or previous["status"] not in ("ok", "skipped"):
            chosen[key] = record
    return list(chosen.values())
