"""Video files: read a film's frames one at a time, write a restyled film with the original's timing.

A film is never held whole: :func:`transcode` decodes a frame, hands it to a
function, encodes what comes back and moves on, so memory does not grow with
the film's length. What a viewer relies on is kept:

- every frame's timestamp (pts) and the stream's time base, so a variable
  frame rate stays variable and the frame count and duration stay the same;
- the rotation a phone records (display matrix) and the pixel aspect ratio
  (anamorphic video), written to the output as they were: frames are restyled
  in the pixels they are stored in, and shown as the original is;
- every audio stream, copied packet by packet (remuxed, never re-encoded).

The output goes to a hidden temporary file beside it and is renamed when
whole: an interrupt or a failure leaves no partial film. PyAV (FFmpeg's
libraries) is an optional dependency: ``pip install 'clipstyle[video]'``.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from clipstyle.config import VIDEO_CODEC, VIDEO_CRF, VIDEO_PRESET
from clipstyle.errors import ClipstyleError, OutputError

VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi"})
# Containers clipstyle writes (H.264 and AAC copy fit in each), by suffix.
OUTPUT_FORMATS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}
# The container tag that holds clipstyle's record (JSON), as PNG text chunks do for images.
RECORD_TAG = "comment"
INSTALL_HINT = "reading and writing video needs PyAV: pip install 'clipstyle[video]'"


class VideoError(ClipstyleError):
    """A video that cannot be read or written."""


def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def require_av():
    """The ``av`` module, or one line saying how to install it."""
    try:
        import av
    except ImportError:
        raise ClipstyleError(INSTALL_HINT) from None
    return av


def encoders() -> set[str] | None:
    """The video encoders this FFmpeg has; None without PyAV (a film then fails on its own line)."""
    try:
        import av
    except ImportError:
        return None
    found = set()
    for name in av.codecs_available:
        try:
            codec = av.Codec(name, "w")
        except Exception:  # noqa: BLE001 - a decoder only
            continue
        if codec.type == "video":
            found.add(name)
    return found


def _reason(exc: BaseException) -> str:
    """FFmpeg's message without its errno prefix and file name."""
    text = getattr(exc, "strerror", None) or str(exc)
    return text.split(": '", 1)[0].strip() or type(exc).__name__


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe` finds in a film (sizes are the stored frames', before rotation)."""

    width: int
    height: int
    frames: int  # as the container states it (0: not stated)
    fps: Fraction | None  # average frame rate
    duration: float  # seconds (0: not stated)
    rotation: int  # degrees a viewer turns the frames by (counter-clockwise), 0 for none
    sample_aspect: Fraction | None  # pixel aspect ratio; None or 1 for square pixels
    audio_streams: int
    codec: str

    @property
    def expected_frames(self) -> int:
        """The stated frame count, else one estimated from the duration and the average rate
        (Matroska and WebM state none); 0 when neither is known."""
        if self.frames:
            return self.frames
        return round(self.duration * float(self.fps)) if self.duration and self.fps else 0

    @property
    def display_size(self) -> tuple[int, int]:
        """(w, h) as a viewer shows it: pixel aspect applied, then rotation."""
        w, h = self.width, self.height
        if self.sample_aspect and self.sample_aspect != 1:
            w = round(w * self.sample_aspect)
        return (h, w) if self.rotation % 180 else (w, h)


def _open(path: Path):
    av = require_av()
    try:
        container = av.open(str(path), "r")
    except FileNotFoundError:
        raise VideoError("no such file", path) from None
    except IsADirectoryError:
        raise VideoError("is a folder, not a video", path) from None
    except (av.FFmpegError, OSError, UnicodeDecodeError, ValueError) as exc:
        raise VideoError(f"cannot read it as a video ({_reason(exc)})", path) from None
    if not container.streams.video:
        kinds = "audio only" if container.streams.audio else "no video stream"
        container.close()
        raise VideoError(f"holds {kinds}: nothing to restyle", path)
    return container


def probe(path: str | Path) -> VideoInfo:
    """The film's size, frame count, rate, duration, rotation, pixel aspect and audio; reads the
    first frame, so a file that opens but holds no decodable picture is refused here."""
    path = Path(path)
    av = require_av()
    container = _open(path)
    try:
        stream = container.streams.video[0]
        try:
            first = next(container.decode(stream), None)
        except (av.FFmpegError, OSError) as exc:
            raise VideoError(f"cannot decode its frames ({_reason(exc)})", path) from None
        if first is None:
            raise VideoError("holds no frame that can be decoded", path)
        duration = 0.0
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif _tag_seconds(stream.metadata.get("DURATION")):  # Matroska's per-stream tag
            duration = _tag_seconds(stream.metadata.get("DURATION"))
        elif container.duration:
            duration = container.duration / 1_000_000
        sar = stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio
        return VideoInfo(
            width=first.width,
            height=first.height,
            frames=int(stream.frames or 0),
            fps=stream.average_rate or stream.guessed_rate,
            duration=duration,
            rotation=int(getattr(first, "rotation", 0) or 0) % 360,
            sample_aspect=Fraction(sar) if sar else None,
            audio_streams=len(container.streams.audio),
            codec=stream.codec_context.name,
        )
    finally:
        container.close()


def _tag_seconds(text) -> float:
    """Seconds of a duration tag ``HH:MM:SS.fraction`` (as Matroska stores it), 0.0 when it is not one."""
    match = re.fullmatch(r"(\d+):(\d{2}):(\d{2}(?:\.\d+)?)", str(text or "").strip())
    if match is None:
        return 0.0
    hours, minutes, seconds = match.groups()
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def upright(array, rotation: int):
    """An (H, W, 3) frame turned as a viewer shows it (``rotation``: degrees counter-clockwise)."""
    import numpy as np

    return np.ascontiguousarray(np.rot90(array, k=(rotation // 90) % 4))


def sample_frames(path: str | Path, count: int) -> tuple[list, list[int]]:
    """``count`` frames spread evenly over the film, upright (RGB uint8 arrays), and their indices.

    Frame i of n stands for the i-th of ``count`` equal stretches of the film, taken
    at its middle. Decodes the film once, keeping only the frames taken.
    """
    path = Path(path)
    info = probe(path)
    total = info.frames or count_frames(path)
    wanted = sorted({min(total - 1, int((i + 0.5) * total / count)) for i in range(count)})
    taken, indices = [], []
    for index, frame in enumerate(_frames(path)):
        if index in wanted:
            taken.append(upright(frame.to_ndarray(format="rgb24"), info.rotation))
            indices.append(index)
            if len(taken) == len(wanted):
                break
    if not taken:
        raise VideoError("holds no frame that can be decoded", path)
    return taken, indices


def count_frames(path: str | Path) -> int:
    """Frames in the film, counted by reading its packets (for containers that do not state it)."""
    container = _open(Path(path))
    try:
        stream = container.streams.video[0]
        return sum(1 for p in container.demux(stream) if p.size)
    finally:
        container.close()


def _frames(path: Path) -> Iterator:
    av = require_av()
    container = _open(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            yield from container.decode(stream)
        except (av.FFmpegError, OSError) as exc:
            raise VideoError(f"cannot decode its frames ({_reason(exc)})", path) from None
    finally:
        container.close()


def rgb_frames(path: str | Path) -> Iterator:
    """Every frame of the film in order as an (H, W, 3) uint8 RGB array, as stored (not rotated)."""
    for frame in _frames(Path(path)):
        yield frame.to_ndarray(format="rgb24")


def read_record(path: str | Path) -> dict | None:
    """The record clipstyle wrote into a film's container metadata, or None."""
    try:
        av = require_av()
        with av.open(str(path), "r") as container:
            text = container.metadata.get(RECORD_TAG)
        record = json.loads(text) if text else None
    except Exception:  # noqa: BLE001 - any unreadable file simply has no record
        return None
    return record if isinstance(record, dict) else None


@dataclass(frozen=True)
class Encoding:
    """How the restyled film is encoded (``--codec``, ``--crf``, ``--video-preset``)."""

    codec: str = VIDEO_CODEC
    crf: int = VIDEO_CRF
    preset: str = VIDEO_PRESET
    pix_fmt: str = "yuv420p"  # what every player plays

    def record(self) -> dict:
        return {"codec": self.codec, "crf": self.crf, "preset": self.preset, "pix_fmt": self.pix_fmt}


@dataclass
class FilmStats:
    """What :func:`transcode` did: frames, size, and where the time went."""

    frames: int = 0
    size: tuple[int, int] = (0, 0)  # (w, h) of the stored frames
    fps: float | None = None
    duration: float = 0.0
    audio_streams: int = 0
    subtitle_streams: int = 0  # copied
    not_copied: list = field(default_factory=list)  # the other streams, each said in words
    warnings: list = field(default_factory=list)  # what the user should know about the film, in words
    seconds: dict = field(default_factory=lambda: {"decode": 0.0, "restyle": 0.0, "encode": 0.0})

    def notes(self) -> list[str]:
        """Every warning for the user: the streams left out, then the rest."""
        return [f"not copied: {why}" for why in self.not_copied] + self.warnings


def output_size(width: int, height: int, longest: int | None) -> tuple[int, int]:
    """The stored output frame size: the longest side capped at ``longest`` (aspect kept),
    sides even (4:2:0 chroma needs them so)."""
    if longest is not None and max(width, height) > longest:
        scale = longest / max(width, height)
        width, height = round(width * scale), round(height * scale)
    return max(2, width - width % 2), max(2, height - height % 2)


_TMP_COUNTER = itertools.count()


def _why_not_copied(stream, supported: set, suffix: str) -> str | None:
    """None for a subtitle stream the output container can hold (it is copied); else why the
    stream is left out, in words for the user's note."""
    codec = getattr(getattr(stream, "codec_context", None), "name", None)
    kind = {"video": "second video", "attachment": "attached"}.get(stream.type, stream.type)
    named = f"{kind} stream {stream.index}" + (f" ({codec})" if codec else "")
    if stream.type == "subtitle":
        if codec in supported:
            return None
        return f"{named}: {suffix} cannot hold it (.mkv can hold most)"
    return f"{named}: only the picture, sound and subtitles are copied"


def transcode(
    src: str | Path,
    dst: str | Path,
    restyle: Callable,
    *,
    longest: int | None = None,
    encoding: Encoding | None = None,
    record: dict | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    batch: int = 1,
) -> FilmStats:
    """Write ``dst``: every frame of ``src`` passed through ``restyle``, with the original's
    timestamps, rotation, pixel aspect and audio.

    ``restyle`` takes ``batch`` frames at a time (fewer at the end) as an (N, H, W, 3) uint8
    RGB array and returns the same. ``longest`` caps the stored frames' longest side.
    ``record`` (JSON-ready) goes into the container's metadata. ``progress(done, total)``
    after each batch (total: the film's stated frame count, 0 when unknown). An existing
    ``dst`` is kept unless ``overwrite``.
    """
    import numpy as np

    av = require_av()
    src, dst = Path(src), Path(dst)
    encoding = encoding or Encoding()
    fmt = OUTPUT_FORMATS.get(dst.suffix.lower())
    if fmt is None:
        raise OutputError(f"videos are written as {', '.join(sorted(OUTPUT_FORMATS))}", dst)
    if os.path.lexists(dst) and not overwrite:
        raise OutputError("exists (use --overwrite to replace it)", dst)
    info = probe(src)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}-{next(_TMP_COUNTER)}.tmp")
    stats = FilmStats(audio_streams=info.audio_streams)
    inp = _open(src)
    out = None
    try:
        try:
            out = av.open(str(tmp), "w", format=fmt)
        except (av.FFmpegError, OSError) as exc:
            raise OutputError(f"cannot write: {_reason(exc)}", dst) from None
        vin = inp.streams.video[0]
        vin.thread_type = "AUTO"
        w, h = output_size(info.width, info.height, longest)
        stats.size = (w, h)
        rate = info.fps or Fraction(25)
        try:
            vout = out.add_stream(encoding.codec, rate=rate)
        except (av.FFmpegError, ValueError) as exc:
            raise ClipstyleError(f"cannot encode with codec {encoding.codec!r} ({_reason(exc)})") from None
        vout.width, vout.height, vout.pix_fmt = w, h, encoding.pix_fmt
        vout.time_base = vin.time_base
        vout.codec_context.time_base = vin.time_base
        if info.sample_aspect and info.sample_aspect != 1:
            vout.codec_context.sample_aspect_ratio = info.sample_aspect
        if info.rotation:
            vout.set_display_rotation(info.rotation)
        if encoding.codec in ("libx264", "libx265"):
            vout.options = {"crf": str(encoding.crf), "preset": encoding.preset}
        copied = {a.index: out.add_stream_from_template(a) for a in inp.streams.audio}
        for other in inp.streams:
            if other.index == vin.index or other.type == "audio":
                continue
            why = _why_not_copied(other, out.supported_codecs, dst.suffix.lower())
            if why is None:
                copied[other.index] = out.add_stream_from_template(other)
                stats.subtitle_streams += 1
            else:
                stats.not_copied.append(why)
        if record is not None:
            out.metadata[RECORD_TAG] = json.dumps(record, sort_keys=True, ensure_ascii=True)
        total = info.expected_frames  # for the progress bar; only a stated count is held to
        last_end = 0.0
        pending: list = []  # decoded frames waiting for a full batch: (frame, rgb)

        def flush() -> None:
            nonlocal last_end
            t0 = time.perf_counter()
            styled = restyle(np.stack([rgb for _, rgb in pending]))
            t1 = time.perf_counter()
            stats.seconds["restyle"] += t1 - t0
            for (frame, _), image in zip(pending, styled):
                new = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
                new.pts, new.time_base = frame.pts, frame.time_base
                for p in vout.encode(new):
                    out.mux(p)
                stats.frames += 1
                if frame.pts is not None and frame.time_base is not None:
                    last_end = max(last_end, float((frame.pts + (frame.duration or 0)) * frame.time_base))
            pending.clear()
            stats.seconds["encode"] += time.perf_counter() - t1
            if progress is not None:
                progress(stats.frames, max(total, stats.frames))

        decode_t = time.perf_counter()
        streams = [inp.streams[i] for i in copied]
        for packet in inp.demux(vin, *streams):
            if packet.stream.index in copied:  # audio and subtitles: copied as they are
                if packet.dts is None:  # the demuxer's flush packet
                    continue
                packet.stream = copied[packet.stream.index]
                out.mux(packet)
                continue
            try:
                frames = packet.decode()
            except (av.FFmpegError, OSError) as exc:
                raise VideoError(f"cannot decode frame {stats.frames + 1} ({_reason(exc)})", src) from None
            for frame in frames:
                pending.append((frame, frame.reformat(width=w, height=h, format="rgb24").to_ndarray()))
                stats.seconds["decode"] += time.perf_counter() - decode_t
                if len(pending) >= batch:
                    flush()
                decode_t = time.perf_counter()
        if pending:
            flush()
        t0 = time.perf_counter()
        for p in vout.encode(None):
            out.mux(p)
        out.close()
        out = None
        stats.seconds["encode"] += time.perf_counter() - t0
        if stats.frames == 0:
            raise VideoError("holds no frame that can be decoded", src)
        # A film cut short whose index comes first (MP4 "faststart") opens and decodes until
        # its data ends: fewer frames than it states. A frame or two may legitimately be
        # missing (an edit list that starts later), so only a real shortfall fails.
        if info.frames and info.frames - stats.frames > max(2, info.frames // 100):
            raise VideoError(f"is truncated or damaged: {stats.frames} of its {info.frames} frames could be read", src)
        # Without a stated count the duration gives an estimate, which a longer audio track or
        # an odd rate can throw off: a shortfall is said, not failed.
        if not info.frames and total - stats.frames > max(2, total // 20):
            stats.warnings.append(
                f"{stats.frames} frames where its duration ({info.duration:.1f} s at {float(info.fps):.3g} frames/s)"
                f" suggests about {total}: it may be truncated"
            )
        stats.fps = float(rate)
        stats.duration = last_end
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        _move(tmp, dst, overwrite)
    except OSError as exc:
        raise OutputError(f"cannot write: {exc.strerror or exc}", dst) from None
    except av.FFmpegError as exc:
        raise VideoError(f"cannot write the video ({_reason(exc)})", dst) from None
    finally:
        inp.close()
        if out is not None:
            try:
                out.close()
            except Exception:  # noqa: BLE001 - closing a half-written file after a failure
                pass
        try:
            tmp.unlink()
        except OSError:  # moved into place, or never made
            pass
    return stats


def _move(tmp: Path, dst: Path, overwrite: bool) -> None:
    """Put the whole file in place; without ``overwrite``, never over a file that appeared meanwhile."""
    if overwrite:
        os.replace(tmp, dst)
        return
    try:
        os.link(tmp, dst)
    except FileExistsError:
        raise OutputError("exists (use --overwrite to replace it)", dst) from None
    except OSError:
        os.replace(tmp, dst)  # file systems without hard links
