"""The embedded default: procedural captioned videos, mock latents, and toy codecs.

Needs no data and no downloaded weights: :class:`SyntheticVideoSource` renders captioned clips of a
coloured shape moving across the frame, :class:`IdentityPixelCodec` uses the pixels as latents and
:class:`HashTextEncoder` embeds words with fixed hashed vectors. :class:`MockLatentSource` draws random
latents of any shape for benchmarks.
"""

from dfm.adapters.synthetic.codecs import HashTextEncoder, IdentityPixelCodec, PatchImageEncoder, tokenize
from dfm.adapters.synthetic.source import (
    MockLatentSource,
    SyntheticVideoSource,
)
from dfm.adapters.synthetic.videos import (
    VOCABULARY,
    VideoSpec,
    all_attribute_values,
    coverage,
    describe,
    render,
    render_batch,
)

__all__ = [
    "VOCABULARY",
    "HashTextEncoder",
    "IdentityPixelCodec",
    "MockLatentSource",
    "PatchImageEncoder",
    "SyntheticVideoSource",
    "VideoSpec",
    "all_attribute_values",
    "coverage",
    "describe",
    "render",
    "render_batch",
    "tokenize",
]
