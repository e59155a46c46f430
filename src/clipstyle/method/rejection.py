"""Threshold rejection without its wasted work: the two-pass CLIP path.

Threshold rejection (paper, section 3.2) sets the loss of every patch whose
directional loss is under tau to 0, so a rejected patch gives no gradient; yet
the single pass (one CLIP forward and backward over all rows: each pair's
whole image and its crops) back-propagates through it with the rest. The
two-pass path first runs CLIP without gradients over the crops alone, which
gives every crop's loss and so which are rejected, then runs the forward and
backward over the whole images and the kept crops only. The gradient is the
same (to rounding: the kept rows are encoded in other batches); the whole
image's row is never rejected.

Cost, in units of one row's forward and backward: single = G + C, two-pass =
alpha C + G + K (C crops, K of them kept, G whole images, alpha the cost of a
no-grad forward of a row relative to its forward and backward). With frozen
weights a backward pass computes input gradients only, about one forward's
work, so alpha is nearer 1/2 than the 1/3 one would guess from training:
the two-pass path pays once more than a fraction ``alpha`` of the crops is
rejected. The loop takes it per step when the cost model, fed with the
rejected fraction of the step before, predicts it cheaper; once taken, the
kept pass is never more work than the full one, so a step costs more than the
single pass only when the rejected fraction falls below break-even from one
step to the next, and then by at most the no-grad pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from clipstyle.device import autocast
from clipstyle.method import losses as L
from clipstyle.method.augment import CropGrids, sample_crops

PATHS = ("auto", "single", "two")

# A no-grad forward of one CLIP row (ViT-B/32, the fast path, fp32) as a
# fraction of its forward and backward with input gradients: measured on a
# 2-core Xeon (Cascade Lake), docs/performance.md.
NO_GRAD_COST = 0.45
# Fixed cost of one CLIP call (one chunk of rows), in rows: op dispatch and
# the threads' wait at each of its ~1,500 ops. Small on a quiet CPU; measured
# at about 8 rows on a 2-core CPU loaded 5-fold by other processes (one row's
# pass took 6 rows' time there). One row is a compromise: at 16 crops the
# two-pass path then pays from about half of them rejected.
CHUNK_COST = 1.0


@dataclass(frozen=True)
class Rejection:
    """How the loop runs threshold rejection. The default is what ``run`` uses.

    path: "auto" (the two-pass path when the cost model predicts it cheaper,
    on the CPU, where the model was measured), "single" (one CLIP pass over
    every row) or "two" (always two passes); a tuple is cycled step by step
    (a benchmark alternates the paths in one loop). force: None, or a fraction
    of each pair's crops (the first ones drawn) counted as rejected in place of
    the threshold, for benchmarks and tests: with random weights nearly no
    patch passes the threshold, and which crops are rejected does not change
    what a pass costs.
    """

    path: str | tuple[str, ...] = "auto"
    force: float | None = None

    def __post_init__(self) -> None:
        paths = (self.path,) if isinstance(self.path, str) else tuple(self.path)
        if not paths or any(p not in PATHS for p in paths):
            raise ValueError(f"path must be one of {', '.join(PATHS)} (or a tuple of them), not {self.path!r}")
        if self.force is not None and not 0.0 <= self.force <= 1.0:
            raise ValueError(f"force must be between 0 and 1, not {self.force}")

    def path_at(self, step: int) -> str:
        return self.path if isinstance(self.path, str) else self.path[step % len(self.path)]

    def forced_count(self, n_crops: int) -> int:
        """Crops of a pair counted as rejected in forced mode (the first ones)."""
        return round(self.force * n_crops) if self.force is not None else 0

    def rejected(self, losses: torch.Tensor, crop_index: torch.Tensor, n_crops: int, threshold: float) -> torch.Tensor:
        """Which rows are rejected patches: (rows,) bool.

        losses: (rows,) directional losses; crop_index: (rows,) each row's crop
        index in its pair, -1 for a whole-image row (never rejected).
        """
        is_crop = crop_index >= 0
        if self.force is not None:
            return is_crop & (crop_index < self.forced_count(n_crops))
        return is_crop & (losses < threshold)


def rows_cost(rows: int, chunk: int) -> float:
    """Cost of a CLIP pass over ``rows`` rows in chunks of ``chunk`` (0: one chunk), in rows."""
    if rows == 0:
        return 0.0
    chunks = 1 if chunk <= 0 else math.ceil(rows / chunk)
    return rows + CHUNK_COST * chunks


def two_pass_cheaper(rejected_fraction: float, crops: int, wholes: int, chunk: int) -> bool:
    """Whether the two-pass path costs less than the single pass, at this rejected fraction of the crops.

    crops: crop rows of all pairs in the batch (the passes batch them
    together, so the fraction is pooled); wholes: whole-image rows (one per
    pair, always kept); chunk: crop_batch.
    """
    kept = round((1.0 - rejected_fraction) * crops)
    single = rows_cost(wholes + crops, chunk)
    two = NO_GRAD_COST * rows_cost(crops, chunk) + rows_cost(wholes + kept, chunk)
    return two < single


class PathChooser:
    """Chooses each step's path from the rejected fraction of the step before (none known: single)."""

    def __init__(self, rejection: Rejection, device: torch.device, chunk: int, host_reads: bool | None = None):
        self.rejection, self.device, self.chunk = rejection, device, chunk
        # Whether a step may read device values (the rejected count): on the CPU,
        # where that costs nothing; never on an accelerator (stylize_many's host_reads).
        self.host_reads = device.type == "cpu" if host_reads is None else host_reads
        self.last_fraction: float | None = None

    def two_pass(self, step: int, pairs: int, n_crops: int) -> bool:
        path = self.rejection.path_at(step)
        if path != "auto":
            return path == "two"
        # Measured on CPUs only. On an accelerator the rows of a pass run in
        # parallel (fewer rows save little) and the kept rows' indices would
        # make the host wait for the device at every step.
        if not self.host_reads or self.last_fraction is None or n_crops == 0:
            return False
        return two_pass_cheaper(self.last_fraction, pairs * n_crops, pairs, self.chunk)

    def observe(self, rejected: float, crops: int) -> None:
        """The step's rejected crops (all pairs together) out of ``crops``."""
        if crops > 0:
            self.last_fraction = rejected / crops


def select(grids: CropGrids, index: torch.Tensor) -> CropGrids:
    """The crops of ``grids`` at ``index`` (a 1-D index tensor), in that order."""
    return CropGrids(grids.grid[index], grids.mask[index])


def kept_crops(
    pairs, n_crops: int, chunk: int, encode_image, rejection: Rejection, threshold: float, amp
) -> list[torch.Tensor]:
    """The no-grad pass: each pair's kept crop indices (1-D long tensors, ascending).

    pairs: the loop's pairs (``leaf``, ``seen`` (what CLIP sees), ``grids``, ``source_emb``, ``text_dir``);
    crops are encoded ``chunk`` at a time (0: all at once), pairs batched
    together as in the single pass.
    """
    device = pairs[0].leaf.device
    rows = [(p, i) for p in pairs for i in range(n_crops)]
    if not rows:
        return [torch.zeros(0, dtype=torch.long, device=device) for _ in pairs]
    step = chunk if chunk > 0 else max(len(rows), 1)
    rejected = []
    with torch.no_grad():
        for s in range(0, len(rows), step):
            part = rows[s : s + step]
            images, src, tdir, index = [], [], [], []
            start = 0
            while start < len(part):  # consecutive crops of one pair: one slice
                p = part[start][0]
                stop = start
                while stop < len(part) and part[stop][0] is p:
                    stop += 1
                a, b = part[start][1], part[stop - 1][1] + 1
                images.append(sample_crops(p.seen, p.grids.slice(a, b)))
                src.append(p.source_emb.expand(b - a, -1))
                tdir.append(p.text_dir.expand(b - a, -1))
                index.append(torch.arange(a, b, device=device))
                start = stop
            with autocast(device, amp):
                emb = encode_image(torch.cat(images))
            per_row = L.directional_loss(emb.float(), torch.cat(src), torch.cat(tdir))
            rejected.append(rejection.rejected(per_row, torch.cat(index), n_crops, threshold))
    mask = torch.cat(rejected).view(len(pairs), n_crops)  # (pairs, crops)
    return [torch.nonzero(~m).flatten() for m in mask]
