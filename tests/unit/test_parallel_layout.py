"""``ParallelLayout``: the arithmetic of the ``parallel.*`` sizes every runtime and the launch checks share."""

from __future__ import annotations

import pytest

from dfm.domain.layout import ParallelLayout


@pytest.mark.parametrize(
    ("layout", "world", "data_shard"),
    [
        (ParallelLayout(), 8, 8),
        (ParallelLayout(data_replicate=2, tensor=2), 8, 2),
        (ParallelLayout(context=2, pipeline=2), 8, 2),
        (ParallelLayout(data_shard=2, tensor=2, pipeline=2), 8, 2),
    ],
)
def test_resolve_infers_the_data_shards(layout: ParallelLayout, world: int, data_shard: int) -> None:
    resolved = layout.resolve(world)
    assert resolved.data_shard == data_shard and layout.fits(world)
    assert resolved.dp * resolved.context * resolved.tensor * resolved.pipeline == world


def test_what_a_layout_runs_on() -> None:
    assert ParallelLayout(tensor=2, context=2).ranks_needed() == "a multiple of 4"
    assert ParallelLayout(tensor=2, data_shard=3).ranks_needed() == "6"
    assert not ParallelLayout(tensor=2).fits(3) and not ParallelLayout(tensor=2, data_shard=3).fits(4)


def test_errors_name_the_keys() -> None:
    with pytest.raises(ValueError) as world:
        ParallelLayout(tensor=2, pipeline=2).resolve(6)
    assert str(world.value) == (
        "cannot infer parallel.data_shard: the world size 6 is not divisible by parallel.data_replicate=1 * "
        "parallel.context=1 * parallel.tensor=2 * parallel.pipeline=2 = 4; launch a multiple of 4 processes or "
        "change those sizes"
    )
    with pytest.raises(ValueError) as fixed:
        ParallelLayout(data_shard=2, pipeline=2).resolve(8)
    assert str(fixed.value).startswith(
        "the parallel layout does not match the world size: parallel.data_replicate=1 * parallel.data_shard=2 * "
        "parallel.context=1 * parallel.tensor=1 * parallel.pipeline=2 = 4, but 8 processes were launched"
    )
    with pytest.raises(ValueError, match=r"parallel.pipeline must be >= 1, got 0; parallel.data_shard must be -1"):
        ParallelLayout(pipeline=0, data_shard=0)
    assert ParallelLayout(pipeline=2, virtual_pipeline=2).model_problems(layers=6) == [
        "the model's 6 layers are not divisible by parallel.pipeline=2 * parallel.virtual_pipeline=2 = 4 "
        "(each model chunk runs as many)"
    ]
    with pytest.raises(ValueError, match=r"^the parallel layout does not fit the model: the model's 5 layers"):
        ParallelLayout(pipeline=2).check_model(layers=5, heads=4)
