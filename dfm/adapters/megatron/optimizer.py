"""What the megatron runtime attaches to train its chunks: megatron's DDP and its (distributed) Adam.

Only training builds them (:meth:`MegatronRuntime.attach_optimizer`; a network to read or export weights
from has neither gradient buffers nor optimizer state). The DDP's overlapped communication is driven by
megatron's schedules; the optimizer follows the other runtimes' AdamW: the weight-decay rule of
:meth:`~dfm.domain.networks.plan.ParallelPlan.decays`, its state created up front (a checkpoint load needs it
before any step), and a checkpoint load that keeps this run's group settings.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as mpu
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate
from megatron.core.optimizer_param_scheduler import ParamGroupOverride

from dfm.adapters.megatron.stage import Chunk
from dfm.adapters.torch_dist.optim import own_group_settings
from dfm.domain.networks.plan import ParallelPlan
from dfm.ports.runtime import OptimizerSettings


def wrap_ddp(chunks: list[Chunk], config: Any, ddp: DistributedDataParallelConfig) -> list[DistributedDataParallel]:
    """The chunks wrapped in megatron's DDP (gradient buffers; bucketing for the first chunk only)."""
    models = [DistributedDataParallel(config, ddp, chunk, disable_bucketing=i > 0) for i, chunk in enumerate(chunks)]
    _set_sync_functions(config, models, ddp)
    return models


def _no_decay_overrides(plan: ParallelPlan) -> dict[Any, Any]:
    """Megatron parameter groups with the other runtimes' weight-decay rule (the network plan's ``decays``)."""
    plain = ParamWithNamePredicate(name="dfm_no_decay", fn=lambda param, name: not plan.decays(name, param))
    return {ParamKey(with_name_predicate=plain): ParamGroupOverride(wd_mult=0.0)}


def build_optimizer(
    models: list[DistributedDataParallel],
    settings: OptimizerSettings,
    *,
    grad_clip: float | None,
    dtype: torch.dtype,
    distributed: bool,
) -> Any:
    """Megatron's Adam over ``models`` with ``settings`` (decoupled weight decay), its state materialised.

    Args:
        models: The model chunks wrapped in megatron's DDP.
        settings: Learning rate, betas, epsilon and weight decay (the schedule is applied per step).
        grad_clip: Clip the global gradient norm to this; ``None`` disables clipping.
        dtype: The parameters' dtype (bf16: megatron keeps float32 main parameters).
        distributed: Shard the optimizer state over the data-parallel ranks.
    """
    config = OptimizerConfig(
        optimizer="adam",
        lr=settings.lr,
        weight_decay=settings.weight_decay,
        adam_beta1=settings.betas[0],
        adam_beta2=settings.betas[1],
        adam_eps=settings.eps,
        clip_grad=grad_clip or 0.0,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        use_distributed_optimizer=distributed,
    )
    plan = models[0].module.network.parallel_plan
    optimizer = get_megatron_optimizer(config, models, config_overrides=_no_decay_overrides(plan))
    materialize_state(optimizer)
    return optimizer


@torch.no_grad()
def materialize_state(optimizer: Any) -> None:
    """Create AdamW's state (zero moments, step 0) now, as a checkpoint load needs it before any step.

    Megatron's ``init_state_fn`` makes the moments; the step counter (which megatron's distributed
    optimizer reads from the torch optimizer when neither Apex nor TE is installed) starts at 0.
    """
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_optimizer = inner.optimizer
        inner.init_state_fn(torch_optimizer, inner.config)
        for state in torch_optimizer.state.values():
            state.setdefault("step", torch.tensor(0.0))


def load_optimizer(optimizer: Any, state: Any) -> None:
    """``optimizer.load_state_dict(state)``, with AdamW's step counters handled outside megatron.

    The checkpoint supplies the moments and step counters; the parameter groups' settings (betas,
    epsilon, ...) stay those this runtime was built with, i.e. the current config's, as in the other
    runtimes (:func:`dfm.adapters.torch_dist.optim.own_group_settings`; the learning rate and weight
    decay are set from the config at every step anyway).

    Without Apex or Transformer Engine, megatron 0.16's distributed optimizer gives every parameter's
    state the same ``step`` tensor (AdamW would then count each step once per parameter) and then fails
    to copy the ``fully_reshardable`` tensors into a state that has a ``step`` (``KeyError: 'step'``). So
    the counters are taken out while megatron loads and put back afterwards, one tensor per parameter.
    """
    inners = [inner.optimizer for inner in getattr(optimizer, "chained_optimizers", [optimizer])]
    steps: list[torch.Tensor] = []

    def take_steps(load: Any, torch_optimizer: torch.optim.Optimizer) -> Any:
        def loader(state_dict: Any) -> None:
            load(state_dict)
            steps.extend(s.pop("step") for s in torch_optimizer.state.values() if "step" in s)

        return loader

    for torch_optimizer in inners:
        torch_optimizer.load_state_dict = take_steps(torch_optimizer.load_state_dict, torch_optimizer)
    try:
        with own_group_settings(inners):
            optimizer.load_state_dict(state)
    finally:
        for torch_optimizer in inners:
            del torch_optimizer.load_state_dict  # the class's method again
    value = float(steps[0]) if steps else 0.0
    for torch_optimizer in inners:
        for param_state in torch_optimizer.state.values():
            param_state["step"] = torch.tensor(value)


def _set_sync_functions(config: Any, models: list[DistributedDataParallel], ddp: DistributedDataParallelConfig) -> None:
    """Let megatron's schedules drive the overlapped communication, as Megatron-LM's training loop does.

    With ``overlap_grad_reduce`` the gradient reduction may only start in the last micro-batch
    (``no_sync`` around the others, ``start_grad_sync`` per chunk); with ``overlap_param_gather`` the
    updated weights are all-gathered chunk by chunk ahead of the next forward pass.
    """

    def per_chunk(functions: list[Any]) -> Any:
        return functions[0] if len(functions) == 1 else functions

    if ddp.overlap_grad_reduce:
        config.no_sync_func = per_chunk([m.no_sync for m in models])
        config.grad_sync_func = per_chunk([m.start_grad_sync for m in models])
    if ddp.overlap_param_gather:
        config.param_sync_func = per_chunk([m.start_param_sync for m in models])


@torch.no_grad()
def sum_sequence_parallel_grads(models: list[DistributedDataParallel]) -> None:
    """Sum over the tensor-parallel group the gradients of parameters that saw only this rank's tokens.

    What megatron's ``finalize_model_grads`` does for parameters marked ``sequence_parallel`` (the rest of
    that function is about language-model embeddings and token-count scaling, which do not apply).
    """
    grads = [p.main_grad for model in models for p in model.parameters() if getattr(p, "sequence_parallel", False)]
    if grads:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=mpu.get_tensor_model_parallel_group())
        for grad, summed in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            grad.copy_(summed.view_as(grad))
