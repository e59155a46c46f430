"""Is a file already there the one a job would make? What clipstyle recorded in it, compared with the job.

Every PNG clipstyle writes carries a ``clipstyle`` text chunk (JSON) with what
determines the image - settings, seed, models, the input's SHA-256, and so on -
and style files carry the same in their header. A rerun keeps (skips) an
output whose record matches the job, and refuses one made otherwise instead of
silently skipping a file that is not what was asked for (batch.Work.existing).

Imports no torch.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from clipstyle.config import Settings

# Settings that change speed or memory, not the result (config.Settings says so for each):
# an output made with other values of these is kept.
RESULT_NEUTRAL_SETTINGS = ("crop_batch", "log_every", "memory_format", "compile", "cuda_graph")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Values that records before a feature lack, and what such a record means: an output without a
# "target" was made for its prompt alone (so a rerun with a style image, a blend or --avoid is not skipped).
ABSENT_MEANS = {"target": None}


def settings_identity(settings) -> dict:
    """The settings that determine a result, JSON-ready."""
    data = settings.to_dict()
    for name in RESULT_NEUTRAL_SETTINGS:
        data.pop(name, None)
    return data


def read_record(path: str | Path) -> dict | None:
    """What clipstyle recorded in ``path``: a PNG's ``clipstyle`` text chunk, a style
    file's metadata or a film's container tag (clipstyle.video), as a dict. None when
    the file has no such record or cannot be read."""
    from clipstyle.video import is_video
    from clipstyle.video import read_record as film_record

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a pipe would block the open until a writer came
            return None
    except OSError:
        return None
    if is_video(path):
        return film_record(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError:
        return None
    try:
        if head == PNG_SIGNATURE:
            from PIL import Image

            with Image.open(path) as img:  # text chunks before the image data: nothing is decoded
                text = img.info.get("clipstyle")
        else:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                text = (f.metadata() or {}).get("clipstyle.metadata")
        record = json.loads(text) if isinstance(text, str) else None
    except Exception:  # noqa: BLE001 - any unreadable file simply has no record
        return None
    return record if isinstance(record, dict) else None


def differences(record: dict, expected: dict) -> list[str]:
    """The names of the ``expected`` values that ``record`` holds otherwise.

    A value the record lacks (written by an older clipstyle) is not compared,
    except a setting, which is compared with its default (a setting added later
    behaves as its default did before), and a key of ABSENT_MEANS, compared with
    what its absence means.
    """
    expected = json.loads(json.dumps(expected))  # tuples as lists, as in the record
    defaults = json.loads(json.dumps(settings_identity(Settings())))
    found = []
    for key, value in expected.items():
        if key not in record:
            if key in ABSENT_MEANS and value != ABSENT_MEANS[key]:
                found.append(key)
            continue
        if key == "settings" and isinstance(value, dict) and isinstance(record[key], dict):
            found += [name for name, v in value.items() if record[key].get(name, defaults.get(name)) != v]
        elif record[key] != value:
            found.append(key)
    return found


def mismatch(path: str | Path, expected) -> str | None:
    """Why the existing file ``path`` is not what ``expected`` (a dict, or a callable
    returning one) describes; None when it is."""
    record = read_record(path)
    if record is None:
        return "exists, not made by clipstyle (no clipstyle record in it)"
    different = differences(record, expected() if callable(expected) else expected)
    if different:
        return f"exists, made with other settings ({', '.join(different)})"
    return None
