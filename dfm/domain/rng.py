"""Per-sample random streams (DESIGN.md rule 2).

Every random draw of a training sample comes from a ``torch.Generator`` seeded by a hash of
``(seed, step, global sample index, stream)``. The draws therefore do not depend on the rank a
sample lands on, on the micro-batch split, or on the order of draws of other kinds: any parallel
layout of the same global batch computes the same loss, and a resumed run continues exactly.
Generators live on the CPU so that CPU and GPU runs draw identical numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum

import attrs
import torch

_MASK64 = (1 << 64) - 1


class Stream(IntEnum):
    """The independent kinds of per-sample draws."""

    SIGMA = 1
    NOISE = 2
    TEXT_DROPOUT = 3
    SAMPLER = 4
    IMAGE_DROPOUT = 5


def splitmix64(x: int) -> int:
    """One round of SplitMix64 (Steele et al., 2014): a bijective 64-bit mixer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def stream_seed(seed: int, step: int, index: int, stream: int) -> int:
    """The 63-bit seed of one sample's stream; distinct keys give unrelated seeds."""
    h = 0
    for part in (seed, step, index, stream):
        h = splitmix64(h ^ (part & _MASK64))
    return h & ((1 << 63) - 1)


@attrs.frozen(kw_only=True)
class SampleRNG:
    """Random draws keyed by (seed, step, global sample index, stream).

    Attributes:
        seed: The run's seed.
        step: The optimizer step the draws belong to.
    """

    seed: int
    step: int

    def generator(self, index: int, stream: Stream) -> torch.Generator:
        """A fresh CPU generator for one sample's stream."""
        g = torch.Generator(device="cpu")
        g.manual_seed(stream_seed(self.seed, self.step, int(index), int(stream)))
        return g

    def randn(self, indices: Sequence[int] | torch.Tensor, shape: Sequence[int], stream: Stream) -> torch.Tensor:
        """Standard normal draws ``[B, *shape]``, row ``b`` from sample ``indices[b]``'s stream."""
        rows = [torch.randn(tuple(shape), generator=self.generator(i, stream)) for i in _as_list(indices)]
        return torch.stack(rows) if rows else torch.empty((0, *shape))

    def rand(self, indices: Sequence[int] | torch.Tensor, shape: Sequence[int], stream: Stream) -> torch.Tensor:
        """Uniform ``[0, 1)`` draws ``[B, *shape]``, row ``b`` from sample ``indices[b]``'s stream."""
        rows = [torch.rand(tuple(shape), generator=self.generator(i, stream)) for i in _as_list(indices)]
        return torch.stack(rows) if rows else torch.empty((0, *shape))


def _as_list(indices: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(indices, torch.Tensor):
        return [int(i) for i in indices.reshape(-1).tolist()]
    return [int(i) for i in indices]
