"""Contact sheets: frame selection, layout arithmetic, exact pixel placement, captions, PNG files."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from dfm.adapters.video.contact_sheet import MIN_SIDE, contact_sheet, frame_indices, save_png

# the package re-exports the function ``contact_sheet`` under the module's name, so fetch the module itself
sheet_module = importlib.import_module("dfm.adapters.video.contact_sheet")


def numbered(frames: int, height: int, width: int, video: int) -> torch.Tensor:
    """uint8 [T, H, W, 3]; frame t is a constant colour (t, video, 7) with a marker pixel at (0, 0)."""
    out = torch.zeros(frames, height, width, 3, dtype=torch.uint8)
    out[..., 0] = torch.arange(frames, dtype=torch.uint8)[:, None, None]
    out[..., 1] = video
    out[..., 2] = 7
    out[:, 0, 0] = 250
    return out


@pytest.mark.parametrize(
    ("num_frames", "max_frames", "expected"),
    [
        (16, 8, [0, 2, 4, 6, 9, 11, 13, 15]),
        (8, 8, list(range(8))),
        (3, 8, [0, 1, 2]),
        (9, 3, [0, 4, 8]),
        (10, 4, [0, 3, 6, 9]),
        (5, 1, [0]),
        (1, 8, [0]),
    ],
)
def test_frame_indices_are_evenly_spaced(num_frames: int, max_frames: int, expected: list[int]) -> None:
    assert frame_indices(num_frames, max_frames) == expected


def test_shape_arithmetic_with_auto_scale() -> None:
    videos = [numbered(16, 32, 32, 0), numbered(3, 32, 32, 1)]
    sheet = contact_sheet(videos, gap=4)
    scale = 3  # ceil(96 / 32)
    assert MIN_SIDE == 96
    assert sheet.shape == (2 * 32 * scale + 4, 8 * 32 * scale + 7 * 4, 3)
    assert sheet.dtype == torch.uint8


def test_large_frames_are_not_upscaled() -> None:
    sheet = contact_sheet([numbered(4, 100, 128, 0)], max_frames=2, gap=2)
    assert sheet.shape == (100, 2 * 128 + 2, 3)


def test_pixel_placement_is_exact() -> None:
    videos = [numbered(5, 4, 6, 0), numbered(2, 3, 2, 1)]
    scale, gap, background = 2, 3, 99
    sheet = contact_sheet(videos, max_frames=3, scale=scale, gap=gap, background=background)
    cell_h, cell_w = 4 * scale, 6 * scale
    assert sheet.shape == (2 * cell_h + gap, 3 * cell_w + 2 * gap, 3)
    expected = torch.full(sheet.shape, background, dtype=torch.uint8)
    for row, video in enumerate(videos):
        for column, index in enumerate(frame_indices(video.shape[0], 3)):
            frame = video[index].repeat_interleave(scale, 0).repeat_interleave(scale, 1)
            top, left = row * (cell_h + gap), column * (cell_w + gap)
            expected[top : top + frame.shape[0], left : left + frame.shape[1]] = frame
    assert torch.equal(sheet, expected)
    # spot checks against the arithmetic: row 0 shows frames 0, 2, 4; row 1 frames 0, 1 then background
    assert sheet[0, 0].tolist() == [250, 250, 250] and sheet[2, 2].tolist() == [0, 0, 7]
    assert sheet[2, cell_w + gap + 2].tolist() == [2, 0, 7]
    assert sheet[2, 2 * (cell_w + gap) + 2].tolist() == [4, 0, 7]
    assert sheet[cell_h + gap + 2, cell_w + gap + 2].tolist() == [1, 1, 7]
    assert sheet[cell_h + gap + 2, 2 * (cell_w + gap) + 2].tolist() == [99, 99, 99]
    assert (sheet[cell_h : cell_h + gap] == background).all()


def test_captions_add_a_text_band_per_row() -> None:
    pytest.importorskip("PIL")
    videos = [numbered(4, 32, 32, 0), numbered(4, 32, 32, 1)]
    plain = contact_sheet(videos, max_frames=2)
    captioned = contact_sheet(videos, max_frames=2, captions=["a red square", "b"])
    band = (captioned.shape[0] - plain.shape[0]) // 2
    assert band > 0 and captioned.shape[0] == plain.shape[0] + 2 * band
    assert captioned.shape[1] == plain.shape[1]
    assert (captioned[:band] == 255).any()  # text drawn in white on the black background
    assert torch.equal(captioned[band : band + 96], plain[:96])
    second_row = 96 + 4
    assert torch.equal(captioned[second_row + 2 * band :], plain[second_row:])


def test_captions_skipped_without_pillow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sheet_module, "_pil_available", lambda: False)
    videos = [numbered(4, 32, 32, 0)]
    assert torch.equal(contact_sheet(videos, captions=["hello"]), contact_sheet(videos))


def test_invalid_input() -> None:
    with pytest.raises(ValueError, match="at least one video"):
        contact_sheet([])
    with pytest.raises(ValueError, match="video 1"):
        contact_sheet([numbered(2, 4, 4, 0), torch.zeros(2, 4, 4, 3)])
    with pytest.raises(ValueError, match="captions"):
        contact_sheet([numbered(2, 4, 4, 0)], captions=["a", "b"])
    with pytest.raises(ValueError, match="scale"):
        contact_sheet([numbered(2, 4, 4, 0)], scale=0)
    with pytest.raises(ValueError, match="max_frames"):
        contact_sheet([numbered(2, 4, 4, 0)], max_frames=0)


def test_save_png_round_trips_atomically(tmp_path: Path) -> None:
    iio = pytest.importorskip("imageio.v3")
    image = contact_sheet([numbered(3, 8, 8, 0)], scale=1)
    path = save_png(image, tmp_path / "samples" / "sheet.png")
    assert path == tmp_path / "samples" / "sheet.png"
    assert [p.name for p in path.parent.iterdir()] == ["sheet.png"]
    assert torch.equal(torch.from_numpy(iio.imread(path)), image)
    with pytest.raises(ValueError, match="uint8"):
        save_png(image.float(), tmp_path / "bad.png")
