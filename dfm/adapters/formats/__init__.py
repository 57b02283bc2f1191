"""File formats the adapters share (the one package besides :mod:`dfm.adapters.torch_dist` every adapter may import).

- :mod:`.samples`: the prepared-sample codec (safetensors + JSON record), written by ``prepare`` and the fake data
  sets, read by the energon and Hugging Face sources.
"""

from dfm.adapters.formats.samples import (
    DecodedSample,
    check_first_sample,
    decode_sample,
    encode_sample,
    header_shapes,
    pad_text,
    stack_condition,
)

__all__ = [
    "DecodedSample",
    "check_first_sample",
    "decode_sample",
    "encode_sample",
    "header_shapes",
    "pad_text",
    "stack_condition",
]
