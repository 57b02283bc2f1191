"""Build a network sharded from the start: meta device, TP, CP kernels, AC, compile, FSDP, init per shard.

The order is torchtitan's: tensor parallelism turns the planned linears into ``DTensor`` parameters,
self-attention kernels become Ulysses kernels, blocks get activation checkpointing (their ``forward``
replaced on the instance, so names do not change) and optionally ``torch.compile``, then ``fully_shard``
wraps each block and finally the root over the ``dp_shard_cp`` mesh (HSDP with ``dp_replicate``).
Only then is memory allocated (``to_empty``) and every parameter initialised from the seed: the values
are drawn full-size one parameter at a time and each rank keeps its shard
(:func:`~dfm.domain.networks.layers.draw_init`), so a 14B model never exists whole on a rank and every
layout starts from the local runtime's weights.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard
from torch.distributed.tensor.experimental import implicit_replication

from dfm.adapters.fsdp2.context_parallel import StagedForward
from dfm.adapters.fsdp2.tensor_parallel import apply_tensor_parallel
from dfm.adapters.torch_dist.checkpointing import apply_activation_checkpointing
from dfm.adapters.torch_dist.fp8 import convert_to_fp8
from dfm.adapters.torch_dist.grads import use_sum_reduction
from dfm.adapters.torch_dist.lora import base_structure, cast_frozen, init_lora, inject_lora, lora_parallel_plan
from dfm.adapters.torch_dist.mesh import fsdp_mesh
from dfm.adapters.torch_dist.sequence import use_ulysses_attention
from dfm.domain.networks.attention import SDPAAttention
from dfm.domain.networks.registry import network_class
from dfm.domain.specs import ModelSpec
from dfm.ports.runtime import LoraSettings


@attrs.frozen(kw_only=True)
class ShardingOptions:
    """How :func:`build_sharded_network` parallelizes (the runtime's knobs)."""

    param_dtype: torch.dtype | None = None
    """Dtype FSDP gathers parameters in for compute (bf16 mixed precision); ``None``: their own (fp32)."""
    activation_checkpointing: str = "off"
    """``"off"`` or ``"full"``."""
    activation_checkpointing_every_k: int = 1
    """With ``"full"``, checkpoint every k-th block."""
    compile: bool = False
    """``torch.compile`` each block (in place)."""
    attention_backend: str = "auto"
    """SDPA backend of the (inner) attention kernels."""
    fp8: bool = False
    """Train the plan's linears with torchao's float8 recipe (:mod:`dfm.adapters.torch_dist.fp8`)."""
    lora: LoraSettings | None = None
    """Wrap the targeted linears in LoRA adapters and freeze the rest (:mod:`dfm.adapters.torch_dist.lora`)."""

    def mixed_precision(self) -> MixedPrecisionPolicy:
        """bf16 compute with float32 gradient reduction, or no casts; inputs are cast by :class:`StagedForward`."""
        if self.param_dtype is None:
            return MixedPrecisionPolicy()
        return MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)


def shard_placement(shards: int) -> Callable[[nn.Parameter], Shard | None]:
    """FSDP's placement of a parameter over ``shards`` ranks: ``Shard(0)``, or its longest dim when dim 0 is shorter.

    A parameter such as a ``[1, 6, h]`` modulation table would leave ranks without rows, and DTensor
    then refuses the in-place copy that initialises (and loads) a shard.
    """

    def placement(param: nn.Parameter) -> Shard | None:
        if param.ndim == 0 or param.shape[0] >= shards:
            return None
        return Shard(max(range(param.ndim), key=lambda dim: param.shape[dim]))

    return placement


def meta_network(spec: ModelSpec, attention_backend: str) -> nn.Module:
    """The network of ``spec`` on the meta device (no memory, not initialised).

    Raises:
        ValueError: For a spec of another architecture.
    """
    network = network_class(spec)
    with torch.device("meta"):
        return network(spec, attention=SDPAAttention(attention_backend), generator=None)


def build_sharded_network(
    spec: ModelSpec,
    mesh: DeviceMesh,
    device: torch.device,
    options: ShardingOptions,
    seed: int | None,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """The network of ``spec`` parallelized over ``mesh`` (from ``torch_dist.build_mesh``) on ``device``.

    Collective: every rank of the mesh calls it with the same arguments.

    Args:
        spec: The architecture.
        mesh: The ``(dp_replicate, dp_shard, cp, tp)`` mesh.
        device: This rank's device.
        options: Precision, checkpointing, compile and attention settings.
        seed: Initialise the weights from this seed (the local runtime's weights for the same seed);
            ``None`` leaves them uninitialised (to be loaded or copied).
        dtype: The dtype the shards are allocated in (float32 to train; an inference dtype to sample).

    Raises:
        ValueError: If the plan does not fit the network or the mesh (see :func:`apply_tensor_parallel`).
    """
    model = meta_network(spec, options.attention_backend).to(dtype)
    plan = model.parallel_plan
    if options.lora is not None:  # before anything splits the linears the adapters wrap
        inject_lora(model, options.lora)
        cast_frozen(model, options.lora.base_dtype)
    if mesh["tp"].size() > 1:
        apply_tensor_parallel(model, lora_parallel_plan(model, plan) if options.lora else plan, mesh["tp"])
    if options.fp8:  # before checkpointing, compile and sharding, as torchao's recipes convert
        convert_to_fp8(model, plan)
    cp_group = mesh["cp"].get_group() if mesh["cp"].size() > 1 else None
    if cp_group is not None:
        use_ulysses_attention(model, plan, cp_group, options.attention_backend)
    model.forward = StagedForward(model, cp_group=cp_group, compute_dtype=options.param_dtype)
    if options.activation_checkpointing != "off":
        apply_activation_checkpointing(
            model, plan.blocks, options.activation_checkpointing_every_k, options.activation_checkpointing
        )
    blocks = model.get_submodule(plan.blocks)
    if options.compile:
        for block in blocks:
            block.compile()
    shard_mesh, policy = fsdp_mesh(mesh), options.mixed_precision()
    placement = shard_placement(shard_mesh.size(-1))
    for block in blocks:
        fully_shard(block, mesh=shard_mesh, mp_policy=policy, reshard_after_forward=True, shard_placement_fn=placement)
    fully_shard(model, mesh=shard_mesh, mp_policy=policy, reshard_after_forward=False, shard_placement_fn=placement)
    use_sum_reduction(model)
    model.to_empty(device=device)
    if seed is not None:
        with torch.no_grad(), implicit_replication():
            with base_structure(model):  # the network's own init, over its own modules
                model.init_weights(torch.Generator(device="cpu").manual_seed(seed))
            if options.lora is not None:
                init_lora(model, seed)
    return model
