"""The megatron runtime on CUDA (NCCL, no test patches): every layout against the local runtime in fp32.

Skipped with fewer than 2 GPUs. Two ranks train data=2, tensor=2, tensor=2 with sequence parallelism,
pipeline=2, pipeline=2 x virtual_pipeline=2 and context=2 for 3 steps (TF32 off in both runtimes),
then save a dist checkpoint at tensor=2 and load it at tensor=2 and tensor=1 (see ``megatron_worker.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from support.distributed import load_worker, run_ranks

from dfm.adapters.local import LocalRuntime

HERE = Path(__file__).resolve().parent
WORKER = HERE / "megatron_worker.py"
LAYOUTS = ["data", "tensor", "sequence", "pipeline", "virtual", "context"]
RTOL = 1e-4
"""Looser than on the CPU: cuDNN convolutions and NCCL reductions may round differently per split."""

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs"),
]


@pytest.fixture(scope="module")
def cuda_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    worker = load_worker(WORKER, "megatron_worker_cuda", "cuda")
    shared = worker.shared
    out = tmp_path_factory.mktemp("megatron_cuda")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DFM_TEST_DEVICE", "cuda")
        ranks = run_ranks(WORKER, 2, [str(out), *LAYOUTS, "resume"], timeout=540)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    runtime = LocalRuntime(**worker.OPTIONS)
    runtime.build_network(worker.SPEC)
    runtime.attach_optimizer(shared.SETTINGS)
    runtime.load_weights(worker.start_weights())
    losses = []
    for step in range(shared.STEPS):
        micro = shared.micro_batches(shared.batch(step), 0, shared.GLOBAL_BATCH, 1)
        losses.append(runtime.train_step(micro, shared.loss_fn(step), shared.GLOBAL_BATCH).loss)
    return {"out": out, "result": ranks[0], "reference": losses}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_layouts_match_the_local_runtime(layout: str, cuda_runs: dict[str, Any]) -> None:
    got = cuda_runs["result"][layout]["loss"]
    for a, b in zip(got, cuda_runs["reference"], strict=True):
        assert abs(a - b) <= RTOL * abs(b), (layout, got, cuda_runs["reference"])


def test_cuda_dist_checkpoint_reshards_and_resumes(cuda_runs: dict[str, Any]) -> None:
    out, result = cuda_runs["out"], cuda_runs["result"]
    saved = load_file(str(out / "saved.safetensors"))
    for name in ("same", "other"):
        loaded = load_file(str(out / f"{name}.loaded.safetensors"))
        assert all(torch.equal(loaded[k], v) for k, v in saved.items()), name
    assert result["resume"]["same"]["loss"] == [result["tensor"]["loss"][2]]
