"""Video adapters: uint8 frames, MP4 writing (PyAV, imageio-ffmpeg fallback), reading, training clips, contact sheets.

PyAV and imageio are the optional extra ``video``; they are imported when a file is written or read,
so importing this package never needs them.
"""

from dfm.adapters.video.clips import (
    BUCKET_PRESETS,
    IMAGE_SUFFIXES,
    VIDEO_SUFFIXES,
    Clip,
    ClipError,
    ClipOptions,
    is_media_file,
    load_clip,
    nearest_bucket,
)
from dfm.adapters.video.contact_sheet import contact_sheet, frame_indices, save_png
from dfm.adapters.video.io import Mp4Writer, pad_to_even, read_video, to_uint8_frames

__all__ = [
    "BUCKET_PRESETS",
    "IMAGE_SUFFIXES",
    "VIDEO_SUFFIXES",
    "Clip",
    "ClipError",
    "ClipOptions",
    "Mp4Writer",
    "contact_sheet",
    "frame_indices",
    "is_media_file",
    "load_clip",
    "nearest_bucket",
    "pad_to_even",
    "read_video",
    "save_png",
    "to_uint8_frames",
]
