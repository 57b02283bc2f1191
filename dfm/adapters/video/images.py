"""Still images in: read a file and bring it to a video's size (the conditioning frames of image-to-video)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def load_image(path: Path | str, height: int, width: int) -> torch.Tensor:
    """The image at ``path`` as uint8 ``[height, width, 3]``: scaled (Lanczos) to cover the size, centre-cropped.

    An image of that size already is returned unchanged. Grey and RGBA images become RGB.

    Raises:
        ValueError: A missing or unreadable file.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise ValueError(f"cannot read the image {path}: {exc}") from None
    if image.size != (width, height):
        scale = max(width / image.width, height / image.height)
        size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
        left, top = (image.width - width) // 2, (image.height - height) // 2
        image = image.crop((left, top, left + width, top + height))
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
