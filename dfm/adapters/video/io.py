"""Video files: tensors in ``[-1, 1]`` to uint8 frames, an H.264 MP4 writer and a reader.

Writing uses PyAV (the optional extra ``video``); when PyAV is not importable it falls back to
imageio-ffmpeg (the ffmpeg binary it ships). Reading uses PyAV, with the same fallback, and understands
every container ffmpeg does (mp4, webm, mov, mkv, ...).

Frames cross these functions as ``[T, H, W, 3]`` uint8 tensors, RGB.

Odd sizes: H.264 with 4:2:0 chroma (``yuv420p``) needs an even width and height. :class:`Mp4Writer`
pads an odd height or width by one row/column that repeats the last one (edge padding), so a 33x35
video is stored, and read back, as 34x36. The original pixels are unchanged at the top left.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from types import ModuleType
from typing import Literal

import attrs
import numpy as np
import torch

Layout = Literal["auto", "cthw", "thwc"]
Backend = Literal["auto", "av", "imageio"]

_MISSING_BACKEND = (
    "writing or reading videos needs PyAV or imageio-ffmpeg, and neither is installed; "
    "install the video extra: pip install 'dfm[video]'"
)


def _import_av() -> ModuleType | None:
    """PyAV, or ``None`` when it is not installed (tests replace this to exercise the fallback)."""
    try:
        import av
    except ImportError:
        return None
    return av


def _import_imageio_ffmpeg() -> ModuleType | None:
    """imageio-ffmpeg, or ``None`` when it is not installed."""
    try:
        import imageio_ffmpeg
    except ImportError:
        return None
    return imageio_ffmpeg


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; on success moves it onto ``path`` with ``os.replace``.

    The temporary file lives in the same directory (so the rename is atomic) and keeps the suffix of
    ``path`` (tools that pick a format from the extension still see it). Parent directories are
    created. On any error the temporary file is removed and ``path`` is left as it was.

    Args:
        path: The final file.

    Yields:
        The temporary path to write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _to_thwc(video: torch.Tensor, layout: Layout) -> torch.Tensor:
    if video.ndim != 4:
        raise ValueError(
            f"a video must have 4 dimensions ([3, T, H, W] or [T, H, W, 3]), got shape {tuple(video.shape)}"
        )
    if layout == "auto":
        channels_first, channels_last = video.shape[0] == 3, video.shape[-1] == 3
        if channels_first and channels_last:
            raise ValueError(f"video shape {tuple(video.shape)} is ambiguous; pass layout='cthw' or layout='thwc'")
        if not (channels_first or channels_last):
            raise ValueError(f"a video needs 3 channels first or last, got shape {tuple(video.shape)}")
        layout = "cthw" if channels_first else "thwc"
    if layout == "cthw":
        video = video.permute(1, 2, 3, 0)
    if video.shape[-1] != 3:
        raise ValueError(f"expected 3 channels in layout {layout!r}, got shape {tuple(video.shape)}")
    return video


def to_uint8_frames(video: torch.Tensor, *, layout: Layout = "auto") -> torch.Tensor:
    """Maps a video in ``[-1, 1]`` to uint8 frames ``[T, H, W, 3]``.

    Values are clamped to ``[-1, 1]``, mapped to ``[0, 255]`` by ``(x + 1) / 2 * 255`` and rounded to
    the nearest integer. A uint8 input is taken as frames already and only laid out.

    Args:
        video: ``[3, T, H, W]`` or ``[T, H, W, 3]``, floating point in ``[-1, 1]`` (or uint8).
        layout: ``"cthw"``, ``"thwc"`` or ``"auto"`` (the axis of size 3; an error when both are 3).

    Returns:
        A contiguous CPU uint8 tensor ``[T, H, W, 3]``.

    Raises:
        ValueError: For a shape that is not a video with 3 channels, or an ambiguous shape.
    """
    frames = _to_thwc(video.detach(), layout)
    if frames.dtype == torch.uint8:
        return frames.cpu().contiguous()
    if not frames.is_floating_point():
        raise ValueError(f"expected a floating point video in [-1, 1] or uint8 frames, got dtype {frames.dtype}")
    frames = frames.float().clamp(-1.0, 1.0).add(1.0).mul(127.5).round()
    return frames.to(torch.uint8).cpu().contiguous()


def _check_frames(frames: torch.Tensor) -> np.ndarray:
    if not isinstance(frames, torch.Tensor) or frames.dtype != torch.uint8:
        raise ValueError(f"frames must be a uint8 tensor [T, H, W, 3]; use to_uint8_frames first (got {frames!r:.80})")
    if frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise ValueError(f"frames must be a non-empty uint8 tensor [T, H, W, 3], got shape {tuple(frames.shape)}")
    return frames.cpu().contiguous().numpy()


def pad_to_even(frames: np.ndarray) -> np.ndarray:
    """Pads ``[T, H, W, 3]`` frames to an even height and width by repeating the last row/column."""
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if not (pad_h or pad_w):
        return frames
    return np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")


def _frame_rate(fps: float) -> Fraction:
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    return Fraction(fps).limit_denominator(1001)


def _write_av(av: ModuleType, frames: np.ndarray, path: Path, rate: Fraction, writer: Mp4Writer) -> None:
    with av.open(str(path), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream(writer.codec, rate=rate)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = writer.pixel_format
        stream.options = {"crf": str(writer.crf)}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_imageio(ffmpeg: ModuleType, frames: np.ndarray, path: Path, rate: Fraction, writer: Mp4Writer) -> None:
    gen = ffmpeg.write_frames(
        str(path),
        (frames.shape[2], frames.shape[1]),
        fps=float(rate),
        codec=writer.codec,
        pix_fmt_out=writer.pixel_format,
        quality=None,
        macro_block_size=1,
        output_params=["-crf", str(writer.crf), "-movflags", "+faststart", "-f", "mp4"],
    )
    try:
        gen.send(None)
        for frame in frames:
            gen.send(np.ascontiguousarray(frame))
    finally:
        gen.close()  # flushes and waits for ffmpeg (or stops it after an error)


@attrs.frozen(kw_only=True)
class Mp4Writer:
    """Writes ``[T, H, W, 3]`` uint8 frames to an MP4 file (implements the ``VideoWriter`` port).

    The file appears atomically: frames go to a temporary file in the target directory, which is
    then renamed onto ``path``. Parent directories are created. Odd heights/widths are padded to even
    ones (see the module docstring).
    """

    codec: str = "libx264"
    """ffmpeg encoder name."""
    crf: int = attrs.field(default=18, validator=attrs.validators.and_(attrs.validators.ge(0), attrs.validators.le(63)))
    """Constant rate factor: 0 is (near) lossless, 18 visually lossless, 23 the x264 default."""
    pixel_format: str = "yuv420p"
    """Pixel format of the encoded stream; ``yuv420p`` plays everywhere."""
    backend: Backend = attrs.field(default="auto", validator=attrs.validators.in_(("auto", "av", "imageio")))
    """``"av"`` (PyAV), ``"imageio"`` (imageio-ffmpeg) or ``"auto"``: PyAV when installed, else imageio-ffmpeg."""

    def write(self, frames: torch.Tensor, path: Path, fps: float) -> Path:
        """Encodes ``frames`` into ``path``.

        Args:
            frames: uint8 ``[T, H, W, 3]`` RGB frames.
            path: The MP4 file to write (replaced if it exists).
            fps: Frames per second (positive; non-integer rates such as 29.97 are kept as a fraction).

        Returns:
            ``path``.

        Raises:
            ValueError: For frames that are not uint8 ``[T, H, W, 3]`` or a non-positive fps.
            ImportError: When neither PyAV nor imageio-ffmpeg is installed (or the chosen one is not).
        """
        array = pad_to_even(_check_frames(frames))
        rate = _frame_rate(fps)
        path = Path(path)
        av, ffmpeg = self._backends()
        with atomic_path(path) as tmp:
            if av is not None:
                _write_av(av, array, tmp, rate, self)
            else:
                _write_imageio(ffmpeg, array, tmp, rate, self)
        return path

    def _backends(self) -> tuple[ModuleType | None, ModuleType | None]:
        av = _import_av() if self.backend in ("auto", "av") else None
        if av is not None:
            return av, None
        ffmpeg = _import_imageio_ffmpeg() if self.backend in ("auto", "imageio") else None
        if ffmpeg is not None:
            return None, ffmpeg
        if self.backend == "auto":
            raise ImportError(_MISSING_BACKEND)
        package = "av" if self.backend == "av" else "imageio-ffmpeg"
        raise ImportError(f"Mp4Writer(backend={self.backend!r}) needs {package}: pip install 'dfm[video]'")


def _read_av(av: ModuleType, path: Path) -> tuple[list[np.ndarray], float]:
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("the file holds no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    return frames, float(rate) if rate else 0.0


def _read_imageio(ffmpeg: ModuleType, path: Path) -> tuple[list[np.ndarray], float]:
    gen = ffmpeg.read_frames(str(path))
    meta = next(gen)
    width, height = meta["size"]
    frames = [np.frombuffer(buf, dtype=np.uint8).reshape(height, width, 3) for buf in gen]
    return frames, float(meta.get("fps") or 0.0)


def read_video(path: Path | str) -> tuple[torch.Tensor, float]:
    """Decodes the first video stream of a file (mp4, webm, mov, mkv, ... anything ffmpeg reads).

    Args:
        path: The video file.

    Returns:
        ``(frames, fps)``: uint8 RGB frames ``[T, H, W, 3]`` and the stream's average frame rate.

    Raises:
        FileNotFoundError: When ``path`` does not exist.
        ValueError: When the file is not a readable video (corrupt, truncated, no video stream, no frames).
        ImportError: When neither PyAV nor imageio-ffmpeg is installed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video file not found: {path}")
    av = _import_av()
    ffmpeg = None if av is not None else _import_imageio_ffmpeg()
    if av is None and ffmpeg is None:
        raise ImportError(_MISSING_BACKEND)
    errors: tuple[type[BaseException], ...] = (ValueError, RuntimeError, OSError, StopIteration)
    if av is not None:
        errors += (av.FFmpegError,)
    try:
        frames, fps = _read_av(av, path) if av is not None else _read_imageio(ffmpeg, path)
    except errors as err:  # corrupt or truncated data, not a video: name the file
        raise ValueError(f"cannot read video {path}: {err}") from err
    if not frames:
        raise ValueError(f"cannot read video {path}: no frames decoded")
    return torch.from_numpy(np.stack(frames)), fps
