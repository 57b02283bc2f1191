"""Micro-batches stored in bf16 (``python -m dfm.app.prepare``'s default) train at fp32 precision on every runtime.

The runtimes cast a batch's floating tensors to float32 when they move it to the device, before any
compute (:func:`dfm.adapters.torch_dist.devices.batch_to_device`): a bf16 batch gives exactly the loss
and gradients of the same values given in float32.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist

from dfm.adapters.fsdp2 import FSDP2Runtime
from dfm.adapters.local import LocalRuntime
from dfm.adapters.torch_dist import destroy
from dfm.adapters.torch_dist.devices import batch_to_device
from dfm.domain.batch import Batch, PackedBatch
from dfm.domain.diffusion import FlowMatching
from dfm.domain.objective import batch_loss
from dfm.domain.rng import SampleRNG
from dfm.domain.specs import WanSpec
from dfm.ports.runtime import OptimizerSettings, ParallelRuntime, StepResult

pytestmark = [
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),
    pytest.mark.filterwarnings("ignore:Slicing a flattened dim from root mesh:UserWarning"),
]

SPEC = WanSpec(
    num_attention_heads=2,
    attention_head_dim=12,
    ffn_dim=48,
    num_layers=2,
    text_dim=32,
    freq_dim=16,
    in_channels=4,
    out_channels=4,
)
SETTINGS = OptimizerSettings(lr=1e-3)


def bf16_batch(packed: bool = False) -> Batch | PackedBatch:
    """Two samples as prepared shards hold them: latents and text embeddings in bf16, a bool mask."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 2, 4, 4, generator=g).bfloat16()
    text = torch.randn(2, 5, 32, generator=g).bfloat16()
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    if packed:
        return PackedBatch(latents=tuple(latents), text=text, text_mask=mask, sample_index=torch.arange(2))
    return Batch(latents=latents, text=text, text_mask=mask, sample_index=torch.arange(2))


def as_fp32(batch: Batch | PackedBatch) -> Batch | PackedBatch:
    """The same values in float32 (what a float32 shard of the bf16-rounded data would hold)."""
    return batch.to("cpu", torch.float32)


def step(runtime: ParallelRuntime, batch: Batch | PackedBatch) -> StepResult:
    runtime.build_network(SPEC)
    runtime.attach_optimizer(SETTINGS)
    loss = lambda model, b: batch_loss(model, b, FlowMatching(), SampleRNG(seed=0, step=0))
    return runtime.train_step([batch], loss, batch.size)


def test_batch_to_device_casts_floating_tensors_only() -> None:
    moved = batch_to_device(bf16_batch(), "cpu")
    assert (moved.latents.dtype, moved.text.dtype) == (torch.float32, torch.float32)
    assert moved.text_mask is not None and moved.text_mask.dtype == torch.bool
    assert moved.sample_index.dtype == torch.int64
    packed = batch_to_device(bf16_batch(packed=True), "cpu")
    assert isinstance(packed, PackedBatch) and {x.dtype for x in packed.latents} == {torch.float32}


@pytest.mark.parametrize("packed", [False, True], ids=["batch", "packed"])
def test_local_trains_a_bf16_batch_at_fp32_like_its_fp32_values(packed: bool) -> None:
    got = step(LocalRuntime(device="cpu", precision="fp32"), bf16_batch(packed))
    want = step(LocalRuntime(device="cpu", precision="fp32"), as_fp32(bf16_batch(packed)))
    assert (got.loss, got.grad_norm) == (want.loss, want.grad_norm)


@pytest.fixture
def group_of_one(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No torchrun environment; the process group the runtime creates is destroyed afterwards."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert not dist.is_initialized()
    yield
    destroy()


def test_fsdp2_trains_a_bf16_batch_at_fp32_like_its_fp32_values(group_of_one: None) -> None:
    runtime = FSDP2Runtime(device="cpu", precision="fp32")
    got = step(runtime, bf16_batch())
    want = step(runtime, as_fp32(bf16_batch()))  # rebuilt from the same seed: the same start weights
    assert (got.loss, got.grad_norm) == (want.loss, want.grad_norm)
