"""Video adapters: uint8 frames, MP4 writing (PyAV, imageio-ffmpeg fallback), reading, contact sheets.

PyAV and imageio are the optional extra ``video``; they are imported when a file is written or read,
so importing this package never needs them.
"""

from dfm.adapters.video.contact_sheet import contact_sheet, frame_indices, save_png
from dfm.adapters.video.io import Mp4Writer, pad_to_even, read_video, to_uint8_frames

__all__ = [
    "Mp4Writer",
    "contact_sheet",
    "frame_indices",
    "pad_to_even",
    "read_video",
    "save_png",
    "to_uint8_frames",
]
