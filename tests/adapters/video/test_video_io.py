"""Video I/O on real files: PyAV and imageio-ffmpeg encoders, PyAV decoding, atomic writes, errors."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest
import torch

from dfm.adapters.video import io as video_io
from dfm.adapters.video.io import Mp4Writer, pad_to_even, read_video, to_uint8_frames
from dfm.ports.tracking import VideoWriter

av = pytest.importorskip("av")


def moving_square(frames: int, height: int, width: int) -> torch.Tensor:
    """uint8 [T, H, W, 3]: a grey background with an orange 8x8 square moving one pixel per frame."""
    video = torch.full((frames, height, width, 3), 60, dtype=torch.uint8)
    for t in range(frames):
        video[t, 4 + t : 12 + t, 3 + t : 11 + t] = torch.tensor([230, 120, 40], dtype=torch.uint8)
    return video


def mean_abs_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


def test_to_uint8_frames_maps_clamps_and_rounds() -> None:
    video = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0, 0.5]).reshape(1, 1, 6, 1).expand(1, 1, 6, 3)
    frames = to_uint8_frames(video)
    assert frames.dtype == torch.uint8
    assert frames[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255, 191]


def test_to_uint8_frames_accepts_channels_first() -> None:
    thwc = torch.rand(4, 5, 6, 3) * 2 - 1
    assert torch.equal(to_uint8_frames(thwc.permute(3, 0, 1, 2)), to_uint8_frames(thwc))
    assert to_uint8_frames(thwc).shape == (4, 5, 6, 3)


def test_to_uint8_frames_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="ambiguous"):
        to_uint8_frames(torch.zeros(3, 4, 4, 3))
    assert to_uint8_frames(torch.zeros(3, 4, 4, 3), layout="thwc").shape == (3, 4, 4, 3)
    with pytest.raises(ValueError, match="3 channels"):
        to_uint8_frames(torch.zeros(2, 4, 4, 4))
    with pytest.raises(ValueError, match=r"\[3, T, H, W\]"):
        to_uint8_frames(torch.zeros(4, 4, 3))


def test_mp4_writer_is_a_video_writer() -> None:
    assert isinstance(Mp4Writer(), VideoWriter)


@pytest.mark.parametrize("backend", ["av", "imageio"])
def test_round_trip_32x32(tmp_path: Path, backend: str) -> None:
    video = moving_square(12, 32, 32)
    path = Mp4Writer(crf=10, backend=backend).write(video, tmp_path / "sub" / "dir" / "square.mp4", fps=8)
    assert path == tmp_path / "sub" / "dir" / "square.mp4"
    frames, fps = read_video(path)
    assert frames.shape == (12, 32, 32, 3) and frames.dtype == torch.uint8
    assert fps == 8.0
    assert mean_abs_error(frames, video) < 8


@pytest.mark.parametrize("backend", ["av", "imageio"])
def test_odd_size_is_padded_to_even(tmp_path: Path, backend: str) -> None:
    video = moving_square(6, 33, 35)
    frames, _ = read_video(Mp4Writer(crf=10, backend=backend).write(video, tmp_path / "odd.mp4", fps=6))
    assert frames.shape == (6, 34, 36, 3)
    assert mean_abs_error(frames[:, :33, :35], video) < 8
    padded = torch.from_numpy(pad_to_even(video.numpy()))
    assert mean_abs_error(frames, padded) < 8


def test_pad_to_even_repeats_the_edge() -> None:
    video = torch.arange(3 * 3 * 3, dtype=torch.uint8).reshape(1, 3, 3, 3).numpy()
    padded = pad_to_even(video)
    assert padded.shape == (1, 4, 4, 3)
    assert (padded[:, 3, :3] == video[:, 2]).all() and (padded[:, :3, 3] == video[:, :, 2]).all()
    even = video[:, :2, :2]
    assert pad_to_even(even) is even


def test_fractional_fps_round_trips(tmp_path: Path) -> None:
    path = Mp4Writer().write(moving_square(4, 32, 32), tmp_path / "ntsc.mp4", fps=30000 / 1001)
    _, fps = read_video(path)
    assert Fraction(fps).limit_denominator(1001) == Fraction(30000, 1001)


def test_write_is_atomic_and_replaces(tmp_path: Path) -> None:
    writer = Mp4Writer()
    path = tmp_path / "video.mp4"
    writer.write(moving_square(3, 32, 32), path, fps=4)
    writer.write(moving_square(5, 32, 32), path, fps=4)
    assert [p.name for p in tmp_path.iterdir()] == ["video.mp4"]
    assert read_video(path)[0].shape[0] == 5


def test_failed_write_leaves_old_file_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = Mp4Writer().write(moving_square(3, 32, 32), tmp_path / "video.mp4", fps=4)
    before = path.read_bytes()

    def broken(av_module: object, frames: object, tmp: Path, rate: object, writer: object) -> None:
        tmp.write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(video_io, "_write_av", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        Mp4Writer().write(moving_square(3, 32, 32), path, fps=4)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["video.mp4"]


def test_imageio_fallback_when_pyav_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(video_io, "_import_av", lambda: None)
    video = moving_square(8, 32, 32)
    path = Mp4Writer(crf=10).write(video, tmp_path / "fallback.mp4", fps=8)
    frames, fps = read_video(path)
    assert frames.shape == (8, 32, 32, 3) and fps == 8.0
    assert mean_abs_error(frames, video) < 8
    monkeypatch.undo()
    assert torch.equal(read_video(path)[0], frames)


def test_no_backend_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(video_io, "_import_av", lambda: None)
    monkeypatch.setattr(video_io, "_import_imageio_ffmpeg", lambda: None)
    with pytest.raises(ImportError, match=r"dfm\[video\]"):
        Mp4Writer().write(moving_square(2, 32, 32), tmp_path / "x.mp4", fps=4)
    with pytest.raises(ImportError, match="needs av"):
        Mp4Writer(backend="av").write(moving_square(2, 32, 32), tmp_path / "x.mp4", fps=4)
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="to_uint8_frames"):
        Mp4Writer().write(torch.zeros(2, 32, 32, 3), tmp_path / "x.mp4", fps=4)
    with pytest.raises(ValueError, match="non-empty"):
        Mp4Writer().write(torch.zeros(0, 32, 32, 3, dtype=torch.uint8), tmp_path / "x.mp4", fps=4)
    with pytest.raises(ValueError, match="fps"):
        Mp4Writer().write(moving_square(2, 32, 32), tmp_path / "x.mp4", fps=0)
    with pytest.raises(ValueError):
        Mp4Writer(crf=-1)


@pytest.mark.parametrize("corrupt", [b"", b"not a video at all" * 50, "half"])
def test_unreadable_file_is_a_value_error_naming_it(tmp_path: Path, corrupt: bytes | str) -> None:
    path = tmp_path / "broken clip.mp4"
    if corrupt == "half":
        good = Mp4Writer().write(moving_square(12, 32, 32), tmp_path / "good.mp4", fps=8).read_bytes()
        corrupt = good[: len(good) // 2]
    path.write_bytes(corrupt)
    with pytest.raises(ValueError, match=r"broken clip\.mp4"):
        read_video(path)


def test_unreadable_file_with_imageio_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(video_io, "_import_av", lambda: None)
    path = tmp_path / "junk.mp4"
    path.write_bytes(b"junk" * 100)
    with pytest.raises(ValueError, match=r"junk\.mp4"):
        read_video(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.mp4"):
        read_video(tmp_path / "nope.mp4")


def _write_with_pyav(path: Path, video: torch.Tensor, codec: str, container_format: str) -> None:
    with av.open(str(path), mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = video.shape[2], video.shape[1], "yuv420p"
        stream.options = {"crf": "10"}
        for frame in video.numpy():
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.mark.parametrize(
    ("suffix", "codec", "container_format"), [("webm", "libvpx-vp9", "webm"), ("mov", "libx264", "mov")]
)
def test_reads_other_containers(tmp_path: Path, suffix: str, codec: str, container_format: str) -> None:
    if codec not in av.codecs_available:
        pytest.skip(f"this ffmpeg build has no {codec} encoder")
    video = moving_square(6, 32, 32)
    path = tmp_path / f"clip.{suffix}"
    _write_with_pyav(path, video, codec, container_format)
    frames, fps = read_video(path)
    assert frames.shape == (6, 32, 32, 3) and fps == 10.0
    assert mean_abs_error(frames, video) < 8
