"""Inputs and where their outputs go: expanding files, folders and globs; output paths and checks.

Shared by ``run`` and ``apply``. Output names mirror the inputs: ``<stem>-<label>.png``
in the output folder, under the input's subfolder for folder inputs. Inputs
whose outputs would share a name - ``a/IMG_0001.JPG`` and ``b/IMG_0001.JPG``,
or ``photo.jpg`` and ``photo.png`` - are told apart by a tag (see :func:`distinct`).
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from clipstyle import errors
from clipstyle.errors import ClipstyleError, OutputError, decode_text, read_text
from clipstyle.images import IMAGE_EXTENSIONS
from clipstyle.jobs.globs import expand_glob
from clipstyle.video import OUTPUT_FORMATS, VIDEO_EXTENSIONS, is_video


@dataclass(frozen=True)
class InputFile:
    path: Path  # as given or found
    # Identity, for output names, seeds and shards: the path relative to the folder it was
    # found in (posix), or the file name; tagged when two inputs would share an output (distinct()).
    rel: str
    # The name recorded in outputs, when not the path's: a web upload is stored under its
    # hash and known by the name it was uploaded under (clipstyle serve).
    label: str | None = None

    @property
    def name(self) -> str:
        return self.label or self.path.name


def _glob_chars(s: str) -> bool:
    return any(c in s for c in "*?[")


def collect_inputs(
    items: list[str], recursive: bool = False, from_file: str | None = None, stdin=None, videos: bool = False
) -> list[InputFile]:
    """Expand files, folders and globs into image files, in a stable order.

    Folders contribute only files with image extensions (sorted; with
    ``recursive`` their subfolders too), and video extensions with ``videos``.
    Files named directly are taken as they are, so a broken one is reported rather than silently skipped.
    A path that does not exist is still returned, and fails when read.
    """
    listed = list(items)
    if from_file is not None:
        if from_file == "-":
            limit = errors.MAX_TEXT_BYTES
            text = decode_text(stdin.read(limit + 1) if stdin is not None else "", "-", "the list of inputs", limit)
        else:
            text = read_text(from_file, "the list of inputs")
        listed += [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    found: list[InputFile] = []
    seen: set[str] = set()
    extensions = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS if videos else IMAGE_EXTENSIONS

    def add(path: Path, rel: str) -> None:
        key = os.path.abspath(path)
        if key not in seen:
            seen.add(key)
            found.append(InputFile(path, rel))

    for item in listed:
        p = Path(item)
        if p.is_dir():
            walker = p.rglob("*") if recursive else p.glob("*")
            files = sorted(
                (
                    f
                    for f in walker
                    if f.is_file()
                    and f.suffix.lower() in extensions
                    and not any(part.startswith(".") for part in f.relative_to(p).parts)
                ),
                key=lambda f: f.relative_to(p).as_posix(),
            )
            if not files:
                raise ClipstyleError(_no_images(p, recursive), p)
            for f in files:
                add(f, f.relative_to(p).as_posix())
        elif _glob_chars(item) and not p.exists():
            matches = sorted(expand_glob(item, recursive=recursive))
            if not matches:
                raise ClipstyleError("no file matches this pattern", item)
            for m in matches:
                mp = Path(m)
                if mp.is_file():
                    add(mp, mp.name)
        else:
            add(p, p.name)
    return distinct(found)


def _output_key(rel: str) -> str:
    """Inputs with equal keys would share output names: the same subfolder and stem (the
    suffix is dropped from output names), compared without case (as macOS and Windows do)."""
    path = PurePosixPath(rel)
    return (path.parent / short_stem(path.stem)).as_posix().casefold()


def path_tag(path: Path) -> str:
    """A short hash of an input's path as given (normalised), the same wherever the same command runs."""
    given = os.path.normpath(str(path)).replace(os.sep, "/")
    return hashlib.sha256(given.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def distinct(found: list[InputFile]) -> list[InputFile]:
    """Inputs whose outputs would share a name each get their own, stably.

    Every input of a colliding group is tagged - ``<stem>-<hash of its path>`` - and
    every other input keeps its name, so its output name and seed are those it has
    alone. The tag depends on the input's own path only, not on the other inputs,
    so the same command gives the same names on every rerun, shard and machine.
    """
    counts = Counter(_output_key(f.rel) for f in found)
    tagged = []
    for f in found:
        if counts[_output_key(f.rel)] > 1:
            rel = PurePosixPath(f.rel)
            f = InputFile(f.path, (rel.parent / f"{rel.stem}-{path_tag(f.path)}{rel.suffix}").as_posix())
        tagged.append(f)
    keys = Counter(_output_key(f.rel) for f in tagged)
    clash = next((f for f in tagged if keys[_output_key(f.rel)] > 1), None)
    if clash is not None:  # a tagged name equal to another input's own: rename one of the files
        raise ClipstyleError("two inputs would write the same output names; rename one of them", clash.path)
    return tagged


def _no_images(folder: Path, recursive: bool) -> str:
    """Why a folder input gave no images, with what to try."""
    reason = "is a folder and holds no images" if folder.suffix.lower() in IMAGE_EXTENSIONS else "holds no images"
    if not recursive and any(d.is_dir() for d in folder.iterdir()):
        reason += " (-r looks in its subfolders)"
    return f"{reason} (files with image extensions: .jpg, .png, .webp, ...)"


def output_file(output: Path | None, single: bool, one: str, videos: bool = False) -> Path | None:
    """``output`` when it names one PNG file (one input, one output), else None (a folder).

    A .png path for several outputs, or a single output to a name with another
    suffix, is refused; ``one`` says what one output is made of ("one image").
    With ``videos``, a video file name (.mp4, .mov, .mkv) is one output too.
    """
    files = (".png", *OUTPUT_FORMATS) if videos else (".png",)
    as_file = output is not None and output.suffix.lower() in files and not output.is_dir()
    # a new folder named like an image (-o y.jpg for several outputs) is a mistake, not a folder
    named = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS if videos else IMAGE_EXTENSIONS
    named_as_image = output is not None and output.suffix.lower() in named and not output.is_dir()
    if named_as_image and not single:
        raise ClipstyleError(f"an output file needs exactly {one}; give a folder instead", output)
    if output is not None and output.suffix and not as_file and not output.is_dir() and single:
        what = "PNG images or .mp4, .mov, .mkv videos" if videos else "PNG: use a name ending in .png, or a folder"
        raise ClipstyleError(f"output files are {what}", output)
    return output if as_file else None


def short_stem(stem: str, max_bytes: int = 100) -> str:
    """The input's stem, cut to ``max_bytes`` (plus a short hash of the whole) so
    that stem, label and suffix stay under the 255-byte file-name limit."""
    raw = stem.encode("utf-8", "surrogateescape")
    if len(raw) <= max_bytes:
        return stem
    cut = raw[:max_bytes].decode("utf-8", "ignore")
    return f"{cut}-{hashlib.sha256(raw).hexdigest()[:8]}"


def mirrored_output(folder: Path, inp: InputFile, label: str, suffix: str = ".png") -> Path:
    """``<folder>/<input's subfolder>/<stem>-<label><suffix>`` (.png, or .mp4 for a film)."""
    rel = Path(inp.rel)
    return folder / rel.parent / f"{short_stem(rel.stem)}-{label}{suffix}"


def check_kind(output: Path | None, inputs: list[InputFile]) -> None:
    """One output file named for one input: a film's must be a video file, an image's a PNG."""
    if output is None or len(inputs) != 1:
        return
    film, to_film = is_video(inputs[0].path), output.suffix.lower() in OUTPUT_FORMATS
    if film != to_film:
        need = "a video (.mp4, .mov, .mkv)" if film else "a .png image"
        raise ClipstyleError(f"the input {inputs[0].path.name} needs {need} as its output", output)


def _key(path) -> str:
    return os.path.normcase(os.path.abspath(path)).casefold()


def check_outputs(jobs, report: Path | None = None) -> None:
    """Refuse, before any compute, outputs that would overwrite an input or each other, or
    cannot be written, and a ``report`` file that is an input or an output.

    ``jobs``: anything with ``.input`` (an InputFile) and ``.output`` (a Path), and
    optionally ``.style`` (a second output). Creates nothing: a missing output folder is
    made when its first file is written (batch.run_jobs), and removed again if left empty.
    """
    inputs = {_key(j.input.path) for j in jobs}
    outputs: set[str] = set()
    for j in jobs:
        for out in (j.output, getattr(j, "style", None)):
            if out is None:
                continue
            if _key(out) in inputs:
                raise OutputError("the output would overwrite an input image", out)
            if _key(out) in outputs:
                raise OutputError("two inputs would write this same output", out)
            outputs.add(_key(out))
    if report is not None:
        _check_report(Path(report), jobs, inputs, outputs)
    checked: set[Path] = set()
    for j in jobs:
        parent = j.output.parent
        if parent in checked:
            continue
        checked.add(parent)
        check_folder_writable(parent, "output folder")


def nearest_existing(path: Path) -> Path:
    """``path``, or its nearest ancestor that exists (the one a new folder would be made in)."""
    path = Path(os.path.abspath(path))
    while not os.path.lexists(path) and path.parent != path:
        path = path.parent
    return path


def check_folder_writable(folder: Path, what: str) -> None:
    """``folder`` can be written into, or made where it is missing; checked, nothing created."""
    there = nearest_existing(folder)
    if not there.is_dir():
        raise OutputError(f"cannot create the {what}: {there.name} is not a folder", folder)
    if not os.access(there, os.W_OK | os.X_OK):
        raise OutputError(f"{what} is not writable", folder)


def make_folders(folder: Path) -> list[Path]:
    """Make ``folder`` and its missing parents; the ones made, outermost first (raises OSError)."""
    missing = []
    probe = Path(folder)
    while not os.path.lexists(probe) and probe.parent != probe:
        missing.append(probe)
        probe = probe.parent
    made = []
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:  # another run made it meanwhile: theirs
            continue
        made.append(path)
    return made


def remove_if_empty(folders: list[Path]) -> None:
    """Remove those of ``folders`` (as make_folders returned them) that are empty, innermost first."""
    for path in reversed(folders):
        try:
            path.rmdir()
        except OSError:  # not empty, or gone: left as it is
            pass


def _check_report(report: Path, jobs, inputs: set[str], outputs: set[str]) -> None:
    """The report is appended to: never to an input image or an output (the same file by
    any name, links included)."""
    if _key(report) in inputs or _key(report) in outputs:
        what = "an input image" if _key(report) in inputs else "an output"
        raise OutputError(f"the report would be written into {what}; give another --report file", report)
    if report.exists():
        for j in jobs:
            try:
                same = os.path.samefile(report, j.input.path)
            except OSError:
                continue
            if same:
                raise OutputError("the report would be written into an input image; give another --report file", report)
