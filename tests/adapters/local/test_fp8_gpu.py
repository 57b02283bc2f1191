"""``train.fp8`` on an FP8 GPU: the plan's linears become torchao ``Float8Linear`` s and training tracks bf16."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from dfm.adapters.local import LocalRuntime
from dfm.domain.batch import Batch
from dfm.domain.diffusion.flow import FlowMatching
from dfm.domain.objective import Objective
from dfm.domain.rng import SampleRNG
from dfm.domain.specs import WanSpec
from dfm.ports.runtime import OptimizerSettings

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="needs an FP8 GPU"
    ),
    pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="needs torchao"),
]
SPEC = WanSpec(
    num_layers=2,
    num_attention_heads=4,
    attention_head_dim=32,
    ffn_dim=256,
    in_channels=16,
    out_channels=16,
    text_dim=64,
    freq_dim=64,
    patch_size=(1, 2, 2),
)
STEPS = 30
TOLERANCE = 0.05
"""FP8 GEMMs with dynamic per-tensor scales: the mean loss over the run within 5 % of bf16's."""


def _losses(fp8: bool) -> list[float]:
    runtime = LocalRuntime(device="cuda", precision="bf16", fp8=fp8, seed=0)
    network = runtime.build_network(SPEC)
    runtime.attach_optimizer(OptimizerSettings(lr=1e-3))
    if fp8:
        from torchao.float8.float8_linear import Float8Linear

        assert sum(isinstance(m, Float8Linear) for m in network.modules()) > 0
    losses = []
    for step in range(STEPS):
        g = torch.Generator().manual_seed(step)
        batch = Batch(
            latents=torch.randn(4, 16, 2, 16, 16, generator=g),
            text=torch.randn(4, 32, 64, generator=g),
            sample_index=torch.arange(4 * step, 4 * step + 4),
        )
        objective = Objective(process=FlowMatching(), rng=SampleRNG(seed=0, step=step))
        losses.append(runtime.train_step([batch], objective, 4).loss)
    return losses


def test_fp8_training_tracks_bf16() -> None:
    bf16, fp8 = _losses(False), _losses(True)
    mean_bf16, mean_fp8 = sum(bf16) / STEPS, sum(fp8) / STEPS
    assert abs(mean_fp8 - mean_bf16) / mean_bf16 < TOLERANCE, (bf16, fp8)
