"""Training clips from real files: fps resampling by timestamps, 4n+1 frames, buckets, crop/pad, images, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dfm.adapters.video import BUCKET_PRESETS, ClipError, ClipOptions, Mp4Writer, load_clip, nearest_bucket, save_png
from dfm.adapters.video.clips import clip_length, fit_to_bucket, resample_indices

pytest.importorskip("av")


def counter_video(frames: int, height: int = 32, width: int = 48) -> torch.Tensor:
    """uint8 [T, H, W, 3] whose frame t is a flat grey of level 8 t (frame numbers survive encoding)."""
    levels = (torch.arange(frames) * 8).clamp(max=255).to(torch.uint8)
    return levels[:, None, None, None].expand(frames, height, width, 3).contiguous()


def frame_numbers(pixels: torch.Tensor) -> list[int]:
    """Recover t from a clip [3, T, H, W] in [-1, 1] made of counter_video frames."""
    levels = (pixels.mean(dim=(0, 2, 3)) + 1) * 127.5
    return [round(level / 8) for level in levels.tolist()]


@pytest.fixture(scope="module")
def video_30fps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("clips") / "count.mp4"
    return Mp4Writer(crf=0).write(counter_video(24), path, fps=30)


def test_resample_indices_by_timestamps() -> None:
    times_30 = [i / 30 for i in range(12)]
    assert resample_indices(times_30, 30, 15, 100) == [0, 2, 4, 6, 8, 10]
    times_10 = [i / 10 for i in range(3)]
    assert resample_indices(times_10, 10, 20, 100) == [0, 0, 1, 1, 2, 2]
    assert resample_indices(times_30, 30, None, 5) == [0, 1, 2, 3, 4]
    assert resample_indices(times_30, 30, 15, 4) == [0, 2, 4, 6]
    assert resample_indices([], 30, 15, 10) == []


def test_clip_length_is_4n_plus_1() -> None:
    assert [clip_length(n, None, 81) for n in (1, 4, 5, 8, 9, 100)] == [1, 1, 5, 5, 9, 81]
    assert clip_length(12, 9, 81) == 9 and clip_length(8, 9, 81) is None
    with pytest.raises(ValueError, match="4n"):
        ClipOptions(buckets=((32, 32),), frames=8)


def test_buckets_are_multiples_of_16_and_the_nearest_aspect_wins() -> None:
    for buckets in BUCKET_PRESETS.values():
        assert all(h % 16 == 0 and w % 16 == 0 for h, w in buckets)
    assert BUCKET_PRESETS["480p"][0] == (480, 832) and BUCKET_PRESETS["720p"][0] == (720, 1280)
    assert nearest_bucket(1080, 1920, BUCKET_PRESETS["480p"]) == (480, 832)
    assert nearest_bucket(1920, 1080, BUCKET_PRESETS["480p"]) == (832, 480)
    assert nearest_bucket(500, 500, BUCKET_PRESETS["720p"]) == (960, 960)
    assert nearest_bucket(600, 800, BUCKET_PRESETS["480p"]) == (544, 720)


def test_crop_covers_and_pad_fits_with_black_borders() -> None:
    pixels = torch.ones(3, 2, 20, 40)  # white, 2:1
    cropped = fit_to_bucket(pixels, (16, 16), "crop")
    assert cropped.shape == (3, 2, 16, 16) and torch.allclose(cropped, torch.ones_like(cropped))
    padded = fit_to_bucket(pixels, (16, 16), "pad")
    assert padded.shape == (3, 2, 16, 16)
    assert torch.allclose(padded[:, :, 8], torch.ones(3, 2, 16))  # middle row: the image
    assert torch.equal(padded[:, :, 0], torch.full((3, 2, 16), -1.0))  # top row: black padding
    assert fit_to_bucket(pixels, (20, 40), "crop") is pixels


def test_load_clip_resamples_to_the_target_fps(video_30fps: Path) -> None:
    clip = load_clip(video_30fps, ClipOptions(buckets=((32, 48),), fps=15))
    assert clip.pixels.shape == (3, 9, 32, 48) and clip.fps == 15.0  # 24 frames at 30 fps = 12 at 15 -> 9
    assert frame_numbers(clip.pixels) == [0, 2, 4, 6, 8, 10, 12, 14, 16]
    assert clip.pixels.min() >= -1 and clip.pixels.max() <= 1


def test_load_clip_keeps_the_source_rate_and_caps_frames(video_30fps: Path) -> None:
    clip = load_clip(video_30fps, ClipOptions(buckets=((32, 48),), fps=None, max_frames=13))
    assert frame_numbers(clip.pixels) == list(range(13)) and clip.fps == pytest.approx(30.0)
    exact = load_clip(video_30fps, ClipOptions(buckets=((32, 48),), fps=30, frames=5))
    assert exact.frames == 5


def test_load_clip_resizes_to_the_nearest_bucket(video_30fps: Path) -> None:
    options = ClipOptions(buckets=((16, 16), (16, 32), (32, 16)), fps=30, frames=1, resize="pad")
    clip = load_clip(video_30fps, options)  # 32x48 (3:2) -> 16x32 (2:1) is nearest
    assert (clip.height, clip.width) == (16, 32)


def test_a_too_short_video_is_a_clip_error(video_30fps: Path) -> None:
    with pytest.raises(ClipError, match="too short") as info:
        load_clip(video_30fps, ClipOptions(buckets=((32, 48),), fps=15, frames=13))
    assert info.value.kind == "too_short" and info.value.path == str(video_30fps)


def test_an_image_is_a_one_frame_clip(tmp_path: Path) -> None:
    image = torch.zeros(40, 40, 3, dtype=torch.uint8)
    image[:, :, 0] = 255
    path = save_png(image, tmp_path / "red.png")
    clip = load_clip(path, ClipOptions(buckets=((32, 32), (32, 64)), fps=16))
    assert clip.pixels.shape == (3, 1, 32, 32)
    assert torch.allclose(clip.pixels[:, 0, 16, 16], torch.tensor([1.0, -1.0, -1.0]))


@pytest.mark.parametrize("content", [b"", b"not a video at all" * 100, b"\x00\x00\x00\x18ftypmp42" + bytes(300)])
def test_corrupt_files_are_clip_errors(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.mp4"
    path.write_bytes(content)
    with pytest.raises(ClipError) as info:
        load_clip(path, ClipOptions(buckets=((32, 32),)))
    assert info.value.kind == "unreadable" and str(path) in str(info.value)


def test_a_truncated_video_is_a_clip_error_or_a_shorter_clip(video_30fps: Path, tmp_path: Path) -> None:
    path = tmp_path / "truncated.mp4"
    path.write_bytes(video_30fps.read_bytes()[: video_30fps.stat().st_size // 3])
    with pytest.raises(ClipError):
        load_clip(path, ClipOptions(buckets=((32, 48),), frames=9, fps=30))


def test_a_missing_file_is_a_clip_error(tmp_path: Path) -> None:
    with pytest.raises(ClipError, match="not found"):
        load_clip(tmp_path / "nope.mp4", ClipOptions(buckets=((32, 32),)))
