"""Contact sheets: a PNG that shows a few frames of each generated video at a glance.

Layout: one row per video, ``min(T, max_frames)`` evenly spaced frames from left to right (first and
last frame included), every frame upscaled by an integer factor with nearest-neighbour (tiny videos
stay crisp and visible), cells separated by ``gap`` pixels of ``background``. With ``captions``, each
row gets a text band above its frames (drawn with Pillow's default font when Pillow is installed;
without Pillow the captions are skipped with a warning).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import structlog
import torch

from dfm.adapters.video.io import atomic_path

MIN_SIDE = 96
"""With ``scale=None`` frames are upscaled until their shorter side is at least this many pixels."""

_log = structlog.get_logger(__name__)


def frame_indices(num_frames: int, max_frames: int) -> list[int]:
    """Evenly spaced frame indices: ``min(num_frames, max_frames)`` of them, first and last included.

    Args:
        num_frames: Frames in the video (positive).
        max_frames: Most frames to pick (positive).

    Returns:
        Strictly increasing indices in ``[0, num_frames)``; index ``i`` of ``n`` is ``round(i (T-1) / (n-1))``.
    """
    n = min(num_frames, max_frames)
    if n == 1:
        return [0]
    return [(2 * i * (num_frames - 1) + (n - 1)) // (2 * (n - 1)) for i in range(n)]


def _check_videos(videos: Sequence[torch.Tensor], captions: Sequence[str] | None, max_frames: int) -> None:
    if not videos:
        raise ValueError("contact_sheet needs at least one video")
    if max_frames < 1:
        raise ValueError(f"max_frames must be at least 1, got {max_frames}")
    for i, video in enumerate(videos):
        if video.dtype != torch.uint8 or video.ndim != 4 or video.shape[-1] != 3 or 0 in video.shape:
            raise ValueError(
                f"video {i} must be a non-empty uint8 tensor [T, H, W, 3] (see to_uint8_frames), "
                f"got {video.dtype} {tuple(video.shape)}"
            )
    if captions is not None and len(captions) != len(videos):
        raise ValueError(f"got {len(captions)} captions for {len(videos)} videos")


def _auto_scale(max_h: int, max_w: int) -> int:
    return max(1, math.ceil(MIN_SIDE / min(max_h, max_w)))


def _pil_available() -> bool:
    """Whether Pillow is installed (tests replace this to exercise the no-Pillow path)."""
    return importlib.util.find_spec("PIL") is not None


def _caption_mask(text: str, width: int) -> np.ndarray:
    """A ``[h, width]`` bool mask of ``text`` drawn in Pillow's default font, 2 px from the left."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    height = int(font.getbbox("Ag")[3]) + 4
    image = Image.new("L", (width, height), 0)
    try:
        ImageDraw.Draw(image).text((2, 1), text, fill=255, font=font)
    except UnicodeEncodeError:  # Pillow's bitmap fallback font (no FreeType) draws latin-1 only
        ImageDraw.Draw(image).text((2, 1), text.encode("latin-1", "replace").decode("latin-1"), fill=255, font=font)
    return np.asarray(image) > 127


def _upscale(frame: np.ndarray, scale: int) -> np.ndarray:
    return frame.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else frame


def _paste_row(
    sheet: np.ndarray, video: np.ndarray, top: int, cell: tuple[int, int], scale: int, gap: int, max_frames: int
) -> None:
    for column, index in enumerate(frame_indices(video.shape[0], max_frames)):
        frame = _upscale(video[index], scale)
        left = column * (cell[1] + gap)
        sheet[top : top + frame.shape[0], left : left + frame.shape[1]] = frame


def _paste_caption(sheet: np.ndarray, text: str, top: int, background: int) -> None:
    mask = _caption_mask(text, sheet.shape[1])
    sheet[top : top + mask.shape[0]][mask] = 255 if background < 128 else 0


def contact_sheet(
    videos: Sequence[torch.Tensor],
    *,
    max_frames: int = 8,
    captions: Sequence[str] | None = None,
    scale: int | None = None,
    gap: int = 4,
    background: int = 0,
) -> torch.Tensor:
    """Lays out a few frames of each video in a grid image, one row per video.

    Cells have the size of the largest frame times ``scale``; smaller frames sit at a cell's top left.
    Row ``r`` starts at ``y = r * (band + cell_h + gap)`` (``band`` = caption height, 0 without
    captions) and its frames at ``y + band``; column ``c`` starts at ``x = c * (cell_w + gap)``.

    Args:
        videos: uint8 ``[T, H, W, 3]`` videos (sizes and lengths may differ).
        max_frames: Most frames per row; fewer when a video is shorter.
        captions: One text per video, drawn above its row (needs Pillow; skipped with a warning without).
        scale: Integer nearest-neighbour upscale factor; ``None`` picks the smallest one that makes the
            shorter side of the largest frame at least :data:`MIN_SIDE` pixels (1 for large frames).
        gap: Pixels between cells and between rows.
        background: Grey level (0-255) of gaps and empty cells.

    Returns:
        The sheet, uint8 ``[H', W', 3]``.

    Raises:
        ValueError: For no videos, a video that is not uint8 ``[T, H, W, 3]``, a caption count that is not
            the video count, or a non-positive ``scale``/``max_frames``.
    """
    _check_videos(videos, captions, max_frames)
    max_h = max(int(v.shape[1]) for v in videos)
    max_w = max(int(v.shape[2]) for v in videos)
    scale = _auto_scale(max_h, max_w) if scale is None else scale
    if scale < 1 or gap < 0 or not 0 <= background <= 255:
        raise ValueError(f"need scale >= 1, gap >= 0 and 0 <= background <= 255, got {scale}, {gap}, {background}")
    if captions is not None and not _pil_available():
        _log.warning("contact_sheet_captions_skipped", reason="Pillow is not installed")
        captions = None
    cell = (max_h * scale, max_w * scale)
    columns = max(min(int(v.shape[0]), max_frames) for v in videos)
    band_h = _caption_mask("", 1).shape[0] if captions is not None else 0
    row_h = band_h + cell[0]
    sheet = np.full((len(videos) * (row_h + gap) - gap, columns * (cell[1] + gap) - gap, 3), background, np.uint8)
    for row, video in enumerate(videos):
        top = row * (row_h + gap)
        if captions is not None:
            _paste_caption(sheet, captions[row], top, background)
        _paste_row(sheet, video.cpu().numpy(), top + band_h, cell, scale, gap, max_frames)
    return torch.from_numpy(sheet)


def save_png(image: torch.Tensor, path: Path | str) -> Path:
    """Writes a uint8 ``[H, W, 3]`` image as PNG, atomically (temporary file beside it, then rename).

    Args:
        image: uint8 ``[H, W, 3]`` RGB (or ``[H, W]`` grey) image.
        path: The file to write; parent directories are created.

    Returns:
        ``path``.

    Raises:
        ValueError: For an image that is not uint8 ``[H, W, 3]`` or ``[H, W]``.
        ImportError: When imageio (the ``video`` extra) is not installed.
    """
    if image.dtype != torch.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] != 3):
        raise ValueError(f"image must be a uint8 tensor [H, W, 3] or [H, W], got {image.dtype} {tuple(image.shape)}")
    try:
        import imageio.v3 as iio
    except ImportError as err:
        raise ImportError("save_png needs imageio: pip install 'dfm[video]'") from err
    path = Path(path)
    with atomic_path(path) as tmp:
        iio.imwrite(tmp, image.cpu().contiguous().numpy(), extension=".png")
    return path
