"""Flicker, measured: the warping error of a restyled film against its original's motion.

The measure of video style-transfer papers (e.g. Lai et al., "Learning Blind
Video Temporal Consistency", ECCV 2018; Ruder et al., "Artistic style transfer
for videos", 2016): the optical flow between consecutive *original* frames
says where each pixel went; the next restyled frame, warped back along it,
should equal the current restyled frame wherever the flow is trusted:

    E_warp = mean over t of  sum_x M_t(x) * ||S_t(x) - warp(S_t+1)(x)||^2 / (3 * sum_x M_t(x))

with pixel values in [0, 1]. M_t leaves out pixels the flow cannot follow
(occluded or leaving the frame): forward-backward consistency, a pixel is kept
when ``|f + b(x + f)|^2 <= 0.01 (|f|^2 + |b(x + f)|^2) + 0.5`` (Sundaram et al.
2010; Ruder et al. 2016) and its target lies inside the frame. The flow is
OpenCV's classical DIS (Kroeger et al. 2016, medium preset) on greyscale: no
learned model. The same figure for the original film is its floor: what
warping alone leaves (interpolation, brightness changes, flow errors).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from clipstyle.errors import ClipstyleError
from clipstyle.video import VideoError, rgb_frames

CONSISTENCY_SCALE = 0.01  # the forward-backward test's relative term
CONSISTENCY_OFFSET = 0.5  # and its absolute term, in squared pixels


def _cv2():
    try:
        import cv2
    except ImportError:
        raise ClipstyleError("measuring flicker needs OpenCV: pip install 'clipstyle[video]'") from None
    return cv2


@dataclass
class FlickerScore:
    """Warping errors of a restyled film and of its original (the floor), over ``pairs`` frame pairs."""

    frames: int
    pairs: int
    warping_error: float  # the restyled film's
    original_warping_error: float  # the original's, with the same flow and masks
    masked_fraction: float  # mean share of pixels left out as occluded or leaving the frame

    @property
    def ratio(self) -> float:
        """How many times the original's error the restyled film's is (1: no flicker added)."""
        return self.warping_error / self.original_warping_error if self.original_warping_error else float("inf")

    def to_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio}


def flow(cv2, engine, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dense flow (H, W, 2) from grey frame ``a`` to grey frame ``b``, in pixels (x, y)."""
    return engine.calc(a, b, None)


def _warp(cv2, image: np.ndarray, fx: np.ndarray, fy: np.ndarray) -> np.ndarray:
    return cv2.remap(image, fx, fy, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def pair_error(cv2, engine, grey0, grey1, images0: list, images1: list) -> tuple[list[float], float]:
    """For one pair of consecutive frames: each image pair's masked warping error, and the masked share.

    grey0, grey1: the original frames in greyscale (uint8) giving the flow; images0[i] and
    images1[i] (float32 in [0, 1], (H, W, 3)): the frames compared, e.g. restyled and original."""
    h, w = grey0.shape
    forward = flow(cv2, engine, grey0, grey1)
    backward = flow(cv2, engine, grey1, grey0)
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    fx, fy = xs + forward[..., 0], ys + forward[..., 1]
    back = _warp(cv2, backward, fx, fy)  # b(x + f(x))
    sum_sq = ((forward + back) ** 2).sum(-1)
    norms = (forward**2).sum(-1) + (back**2).sum(-1)
    inside = (fx >= 0) & (fx <= w - 1) & (fy >= 0) & (fy <= h - 1)
    mask = (sum_sq <= CONSISTENCY_SCALE * norms + CONSISTENCY_OFFSET) & inside
    kept = mask.sum()
    errors = []
    for a, b in zip(images0, images1):
        diff = ((a - _warp(cv2, b, fx, fy)) ** 2).sum(-1)
        errors.append(float((diff * mask).sum() / (3 * kept)) if kept else 0.0)
    return errors, 1.0 - float(kept) / mask.size


def warping_error(original: str | Path, styled: str | Path) -> FlickerScore:
    """The flicker of ``styled`` (a restyled film) against the motion of ``original``, streamed.

    Both films are read frame by frame together; the original's frames are resized to the
    restyled film's size for the flow. Refused when their frame counts differ."""
    cv2 = _cv2()
    engine = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    frames = pairs = 0
    sums = [0.0, 0.0]
    masked = 0.0
    previous = None
    ends = object()
    originals, styleds = rgb_frames(original), rgb_frames(styled)
    while True:
        o, s = next(originals, ends), next(styleds, ends)
        if o is ends or s is ends:
            if o is not s:
                shorter = styled if s is ends else original
                raise VideoError(f"has fewer frames than the other film ({frames})", shorter)
            break
        frames += 1
        h, w = s.shape[:2]
        if o.shape[:2] != (h, w):
            o = cv2.resize(o, (w, h), interpolation=cv2.INTER_AREA)
        current = (cv2.cvtColor(o, cv2.COLOR_RGB2GRAY), s.astype(np.float32) / 255, o.astype(np.float32) / 255)
        if previous is not None:
            errors, share = pair_error(
                cv2, engine, previous[0], current[0], [previous[1], previous[2]], [current[1], current[2]]
            )
            sums = [a + b for a, b in zip(sums, errors)]
            masked += share
            pairs += 1
        previous = current
    if pairs == 0:
        raise VideoError("needs at least two frames to measure flicker", original)
    return FlickerScore(frames, pairs, sums[0] / pairs, sums[1] / pairs, masked / pairs)
