"""File formats the adapters share (the one package besides :mod:`dfm.adapters.torch_dist` every adapter may import).

- :mod:`.samples`: the prepared-sample codec (safetensors + JSON record), written by ``prepare`` and the fake data
  sets, read by the energon and Hugging Face sources.
"""

from dfm.adapters.formats.samples import DecodedSample, decode_sample, encode_sample, pad_text

__all__ = ["DecodedSample", "decode_sample", "encode_sample", "pad_text"]
