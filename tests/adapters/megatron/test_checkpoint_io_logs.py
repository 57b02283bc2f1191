"""DistCheckpointIO's log filters: megatron's false alarms are dropped, its other warnings kept."""

from __future__ import annotations

import logging

from dfm.adapters.megatron.checkpoint_io import _NotOverwriting, _RngOnlyDiffers

RNG_ONLY = (
    "Rank 1 common state dict differs from rank 0 common state dict. Keys only on rank 0: [], Keys only on 1: [], "
    "Mismatched keys: [(('rng', 'torch'), <class 'torch.Tensor'>, <class 'torch.Tensor'>, tensor(2493), "
    "torch.Size([5056]), [[0], [1]])]"
)


def _record(message: str) -> logging.LogRecord:
    return logging.LogRecord("megatron", logging.WARNING, __file__, 1, message, None, None)


def test_only_the_per_rank_rng_difference_is_silenced() -> None:
    rng = _RngOnlyDiffers()
    assert not rng.filter(_record(RNG_ONLY))
    more = RNG_ONLY.replace("[(('rng', 'torch')", "[(('scheduler', 'step'), 1, 2), (('rng', 'torch')")
    assert rng.filter(_record(more))  # another key differs too: kept
    assert rng.filter(_record(RNG_ONLY.replace("Keys only on 1: []", "Keys only on 1: ['x']")))
    assert rng.filter(_record("something else"))


def test_the_store_temp_dir_is_not_reported_as_an_overwrite() -> None:
    assert not _NotOverwriting().filter(_record("Overwriting old incomplete / corrupted checkpoint..."))
    assert _NotOverwriting().filter(_record("a real problem"))
