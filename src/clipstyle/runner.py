"""Many images x many prompts: planning outputs, skipping, failure isolation, reports.

The CLI's ``run`` command is a thin layer over :func:`run_pairs`. Everything a
user sees goes through a :class:`RunEvents` object; this module never prints.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from clipstyle import __version__
from clipstyle.errors import ClipstyleError, OutputError
from clipstyle.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, slugify


@dataclass(frozen=True)
class InputFile:
    path: Path  # as given or found
    rel: str  # identity: the path relative to the folder it was found in (posix), or the file name


@dataclass
class Pair:
    input: InputFile
    prompt: str
    output: Path
    seed: int


def _glob_chars(s: str) -> bool:
    return any(c in s for c in "*?[")


def collect_inputs(items: list[str], recursive: bool = False, from_file: str | None = None,
                   stdin=None) -> list[InputFile]:
    """Expand files, folders and globs into image files, in a stable order.

    Folders contribute only files with image extensions (sorted; with
    ``recursive`` their subfolders too). Files named directly are taken as they
    are, so a broken one is reported rather than silently skipped.
    A path that does not exist is still returned, and fails when read.
    """
    listed = list(items)
    if from_file is not None:
        if from_file == "-":
            text = (stdin.read() if stdin is not None else "")
        else:
            try:
                text = Path(from_file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ClipstyleError(f"cannot read the list of inputs: {getattr(exc, 'strerror', None) or exc}",
                                     from_file) from None
        listed += [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    found: list[InputFile] = []
    seen: set[str] = set()

    def add(path: Path, rel: str) -> None:
        key = os.path.abspath(path)
        if key not in seen:
            seen.add(key)
            found.append(InputFile(path, rel))

    for item in listed:
        p = Path(item)
        if p.is_dir():
            walker = p.rglob("*") if recursive else p.glob("*")
            files = sorted((f for f in walker if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                            and not any(part.startswith(".") for part in f.relative_to(p).parts)),
                           key=lambda f: f.relative_to(p).as_posix())
            for f in files:
                add(f, f.relative_to(p).as_posix())
        elif _glob_chars(item) and not p.exists():
            matches = sorted(glob.glob(item, recursive=recursive))
            if not matches:
                raise ClipstyleError("no file matches this pattern", item)
            for m in matches:
                mp = Path(m)
                if mp.is_file():
                    add(mp, mp.name)
        else:
            add(p, p.name)
    return found


def pair_seed(base_seed: int, rel: str, prompt: str) -> int:
    """A pair's seed from the base seed and the pair's identity, so a result does
    not depend on order, sharding or batching."""
    digest = hashlib.sha256(f"{base_seed}\0{rel}\0{prompt}".encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def parse_shard(text: str) -> tuple[int, int]:
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ClipstyleError(f"shard must look like K/N, e.g. 1/4 (got {text!r})") from None
    if not (n >= 1 and 1 <= k <= n):
        raise ClipstyleError(f"shard K/N needs 1 <= K <= N (got {text!r})")
    return k, n


def in_shard(pair: Pair, shard: tuple[int, int]) -> bool:
    """Stable assignment of a pair to one of N shards, the same on every machine."""
    k, n = shard
    digest = hashlib.sha256(f"{pair.input.rel}\0{pair.prompt}".encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "little") % n == k - 1


def _short_stem(stem: str, max_bytes: int = 100) -> str:
    """The input's stem, cut to ``max_bytes`` (plus a short hash of the whole) so
    that stem, prompt slug and suffix stay under the 255-byte file-name limit."""
    raw = stem.encode("utf-8", "surrogateescape")
    if len(raw) <= max_bytes:
        return stem
    cut = raw[:max_bytes].decode("utf-8", "ignore")
    return f"{cut}-{hashlib.sha256(raw).hexdigest()[:8]}"


def plan_pairs(inputs: list[InputFile], prompts: list[str], output: Path | None, base_seed: int,
               shard: tuple[int, int] | None = None) -> list[Pair]:
    """One Pair per (image, prompt), with its output path and seed.

    ``output`` is a file when there is one image and one prompt and it ends in
    .png; otherwise a folder (default: the current folder). Output names are
    ``<stem>-<prompt-slug>.png``, under the input's subfolder for folder inputs.
    """
    single = len(inputs) == 1 and len(prompts) == 1
    as_file = output is not None and output.suffix.lower() == ".png" and not output.is_dir()
    if as_file and not single:
        raise ClipstyleError("an output file needs exactly one image and one prompt; give a folder instead", output)
    if output is not None and output.suffix and not as_file and not output.is_dir() and single:
        raise ClipstyleError("output files are PNG: use a name ending in .png, or a folder", output)
    folder = Path(".") if output is None else output
    slugs: dict[str, str] = {}
    used: dict[str, str] = {}
    for prompt in prompts:
        slug = slugify(prompt)
        if slug in used and used[slug] != prompt:  # two prompts, one slug: keep both outputs apart
            slug = f"{slug}-{hashlib.sha256(prompt.encode('utf-8')).hexdigest()[:8]}"
        used[slug] = prompt
        slugs[prompt] = slug
    pairs = []
    for inp in inputs:
        for prompt in prompts:
            if as_file:
                out = output
            else:
                rel_parent = Path(inp.rel).parent
                out = folder / rel_parent / f"{_short_stem(Path(inp.rel).stem)}-{slugs[prompt]}.png"
            pair = Pair(inp, prompt, out, pair_seed(base_seed, inp.rel, prompt))
            if shard is None or in_shard(pair, shard):
                pairs.append(pair)
    return pairs


def check_outputs(pairs: list[Pair]) -> None:
    """Refuse, before any compute, outputs that would overwrite an input or cannot be written."""
    inputs = {os.path.abspath(p.input.path) for p in pairs}
    checked: set[Path] = set()
    for p in pairs:
        if os.path.abspath(p.output) in inputs:
            raise OutputError("the output would overwrite an input image", p.output)
        parent = p.output.parent
        if parent in checked:
            continue
        checked.add(parent)
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create the output folder: {exc.strerror}", parent) from None
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OutputError("output folder is not writable", parent)


class Report:
    """JSON lines, one record per pair, appended and flushed as each pair ends."""

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


class RunEvents:
    """What a run reports as it goes; the CLI overrides these to show progress."""

    def pair_started(self, pairs: list[Pair], done: int, total: int) -> None: ...

    def step(self, pair: Pair, info) -> None: ...

    def pair_finished(self, pair: Pair, record: dict) -> None: ...

    def note(self, pair: Pair | None, message: str) -> None: ...


@dataclass
class RunOptions:
    overwrite: bool = False
    batch: int = 1
    save_every: int = 0
    contrast: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    base_seed: int = 0
    # issue 6: keep the trained network; render at another size; blend with the content
    save_style: Path | None = None  # a .style file (one pair) or a folder
    output_size: str | None = None  # None: the training size; "full": the input's; or a longest side
    strength: float = 1.0


def style_path(pair: Pair, save_style: Path | None, single: bool) -> Path | None:
    """Where ``--save-style`` puts a pair's network: the path itself for one pair
    when it ends in .style, else ``<output stem>.style`` in that folder."""
    if save_style is None:
        return None
    if single and save_style.suffix == ".style":
        return save_style
    return save_style / f"{pair.output.stem}.style"


@dataclass
class Summary:
    ok: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    records: list[dict] = field(default_factory=list)

    def add(self, record: dict) -> None:
        """Keep a finished file's record and count it under its status (ok, skipped, failed)."""
        self.records.append(record)
        setattr(self, record["status"], getattr(self, record["status"]) + 1)


def base_record(pair: Pair, settings, status: str, error: str | None = None) -> dict:
    return {
        "input": str(pair.input.path), "prompt": pair.prompt, "output": str(pair.output),
        "status": status, "error": error, "seed": pair.seed, "steps": settings.steps,
        "size": None, "device": None, "precision": None, "seconds_total": None, "seconds_per_step": None,
        "losses": None, "peak_memory_bytes": None, "rejected_fraction": None,
    }


def output_metadata(pair: Pair, settings, models_info: dict, options: RunOptions) -> dict:
    """What goes into the PNG's text chunks: enough to repeat the run (no timings, so
    the same seed gives the same bytes)."""
    return {
        "prompt": pair.prompt,
        "Software": f"clipstyle {__version__}",
        "clipstyle": {
            "version": __version__, "input": Path(pair.input.rel).name, "prompt": pair.prompt,
            "seed": pair.seed, "base_seed": options.base_seed, "contrast": options.contrast,
            "strength": options.strength, "output_size": options.output_size,
            "settings": settings.to_dict(), "models": models_info,
        },
    }


def _is_oom(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def _free_memory(models) -> None:
    import gc

    import torch

    gc.collect()
    if models is not None and models.device.type == "cuda":
        torch.cuda.empty_cache()


def run_pairs(pairs: list[Pair], models, settings, options: RunOptions, report: Report,
              events: RunEvents | None = None) -> Summary:
    """Stylize every pair, skipping existing outputs and isolating failures."""
    import torch

    from clipstyle import images as io
    from clipstyle.stylize import check_prompt, prepare_content, stylize_many

    events = events or RunEvents()
    summary = Summary()
    start = time.perf_counter()

    def finish(pair: Pair, record: dict) -> None:
        summary.add(record)
        report.write(record)
        events.pair_finished(pair, record)

    prompt_errors: dict[str, str] = {}
    to_run = [p for p in pairs if options.overwrite or not p.output.exists()]
    for prompt in dict.fromkeys(p.prompt for p in to_run):
        try:
            for warning in check_prompt(models, prompt):
                events.note(None, f"{prompt[:40]!r}: {warning}")
        except ClipstyleError as exc:
            prompt_errors[prompt] = exc.reason

    pending: list[tuple[Pair, torch.Tensor]] = []
    total = len(pairs)
    done = 0
    cache: dict[str, torch.Tensor | ClipstyleError] = {}

    originals: dict[str, object] = {}

    def load(pair: Pair):
        key = str(pair.input.path)
        if key not in cache:
            try:
                loaded = io.open_image(pair.input.path, options.max_pixels)
                for note in loaded.notes:
                    events.note(pair, note)
                cache.clear()  # keep one decoded image at a time
                cache[key] = prepare_content(loaded.image, settings.size)
                if options.output_size:
                    originals[key] = loaded.image
            except ClipstyleError as exc:
                cache.clear()
                cache[key] = exc
        return cache[key]

    single = len(pairs) == 1

    def final_image(pair: Pair, result, content):
        """The image to save: the run's output, or the trained network rendered
        at the requested size, blended with the content by ``strength``."""
        if not options.output_size and options.strength == 1.0:
            return result.tensor
        from clipstyle.styles import render, target_size

        if options.output_size:
            original = originals.pop(str(pair.input.path))
            longest = None if options.output_size == "full" else int(options.output_size)
            content = io.to_tensor(original, target_size(*original.size, longest))
            return render(result.network, content, strength=options.strength)
        return torch.lerp(content.cpu(), result.tensor, options.strength)

    def flush() -> None:
        nonlocal done
        if not pending:
            return
        batch = list(pending)
        pending.clear()
        events.pair_started([p for p, _ in batch], done, total)
        by_index = {i: p for i, (p, _) in enumerate(batch)}

        def on_step(info) -> None:
            pair = by_index[info.pair]
            events.step(pair, info)
            if options.save_every and info.step % options.save_every == 0 and info.step < settings.steps:
                snap = pair.output.with_name(f"{pair.output.stem}.step{info.step:04d}.png")
                image = info.output
                if options.contrast:
                    image = io.enhance_contrast(image)
                io.save_png(image, snap, {"prompt": pair.prompt, "step": str(info.step)}, overwrite=True)

        try:
            results = stylize_many([c for _, c in batch], [p.prompt for p, _ in batch],
                                   [p.seed for p, _ in batch], models=models, settings=settings, callback=on_step)
        except Exception as exc:  # noqa: BLE001 - one pair's failure must not stop the others
            _free_memory(models)
            if _is_oom(exc):
                h, w = batch[0][1].shape[-2:]
                message = (f"out of memory at {w}x{h} px with {settings.crops} crops"
                           f"{f' and {len(batch)} pairs per batch' if len(batch) > 1 else ''}; lower --size,"
                           f" --crops{' or --batch' if len(batch) > 1 else ''}, or encode crops in chunks with"
                           " --crop-batch 8")
            else:
                from clipstyle.cli.common import format_error

                message = format_error(exc)
            for pair, _ in batch:
                done += 1
                finish(pair, base_record(pair, settings, "failed", f"{pair.input.path}: {message}"))
            return
        for (pair, content), result in zip(batch, results):
            done += 1
            record = base_record(pair, settings, "ok")
            record.update(size=list(result.size), device=result.device, precision=result.precision,
                          seconds_total=round(result.seconds_total, 4),
                          seconds_per_step=round(result.seconds_per_step, 5),
                          losses=result.losses or None, peak_memory_bytes=result.peak_memory_bytes,
                          rejected_fraction=result.rejected_fraction)
            if result.error is not None:
                record.update(status="failed", error=f"{pair.input.path}: {result.error.reason}")
            else:
                try:
                    image = final_image(pair, result, content)
                    if options.contrast:
                        image = io.enhance_contrast(image)
                    io.save_png(image, pair.output, output_metadata(pair, settings, models.info, options),
                                overwrite=options.overwrite)
                    record["output_size"] = list(image.shape[-1:-3:-1])
                    style = style_path(pair, options.save_style, single)
                    if style is not None:
                        from clipstyle.styles import save_style, style_metadata

                        meta = style_metadata(prompt=pair.prompt, settings=settings, seed=pair.seed,
                                              input_path=pair.input.path, trained_size=result.size,
                                              models_info=models.info)
                        save_style(style, result.network, meta, overwrite=options.overwrite)
                        record["style"] = str(style)
                except ClipstyleError as exc:
                    record.update(status="failed", error=str(exc))
            finish(pair, record)

    for pair in pairs:
        if pair.output.exists() and not options.overwrite:
            done += 1
            finish(pair, base_record(pair, settings, "skipped", f"{pair.output} exists"))
            continue
        if pair.prompt in prompt_errors:
            done += 1
            finish(pair, base_record(pair, settings, "failed", f"{pair.prompt!r}: {prompt_errors[pair.prompt]}"))
            continue
        content = load(pair)
        if isinstance(content, ClipstyleError):
            done += 1
            finish(pair, base_record(pair, settings, "failed", str(content)))
            continue
        pending.append((pair, content))
        if len(pending) >= max(1, options.batch):
            flush()
    flush()
    summary.seconds = time.perf_counter() - start
    return summary
