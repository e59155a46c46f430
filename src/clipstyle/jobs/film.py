"""Films in jobs: restyling every frame of a video with trained networks, and the frames a style trains on.

Shared by ``apply`` (a saved style over a film) and ``run`` (a style trained on
the film's own frames, then over all of it). Decoding, encoding, timing, audio
and the atomic write are clipstyle.video's; this module puts the networks in
between and reports progress in frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from clipstyle import video
from clipstyle.config import FRAME_BATCH
from clipstyle.device import release_cached_memory
from clipstyle.errors import is_out_of_memory
from clipstyle.images import prepare_content
from clipstyle.styles.rendering import plan_tiles, render, render_batch


@dataclass(frozen=True)
class FrameProgress:
    """Progress inside a film job (batch.Events.progress): frames written of ``total`` (0: unknown)."""

    done: int
    total: int
    unit: str = "frame"


def restyle_film(
    src: Path,
    dst: Path,
    networks,
    *,
    device: torch.device,
    longest: int | None = None,
    strength: float = 1.0,
    mix=None,
    tile: int | None = None,
    overlap: int | None = None,
    tile_stats: str = "image",
    encoding: video.Encoding | None = None,
    record: dict | None = None,
    overwrite: bool = False,
    progress=None,
    batch: int | None = None,
) -> video.FilmStats:
    """Every frame of ``src`` through ``networks`` (rendering.render's options), written to ``dst``
    with the film's timing, rotation, pixel aspect and audio (clipstyle.video.transcode).
    ``longest`` caps the frames' longest side; ``progress(done, total)`` after each frame
    (after each batch of frames). ``batch``: frames per network pass (default: FRAME_BATCH on a
    GPU, 1 on a CPU)."""
    options = {"strength": strength, "mix": mix, "tile": tile, "tile_stats": tile_stats, "device": device}
    if overlap is not None:
        options["overlap"] = overlap
    # On a GPU frames go through in batches (one pass each), unless tiles are asked for or
    # a batch does not fit; one at a time on a CPU.
    if batch is None:
        batch = FRAME_BATCH if device.type in ("cuda", "mps") and not tile else 1

    def restyle(frames):  # (N, H, W, 3) uint8
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).float().div_(255)
        y = None
        if len(x) > 1 and plan_tiles(*x.shape[-2:]) is None:
            try:
                y = render_batch(networks, x, strength=strength, mix=mix, device=device)
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if not is_out_of_memory(exc):
                    raise
                release_cached_memory(device)
        if y is None:
            y = torch.cat([render(networks, x[i : i + 1], **options) for i in range(len(x))])
        return y.mul(255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()

    return video.transcode(
        src,
        dst,
        restyle,
        longest=longest,
        encoding=encoding,
        record=record,
        overwrite=overwrite,
        progress=progress,
        batch=batch,
    )


def film_fields(stats: video.FilmStats) -> dict:
    """A film job's report fields: frames, rate, duration and where the time went."""
    total = sum(stats.seconds.values())
    return {
        "frames": stats.frames,
        "fps": round(stats.fps, 4) if stats.fps else None,
        "duration": round(stats.duration, 4),
        "audio_streams": stats.audio_streams,
        "subtitle_streams": stats.subtitle_streams,
        "not_copied": stats.not_copied,
        "frames_per_second": round(stats.frames / total, 3) if total else None,
        "seconds_decode": round(stats.seconds["decode"], 4),
        "seconds_restyle": round(stats.seconds["restyle"], 4),
        "seconds_encode": round(stats.seconds["encode"], 4),
    }


def training_frames(path: Path, count: int, size: int) -> tuple[list[torch.Tensor], list[int]]:
    """``count`` frames spread over the film, upright, each prepared at the training ``size``
    (images.prepare_content), and their frame indices."""
    from PIL import Image

    frames, indices = video.sample_frames(path, count)
    return [prepare_content(Image.fromarray(f), size) for f in frames], indices
