"""``support.tolerances.assert_adam_trained_alike``: deaf to kernel rounding, not to a missed step or a wrong shard.

The local runtime trains the fsdp2 tests' tiny WAN (the parallel tests' reference) for 2 AdamW steps; another
kernel is modelled by noise added to every gradient before each step, 25 times the rounding the CPU kernels
were measured to differ by (4e-8 of a tensor's largest gradient).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.distributed import load_worker
from support.tolerances import assert_adam_trained_alike

from dfm.adapters.local import LocalRuntime

worker = load_worker(Path(__file__).resolve().parents[1] / "fsdp2" / "fsdp2_worker.py", "fsdp2_worker_shared")

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def _trajectory(steps: int, noise: float = 0.0) -> list[dict[str, torch.Tensor]]:
    """Weights at the start and after each step; ``noise``: uniform, times each tensor's largest gradient."""
    runtime = LocalRuntime(**worker.OPTIONS)
    runtime.build_network(worker.SPEC)
    runtime.attach_optimizer(worker.SETTINGS)
    runtime.load_weights(worker.start_weights())
    generator = torch.Generator().manual_seed(1)

    @torch.no_grad()
    def perturb(optimizer: torch.optim.Optimizer, *_: object) -> None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad += noise * p.grad.abs().max() * (2 * torch.rand(p.shape, generator=generator) - 1)

    if noise:
        runtime._optimizer.register_step_pre_hook(perturb)
    out = [{k: v.detach().clone() for k, v in runtime.state_dict()["model"].items()}]
    for step in range(steps):
        micro = worker.micro_batches(worker.batch(step), 0, worker.GLOBAL_BATCH, 2)
        runtime.train_step(micro, worker.loss_fn(step), worker.GLOBAL_BATCH)
        out.append({k: v.detach().clone() for k, v in runtime.state_dict()["model"].items()})
    return out


def test_passes_other_rounding_and_fails_a_missed_or_extra_step_and_a_wrong_shard() -> None:
    start, one, two, three = _trajectory(3)
    noisy = _trajectory(2, noise=1e-6)[2]
    assert any(not torch.equal(noisy[k], two[k]) for k in two)
    assert_adam_trained_alike(noisy, two, start)
    for wrong in (one, three):
        with pytest.raises(AssertionError, match="the updates differ by"):
            assert_adam_trained_alike(wrong, two, start)
    weight = two["blocks.0.attn1.to_q.weight"]
    swapped = two | {"blocks.0.attn1.to_q.weight": weight.roll(weight.shape[0] // 2, dims=0)}  # the other half first
    with pytest.raises(AssertionError):
        assert_adam_trained_alike(swapped, two, start)
