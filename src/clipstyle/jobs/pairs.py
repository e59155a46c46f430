"""``run``'s plan: image x prompt pairs, each with its output path, seed and shard.

Imports no torch, so commands that only plan (``sheet``) start at once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from clipstyle.errors import ClipstyleError
from clipstyle.images import slugify
from clipstyle.jobs.inputs import InputFile, check_kind, mirrored_output, output_file
from clipstyle.video import is_video


@dataclass
class RunJob:
    """One image x prompt pair to optimise: where its output (and style file) go, and its seed."""

    input: InputFile
    prompt: str
    output: Path
    seed: int
    style: Path | None = None  # where --save-style puts the trained network, if asked
    # --train-on: the images (and films) one network is trained over; the job's output is then
    # the style file alone. A film input (no train_on) trains on its own frames and renders itself.
    train_on: tuple[InputFile, ...] | None = None
    # What the network is trained towards when it is more than ``prompt`` alone: a
    # clipstyle.method.targets.Targets (style images, a blend, phrases to avoid); ``prompt`` is then its label.
    target: object | None = None

    def targets(self):
        """The pair's Targets: ``target``, or the prompt alone."""
        from clipstyle.method.targets import Targets

        return self.target if self.target is not None else Targets.of(self.prompt)

    def target_record(self) -> dict | None:
        """What outputs record about the target beyond the prompt (None for a plain prompt)."""
        spec = self.targets()
        return None if spec.plain else spec.record()

    @property
    def film(self) -> bool:
        """Whether the input is a film: trained on its frames, rendered to a film."""
        return self.train_on is None and is_video(self.input.path)


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


def in_shard(pair: RunJob, shard: tuple[int, int]) -> bool:
    """Stable assignment of a pair to one of N shards, the same on every machine."""
    k, n = shard
    digest = hashlib.sha256(f"{pair.input.rel}\0{pair.prompt}".encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "little") % n == k - 1


def style_path(output: Path, save_style: Path | None, single: bool) -> Path | None:
    """Where ``--save-style`` puts a pair's network: the path itself for one pair
    when it ends in .style, else ``<output stem>.style`` in that folder."""
    if save_style is None:
        return None
    if single and save_style.suffix == ".style":
        return save_style
    return save_style / f"{output.stem}.style"


def plan_pairs(
    inputs: list[InputFile],
    prompts: list[str],
    output: Path | None,
    base_seed: int,
    shard: tuple[int, int] | None = None,
    save_style: Path | None = None,
) -> list[RunJob]:
    """One RunJob per (image, prompt), with its output path and seed.

    ``output`` is a file when there is one image and one prompt and it ends in
    .png (a video suffix for a film); otherwise a folder (default: the current folder).
    Output names are ``<stem>-<prompt-slug>.png`` (``.mp4`` for a film), under the
    input's subfolder for folder inputs.
    """
    single = len(inputs) == 1 and len(prompts) == 1
    as_file = output_file(output, single, "one image and one prompt", videos=True)
    check_kind(as_file, inputs)
    folder = Path(".") if output is None else output
    slugs: dict[str, str] = {}
    used: dict[str, str] = {}
    for prompt in prompts:
        slug = slugify(prompt)
        if slug in used and used[slug] != prompt:  # two prompts, one slug: keep both outputs apart
            slug = f"{slug}-{hashlib.sha256(prompt.encode('utf-8')).hexdigest()[:8]}"
        used[slug] = prompt
        slugs[prompt] = slug
    jobs = []
    for inp in inputs:
        for prompt in prompts:
            out = as_file or mirrored_output(folder, inp, slugs[prompt], ".mp4" if is_video(inp.path) else ".png")
            job = RunJob(inp, prompt, out, pair_seed(base_seed, inp.rel, prompt), style_path(out, save_style, single))
            if shard is None or in_shard(job, shard):
                jobs.append(job)
    return jobs


def plan_set(
    name: InputFile,
    members: list[InputFile],
    prompts: list[str],
    save_style: Path,
    base_seed: int,
) -> list[RunJob]:
    """``--train-on``: one job per prompt, training one network over ``members`` and writing only
    its style file: ``save_style`` itself for one prompt (a .style name), else
    ``<save_style>/<set name>-<prompt-slug>.style``. ``name`` identifies the set (records, seed)."""
    single = len(prompts) == 1 and save_style.suffix == ".style"
    jobs = []
    for prompt in prompts:
        out = save_style if single else save_style / f"{Path(name.rel).stem}-{slugify(prompt)}.style"
        jobs.append(RunJob(name, prompt, out, pair_seed(base_seed, name.rel, prompt), None, tuple(members)))
    return jobs
