"""Training clips from video and image files: decode, resample in time, cut to ``4n + 1`` frames, resize.

:func:`load_clip` turns one file into a :class:`Clip` ready for a VAE:

1. Decode the first video stream with PyAV (mp4, webm, mov, mkv, ... and still images: png, jpg, webp,
   bmp). An image is a clip of one frame.
2. Resample to ``ClipOptions.fps`` by timestamps: output frame ``k`` shows the source frame on screen at
   ``t0 + k / fps`` (the last one whose timestamp is not after it), so a 30 fps source at 15 fps keeps
   every other frame and a 10 fps source at 20 fps repeats each one. ``fps=None`` keeps the source rate.
3. Keep the first ``4n + 1`` frames (the WAN VAE compresses time 4x after the first frame):
   exactly ``ClipOptions.frames`` when given (a shorter clip is an error), otherwise the largest
   ``4n + 1`` that the clip holds, capped at ``ClipOptions.max_frames``.
4. Resize to the aspect-ratio bucket nearest to the source (by ``|log(w/h) - log(bw/bh)|``): ``crop``
   scales the frame to cover the bucket and cuts the centre; ``pad`` scales it to fit inside and pads
   the borders with black. Resizing is bilinear with antialiasing.

Decoding stops as soon as enough frames were read, so a long video costs no more than its first seconds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Literal

import attrs
import numpy as np
import torch
import torch.nn.functional as F
from attrs import validators as v

ResizeMode = Literal["crop", "pad"]

VIDEO_SUFFIXES: tuple[str, ...] = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v")
"""File suffixes taken as videos (lower case)."""
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
"""File suffixes taken as still images, i.e. clips of one frame (lower case)."""

BUCKET_PRESETS: dict[str, tuple[tuple[int, int], ...]] = {
    "480p": ((480, 832), (832, 480), (512, 768), (768, 512), (544, 720), (720, 544), (624, 624)),
    "720p": ((720, 1280), (1280, 720), (768, 1152), (1152, 768), (832, 1104), (1104, 832), (960, 960)),
}
"""``(height, width)`` buckets, multiples of 16 with about the area of 480x832 (``480p``) or 720x1280
(``720p``), at the aspect ratios 16:9-ish, 3:2, 4:3, 1:1 and their portrait versions."""


class ClipError(ValueError):
    """A file that cannot become a clip (unreadable, corrupt, no video stream, too short).

    Attributes:
        path: The file.
        reason: Why, in a few words (without the path).
        kind: ``"unreadable"`` (missing, corrupt, no video stream or frames) or ``"too_short"``.
    """

    def __init__(self, path: Path | str, reason: str, kind: str = "unreadable") -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason
        self.kind = kind


def is_media_file(path: Path) -> bool:
    """Whether ``path`` has a video or image suffix (:data:`VIDEO_SUFFIXES`, :data:`IMAGE_SUFFIXES`)."""
    return path.suffix.lower() in VIDEO_SUFFIXES + IMAGE_SUFFIXES


def _check_buckets(_inst: object, _attr: attrs.Attribute, buckets: tuple[tuple[int, int], ...]) -> None:
    if not buckets:
        raise ValueError("at least one (height, width) bucket is needed")
    for bucket in buckets:
        if len(bucket) != 2 or min(bucket) < 1:
            raise ValueError(f"a bucket is a positive (height, width), got {bucket!r}")


def _check_frames(_inst: object, _attr: attrs.Attribute, frames: int | None) -> None:
    if frames is not None and (frames < 1 or frames % 4 != 1):
        raise ValueError(f"frames must be 4n + 1 (1, 5, 9, ..., 81), got {frames}")


def _buckets(value: Sequence[Sequence[int]]) -> tuple[tuple[int, int], ...]:
    return tuple((int(b[0]), int(b[1])) for b in value)


@attrs.frozen(kw_only=True)
class ClipOptions:
    """How files become clips (see the module docstring)."""

    buckets: tuple[tuple[int, int], ...] = attrs.field(converter=_buckets, validator=_check_buckets)
    """``(height, width)`` targets; each clip goes to the one nearest its aspect ratio."""
    frames: int | None = attrs.field(default=None, validator=_check_frames)
    """Exact frame count ``4n + 1``; ``None``: the largest ``4n + 1`` the clip holds, up to ``max_frames``."""
    max_frames: int = attrs.field(default=81, validator=_check_frames)
    """Cap on the frame count when ``frames`` is ``None`` (a ``4n + 1``)."""
    fps: float | None = attrs.field(default=16.0, validator=v.optional(v.gt(0.0)))
    """Target frame rate; ``None`` keeps each source's rate."""
    resize: ResizeMode = attrs.field(default="crop", validator=v.in_(("crop", "pad")))
    """``crop`` (cover the bucket, cut the centre) or ``pad`` (fit inside, black borders)."""

    @property
    def frame_limit(self) -> int:
        """Most frames a clip may have."""
        return self.frames if self.frames is not None else self.max_frames


@attrs.frozen(kw_only=True, eq=False)
class Clip:
    """One clip ready for a VAE."""

    pixels: torch.Tensor
    """``[3, T, H, W]`` float32 in ``[-1, 1]``, ``T = 4n + 1``, ``(H, W)`` a bucket."""
    fps: float
    """Frame rate of ``pixels`` (the target rate, or the source's when none was asked for)."""
    source: str
    """The file it came from."""

    @property
    def frames(self) -> int:
        """``T``."""
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        """``H``."""
        return int(self.pixels.shape[2])

    @property
    def width(self) -> int:
        """``W``."""
        return int(self.pixels.shape[3])


def nearest_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest to ``width / height`` in log space (first one on ties)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[1] / b[0]) - ratio))


def clip_length(available: int, frames: int | None, max_frames: int) -> int | None:
    """Frames to keep: ``frames`` if that many are available (else ``None``), or the largest ``4n + 1``
    not above ``available`` and ``max_frames``."""
    if frames is not None:
        return frames if available >= frames else None
    limit = min(available, max_frames)
    return (limit - 1) // 4 * 4 + 1 if limit >= 1 else None


def resample_indices(times: Sequence[float], source_fps: float, fps: float | None, limit: int) -> list[int]:
    """Source frame shown at each output time ``t0 + k / fps``, ``k = 0, 1, ...`` (at most ``limit``).

    Args:
        times: Presentation times of the decoded frames in seconds, ascending.
        source_fps: The source rate; the last frame stays on screen for ``1 / source_fps``.
        fps: Target rate; ``None`` keeps every source frame.
        limit: Most output frames.

    Returns:
        Indices into ``times``, non-decreasing (repeated when the target rate is higher).
    """
    if not times:
        return []
    if fps is None:
        return list(range(min(len(times), limit)))
    t = np.asarray(times, dtype=np.float64) - times[0]
    end = t[-1] + (1.0 / source_fps if source_fps > 0 else 0.0)
    count = max(1, min(limit, math.ceil(end * fps - 1e-6)))
    targets = np.arange(count, dtype=np.float64) / fps
    indices = np.searchsorted(t, targets + 1e-6, side="right") - 1
    return np.clip(indices, 0, len(t) - 1).tolist()


def fit_to_bucket(pixels: torch.Tensor, bucket: tuple[int, int], mode: ResizeMode) -> torch.Tensor:
    """Resize ``[3, T, H, W]`` pixels in ``[-1, 1]`` to ``bucket`` by ``crop`` or ``pad`` (see the module docstring)."""
    height, width = pixels.shape[-2:]
    target_h, target_w = bucket
    if (height, width) == (target_h, target_w):
        return pixels
    grow = max if mode == "crop" else min
    scale = grow(target_h / height, target_w / width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    if mode == "crop":
        new_h, new_w = max(new_h, target_h), max(new_w, target_w)
    else:
        new_h, new_w = min(new_h, target_h), min(new_w, target_w)
    frames = pixels.permute(1, 0, 2, 3)  # [T, 3, H, W]
    if (new_h, new_w) != (height, width):
        frames = F.interpolate(frames, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
        frames = frames.clamp(-1.0, 1.0)
    if mode == "crop":
        top, left = (new_h - target_h) // 2, (new_w - target_w) // 2
        frames = frames[:, :, top : top + target_h, left : left + target_w]
    else:
        top, left = (target_h - new_h) // 2, (target_w - new_w) // 2
        pad = (left, target_w - new_w - left, top, target_h - new_h - top)
        frames = F.pad(frames, pad, value=-1.0)
    return frames.permute(1, 0, 2, 3).contiguous()


def _decode(path: Path, seconds: float | None, limit: int) -> tuple[list[np.ndarray], list[float], float]:
    """RGB frames, their times (s) and the stream rate; stops after ``seconds`` of video (or ``limit`` frames)."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ClipError(path, "no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            source_fps = float(rate) if rate else 0.0
            frames: list[np.ndarray] = []
            times: list[float] = []
            for frame in container.decode(stream):
                time = _frame_time(frame, stream.time_base, len(frames), source_fps)
                frames.append(frame.to_ndarray(format="rgb24"))
                times.append(time)
                if (seconds is None and len(frames) >= limit) or (seconds is not None and time - times[0] >= seconds):
                    break
    except ClipError:
        raise
    except (av.FFmpegError, ValueError, RuntimeError, OSError, EOFError) as err:
        raise ClipError(path, f"cannot decode ({type(err).__name__}: {err})") from err
    if not frames:
        raise ClipError(path, "no frames could be decoded")
    return frames, times, source_fps


def _frame_time(frame: object, time_base: Fraction | None, index: int, source_fps: float) -> float:
    pts = getattr(frame, "pts", None)
    if pts is not None and time_base is not None:
        return float(pts * time_base)
    return index / source_fps if source_fps > 0 else float(index)


def load_clip(path: Path | str, options: ClipOptions) -> Clip:
    """Decode ``path`` into a :class:`Clip` following ``options`` (see the module docstring).

    Raises:
        ClipError: The file is missing, unreadable or corrupt, has no video stream or no frames, or is
            shorter than ``options.frames`` at ``options.fps``.
    """
    path = Path(path)
    if not path.is_file():
        raise ClipError(path, "file not found")
    image = path.suffix.lower() in IMAGE_SUFFIXES
    limit = 1 if image else options.frame_limit
    seconds = None if options.fps is None or image else limit / options.fps
    frames, times, source_fps = _decode(path, seconds, limit)
    if image:
        frames, times = frames[:1], times[:1]
    indices = resample_indices(times, source_fps, None if image else options.fps, limit)
    count = clip_length(len(indices), options.frames if not image else None, options.max_frames)
    if count is None:
        rate = options.fps if options.fps is not None else source_fps
        raise ClipError(path, f"too short: {len(indices)} frames at {rate:g} fps, {options.frames} needed", "too_short")
    video = torch.from_numpy(np.stack([frames[i] for i in indices[:count]]))  # [T, H, W, 3] uint8
    pixels = video.permute(3, 0, 1, 2).float().div(127.5).sub(1.0)  # [3, T, H, W]
    bucket = nearest_bucket(pixels.shape[2], pixels.shape[3], options.buckets)
    fps = source_fps if image or options.fps is None else options.fps
    return Clip(pixels=fit_to_bucket(pixels, bucket, options.resize), fps=float(fps), source=str(path))
