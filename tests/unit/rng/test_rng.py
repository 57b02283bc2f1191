"""Per-sample random streams (DESIGN.md rule 2)."""

from __future__ import annotations

import torch

from dfm.domain.rng import SampleRNG, Stream, splitmix64, stream_seed


def test_splitmix64_golden_values() -> None:
    # Reference values of SplitMix64 seeded with 0 (Vigna's splitmix64.c): the first two outputs.
    assert splitmix64(0) == 0xE220A8397B1DCDAF
    assert splitmix64(0x9E3779B97F4A7C15) == 0x6E789E6AA1B965F4


def test_draws_depend_only_on_the_sample_key() -> None:
    rng = SampleRNG(seed=7, step=3)
    whole = rng.randn([10, 11, 12, 13], (2, 3), Stream.NOISE)
    halves = torch.cat([rng.randn([10, 11], (2, 3), Stream.NOISE), rng.randn([12, 13], (2, 3), Stream.NOISE)])
    assert torch.equal(whole, halves)
    reordered = rng.randn([13, 10], (2, 3), Stream.NOISE)
    assert torch.equal(reordered[0], whole[3]) and torch.equal(reordered[1], whole[0])


def test_streams_steps_seeds_and_samples_are_distinct() -> None:
    keys = {(s, st, i, k) for s in (0, 1) for st in (0, 1, 2) for i in range(50) for k in Stream}
    seeds = {stream_seed(*key) for key in keys}
    assert len(seeds) == len(keys)
    a = SampleRNG(seed=0, step=0).rand([5], (1000,), Stream.SIGMA)
    b = SampleRNG(seed=0, step=1).rand([5], (1000,), Stream.SIGMA)
    assert not torch.allclose(a, b)
    assert abs(float(a.mean()) - 0.5) < 0.05


def test_an_empty_batch_draws_an_empty_tensor() -> None:
    assert SampleRNG(seed=0, step=0).randn([], (2, 3), Stream.NOISE).shape == (0, 2, 3)
