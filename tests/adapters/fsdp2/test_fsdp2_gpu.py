"""The fsdp2 runtime on CUDA (NCCL): fp32 layouts against the local runtime, bf16 + checkpointing + compile.

Skipped without CUDA. With one GPU only the bf16 case runs; with two or more, 2 ranks also train the
``shard``, ``tensor`` and ``context`` layouts in fp32 (TF32 is off in both runtimes; cuDNN convolutions
may still differ slightly between batch splits, hence a looser tolerance than on the CPU).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from support.distributed import load_worker, run_ranks

from dfm.adapters.local import LocalRuntime

HERE = Path(__file__).resolve().parent
WORKER = HERE / "fsdp2_worker.py"

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    worker = load_worker(WORKER, "fsdp2_worker_cuda", "cuda")
    world = min(2, torch.cuda.device_count())
    cases = ["bf16", *(["shard", "tensor", "context"] if world == 2 else [])]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DFM_TEST_DEVICE", "cuda")
        ranks = run_ranks(WORKER, world, [str(tmp_path_factory.mktemp("fsdp2_cuda")), *cases], timeout=540)
    runtime = LocalRuntime(**worker.OPTIONS)
    runtime.build_network(worker.SPEC)
    runtime.attach_optimizer(worker.SETTINGS)
    runtime.load_weights(worker.start_weights())
    losses = []
    for step in range(worker.STEPS):
        micro = worker.micro_batches(worker.batch(step), 0, worker.GLOBAL_BATCH, 1)
        losses.append(runtime.train_step(micro, worker.loss_fn(step), worker.GLOBAL_BATCH).loss)
    return {"world": world, "ranks": ranks, "reference": losses}


def test_bf16_checkpointed_compiled_training_tracks_fp32(cuda_runs: dict[str, Any]) -> None:
    got = cuda_runs["ranks"][0]["bf16"]
    for a, b in zip(got["loss"], cuda_runs["reference"], strict=True):
        assert abs(a - b) <= 2e-2 * abs(b), (got["loss"], cuda_runs["reference"])
    assert got["param_dtypes"] == ["torch.float32"]  # sharded master weights stay fp32
    assert got["output_dtype"] == "torch.bfloat16"
    assert all(got["fused"])
    assert got["compiled"] == [True, True]
    assert got["max_memory_gib"] > 0


@pytest.mark.parametrize("layout", ["shard", "tensor", "context"])
def test_cuda_layouts_match_the_local_runtime(layout: str, cuda_runs: dict[str, Any]) -> None:
    if cuda_runs["world"] < 2:
        pytest.skip("needs 2 GPUs")
    got = cuda_runs["ranks"][0][layout]
    for a, b in zip(got["loss"], cuda_runs["reference"], strict=True):
        assert abs(a - b) <= 1e-4 * abs(b), (layout, got["loss"], cuda_runs["reference"])
