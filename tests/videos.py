"""Small films the video tests make themselves with PyAV: a square moving over a gradient, with a
sine-wave audio track; rotation, pixel aspect and irregular frame times on request."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np


def pattern(i: int, width: int = 48, height: int = 32) -> np.ndarray:
    """Frame ``i``: a horizontal gradient with a bright square that moves 2 px right and 1 px down per frame."""
    x = np.linspace(0, 200, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 120, height, dtype=np.float32)[:, None, None]
    img = np.concatenate([x + 0 * y, y + 0 * x, np.full((height, width, 1), 90.0, np.float32)], axis=2)
    left, top = (4 + 2 * i) % (width - 12), (4 + i) % (height - 12)
    img[top : top + 10, left : left + 10] = (250, 230, 40)
    return img.astype(np.uint8)


def make_video(
    path: Path,
    frames: int = 16,
    size: tuple[int, int] = (48, 32),
    fps: int = 12,
    audio: bool = True,
    rotation: int = 0,
    sample_aspect: Fraction | None = None,
    times_ms: list[int] | None = None,
    video: bool = True,
    faststart: bool = False,
    subtitles: list[tuple[int, int, str]] | None = None,
) -> Path:
    """Write an H.264 film of ``frames`` pattern frames (``times_ms``: each frame's time, for a variable
    frame rate) with, when ``audio``, a 440 Hz mono AAC track as long as the film, and, when
    ``subtitles`` ((start ms, duration ms, text) each), a SubRip subtitle track (a .mkv ``path``)."""
    import av

    width, height = size
    out = av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {})  # faststart: index first
    stream = None
    if video:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "18", "preset": "ultrafast"}
        if times_ms is not None:
            stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
        if sample_aspect is not None:
            stream.codec_context.sample_aspect_ratio = sample_aspect
        if rotation:
            stream.set_display_rotation(rotation)
    captions = None
    if subtitles:
        captions = out.add_mux_stream("subrip")
        captions.time_base = Fraction(1, 1000)
    sound = None
    if audio:
        sound = out.add_stream("aac", rate=16000)
        sound.layout = "mono"
    for i in range(frames if video else 0):
        frame = av.VideoFrame.from_ndarray(pattern(i, width, height), format="rgb24")
        if times_ms is not None:
            frame.pts, frame.time_base = times_ms[i], Fraction(1, 1000)
        for packet in stream.encode(frame):
            out.mux(packet)
    if subtitles:  # muxed once the picture's stream has started (the header is written then)
        for start, length, text in subtitles:
            packet = av.Packet(text.encode())
            packet.stream, packet.time_base = captions, Fraction(1, 1000)
            packet.pts = packet.dts = start
            packet.duration = length
            out.mux(packet)
    if sound is not None:
        seconds = (times_ms[-1] / 1000 + 0.1) if times_ms else frames / fps
        t = np.arange(int(16000 * seconds)) / 16000
        wave = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
        chunk = 1024
        for start in range(0, wave.shape[1], chunk):
            part = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(wave[:, start : start + chunk]), format="fltp", layout="mono"
            )
            part.sample_rate, part.pts = 16000, start
            for packet in sound.encode(part):
                out.mux(packet)
        for packet in sound.encode(None):
            out.mux(packet)
    if stream is not None:
        for packet in stream.encode(None):
            out.mux(packet)
    out.close()
    return path


def audio_packets(path: Path) -> list[bytes]:
    """The bytes of every packet of the film's first audio stream, in order."""
    import av

    with av.open(str(path)) as container:
        return [bytes(p) for p in container.demux(container.streams.audio[0]) if p.size]


def subtitle_packets(path: Path) -> list[tuple[float, bytes]]:
    """(time in seconds, bytes) of every packet of the film's first subtitle stream, in order."""
    import av

    with av.open(str(path)) as container:
        return [
            (float(p.pts * p.time_base), bytes(p)) for p in container.demux(container.streams.subtitles[0]) if p.size
        ]


def frame_times(path: Path) -> list[float]:
    """Each decoded frame's time in seconds."""
    import av

    with av.open(str(path)) as container:
        return [float(f.time) for f in container.decode(video=0)]


def decoded_frames(path: Path) -> list[np.ndarray]:
    import av

    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
