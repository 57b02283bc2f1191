"""Small real media files for the data tests: mp4/mov/png inputs with sidecar captions, one corrupt, one uncaptioned."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from dfm.adapters.video import Mp4Writer, save_png

GOOD = ("a.mp4", "b.mp4", "c.mov", "d.png")
CAPTIONS = {"a.mp4": "a red car", "b.mp4": "a cat on a boat", "c.mov": "", "d.png": "a blue sky", "corrupt.mp4": "x"}


def random_video(frames: int, seed: int) -> torch.Tensor:
    """``[frames, 24, 40, 3]`` uint8 noise frames."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (frames, 24, 40, 3), generator=generator, dtype=torch.uint8)


def write_inputs(directory: Path) -> Path:
    """a/b.mp4, c.mov (12 frames at 24 fps), d.png, corrupt.mp4 (garbage) with captions; nocap.mp4 without."""
    directory.mkdir(parents=True, exist_ok=True)
    writer = Mp4Writer()
    for i, name in enumerate(("a.mp4", "b.mp4", "c.mov", "nocap.mp4")):
        writer.write(random_video(12, i), directory / name, fps=24)
    save_png(random_video(1, 9)[0], directory / "d.png")
    (directory / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    for name, caption in CAPTIONS.items():
        (directory / name).with_suffix(".txt").write_text(caption)
    return directory
