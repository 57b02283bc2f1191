"""Single-process checks of torch_dist: parallel sizes and their errors, the launcher environment, a lone group."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from dfm.adapters.torch_dist import DistEnv, MeshSizes, destroy, init_process_group, resolve_sizes


@pytest.mark.parametrize(
    ("world", "given", "expected"),
    [
        (1, {}, MeshSizes()),
        (8, {}, MeshSizes(data_shard=8)),
        (8, {"data_replicate": 2, "tensor": 2}, MeshSizes(data_replicate=2, data_shard=2, tensor=2)),
        (
            8,
            {"context": 2, "tensor": 2, "heads": 12, "hidden": 64, "ffn": 128},
            MeshSizes(data_shard=2, context=2, tensor=2),
        ),
        (4, {"data_shard": 1, "context": 4, "heads": 4}, MeshSizes(context=4)),
    ],
)
def test_resolve_sizes_infers_the_data_shards(world: int, given: dict[str, int], expected: MeshSizes) -> None:
    sizes = resolve_sizes(world, **given)
    assert sizes == expected
    assert sizes.world == world and sizes.dp == expected.data_replicate * expected.data_shard


@pytest.mark.parametrize(
    ("world", "given", "message"),
    [
        (
            4,
            {"data_shard": 2, "context": 2, "tensor": 2},
            "the parallel layout does not match the world size: parallel.data_replicate=1 * parallel.data_shard=2 "
            "* parallel.context=2 * parallel.tensor=2 = 8, but 4 processes were launched; choose sizes whose "
            "product is 4, or set parallel.data_shard=-1 to infer it",
        ),
        (
            6,
            {"context": 4},
            "cannot infer parallel.data_shard: the world size 6 is not divisible by parallel.data_replicate=1 * "
            "parallel.context=4 * parallel.tensor=1 = 4; launch a multiple of 4 processes or change those sizes",
        ),
        (
            4,
            {"pipeline": 2},
            "parallel.pipeline=2: this runtime has no pipeline parallelism (its device mesh is data_replicate x "
            "data_shard x context x tensor); use runtime=megatron for pipeline stages, or set parallel.pipeline=1",
        ),
        (
            8,
            {"context": 2, "tensor": 4, "heads": 12, "hidden": 36, "ffn": 90},
            "the parallel layout does not fit the model: the model's 12 attention heads are not divisible by "
            "parallel.tensor=4 * parallel.context=2 = 8 (tensor parallelism splits the heads, then context "
            "parallelism splits each rank's heads again); the model's feed-forward size 90 is not divisible by "
            "parallel.tensor=4",
        ),
        (
            2,
            {"tensor": 2, "hidden": 63},
            "the parallel layout does not fit the model: the model's hidden size 63 is not divisible by "
            "parallel.tensor=2",
        ),
        (
            2,
            {"tensor": 0, "data_shard": 0},
            "invalid parallel sizes: parallel.tensor must be >= 1, got 0; parallel.data_shard must be -1 (infer) "
            "or >= 1, got 0",
        ),
    ],
)
def test_resolve_sizes_errors_name_every_offending_key(world: int, given: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError) as info:
        resolve_sizes(world, **given)
    assert str(info.value) == message


def test_dist_env_reads_torchrun_variables() -> None:
    assert DistEnv.from_env({}) == DistEnv()
    assert DistEnv.from_env({"MASTER_ADDR": "node0", "MASTER_PORT": "1234"}) == DistEnv()  # stray, not a launch
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}
    read = DistEnv.from_env(env)
    assert read == DistEnv(rank=3, world_size=4, local_rank=1, master_addr="node0", master_port=29500)
    assert read.launched and str(read.device("cuda")) == "cuda:1" and str(read.device("cpu")) == "cpu"
    with pytest.raises(ValueError, match=r"RANK, WORLD_SIZE set but LOCAL_RANK, MASTER_ADDR, MASTER_PORT not"):
        DistEnv.from_env({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match=r"RANK=4, LOCAL_RANK=1, WORLD_SIZE=4 \(need"):
        DistEnv.from_env(env | {"RANK": "4"})
    with pytest.raises(ValueError, match="WORLD_SIZE must be an integer, got 'two'"):
        DistEnv.from_env(env | {"WORLD_SIZE": "two"})


def test_init_process_group_explains_a_missing_launcher() -> None:
    with pytest.raises(ValueError) as info:
        init_process_group("cpu", min_world_size=4, env=DistEnv())
    assert str(info.value) == (
        "the parallel layout needs at least 4 processes, but this process was not started by torchrun (RANK, "
        "WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are unset); launch with `torchrun --nproc-per-node 4 "
        "-m dfm.app.train ...`, or reduce the parallel sizes"
    )
    launched = DistEnv(rank=0, world_size=2, local_rank=0, master_addr="127.0.0.1", master_port=1)
    with pytest.raises(ValueError, match="needs at least 4 processes, but only 2 were launched"):
        init_process_group("cpu", min_world_size=4, env=launched)
    assert not dist.is_initialized()


def test_a_lone_process_gets_a_group_of_one() -> None:
    assert not dist.is_initialized()
    try:
        env = init_process_group("cpu", env=DistEnv())
        assert init_process_group("cpu", env=DistEnv()) == env  # idempotent
        assert (dist.get_rank(), dist.get_world_size(), dist.get_backend()) == (0, 1, "gloo")
        with pytest.raises(ValueError, match="already exists with rank 0 of 1, but the environment says rank 1 of 2"):
            init_process_group("cpu", env=DistEnv(rank=1, world_size=2, local_rank=1, master_addr="x", master_port=1))
    finally:
        destroy()
    assert not dist.is_initialized()
    destroy()  # nothing left: no error
