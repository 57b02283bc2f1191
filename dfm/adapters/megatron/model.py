"""The domain network as megatron model chunks: megatron tensor-parallel layers, pipeline stages, Ulysses.

A rank holds ``virtual_pipeline`` chunks (one without a virtual pipeline). The network's blocks are cut
into ``pipeline x virtual_pipeline`` equal parts; chunk ``v`` of pipeline rank ``r`` holds part
``v * pipeline + r`` (megatron's interleaved assignment). The first part also holds the plan's
``first_stage`` modules, the last part its ``last_stage`` modules. With ``parallel.tensor > 1`` the plan's
column/row-parallel linears become :class:`ColumnLinear` / :class:`RowLinear` (megatron's
``ColumnParallelLinear`` / ``RowParallelLinear``, same parameter names) and head norms reduce over the
tensor-parallel group; with ``parallel.tensor = 1`` they stay the network's own ``nn.Linear`` s and norms,
which ``torch.compile`` fuses with the ops around them (megatron's layers break a compiled graph); and
with context parallelism self-attention runs through Ulysses over megatron's context-parallel group.
Every parameter is then initialised with the one-process weights (:mod:`.init`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import attrs
import torch
from megatron.core import parallel_state as mpu
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer import TransformerConfig
from torch import nn

from dfm.adapters.megatron.engine import MegatronSizes
from dfm.adapters.megatron.init import Piece, initialise
from dfm.adapters.megatron.stage import Chunk
from dfm.adapters.torch_dist.checkpointing import apply_activation_checkpointing
from dfm.adapters.torch_dist.head_norm import HeadNormForward
from dfm.adapters.torch_dist.sequence import use_ulysses_attention
from dfm.adapters.torch_dist.state import listing
from dfm.domain.networks.attention import SDPAAttention
from dfm.domain.networks.plan import ParallelPlan
from dfm.domain.networks.registry import network_class
from dfm.domain.specs import ModelSpec


class ColumnLinear(ColumnParallelLinear):
    """``ColumnParallelLinear`` with ``nn.Linear``'s batch-first call: ``y[..., out / tp] = x W_r^T + b_r``.

    With sequence parallelism the input is this rank's tokens ``[B, L / tp, in]`` and megatron gathers
    the sequence (its first dimension: ``L`` moves there and back, free for ``B = 1``).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """This rank's output channels of ``x`` ``[B, L, in]`` (the input gradient is reduced over the group)."""
        if self.sequence_parallel:
            return super().forward(x.transpose(0, 1).contiguous())[0].transpose(0, 1)
        return super().forward(x)[0]


class RowLinear(RowParallelLinear):
    """``RowParallelLinear`` with ``nn.Linear``'s batch-first call: ``y = all_reduce(x_r W_r^T) + b``.

    With sequence parallelism the sum is reduce-scattered over the sequence: ``[B, L / tp, out]``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """The output summed over this rank's input channels ``[B, L, in / tp]``."""
        if self.sequence_parallel:
            return super().forward(x.transpose(0, 1).contiguous())[0].transpose(0, 1)
        return super().forward(x)[0]


@attrs.frozen(kw_only=True)
class Options:
    """How the chunks are built (the runtime's knobs)."""

    dtype: torch.dtype = torch.float32
    """Parameter and compute dtype (bf16: megatron keeps float32 main parameters in the optimizer)."""
    attention_backend: str = "auto"
    """SDPA backend of the attention kernels."""
    activation_checkpointing: str = "off"
    """``"off"``, ``"full"``, ``"selective"`` or ``"selective_matmul"`` (recompute blocks in the backward pass)."""
    activation_checkpointing_every_k: int = 1
    """With checkpointing on, recompute every k-th block of a chunk."""
    compile: bool = False
    """``torch.compile`` each block (after activation checkpointing, as the fsdp2 runtime does)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism: between the tensor-parallel linears the tokens are split over the
    sequence across the tensor-parallel ranks (only with ``tensor > 1``)."""


@attrs.frozen(kw_only=True)
class ChunkLayout:
    """Which part of the network a chunk holds."""

    blocks: range
    """Global indices of its blocks."""
    first: bool
    """Whether it holds the first-stage modules (embeddings)."""
    last: bool
    """Whether it holds the last-stage modules (output head)."""


def chunk_layouts(num_layers: int, sizes: MegatronSizes, pipeline_rank: int) -> list[ChunkLayout]:
    """The layouts of this pipeline rank's chunks, in virtual-stage order."""
    parts = sizes.pipeline * sizes.chunks
    per = num_layers // parts
    layouts = []
    for v in range(sizes.chunks):
        part = v * sizes.pipeline + pipeline_rank
        layouts.append(ChunkLayout(blocks=range(part * per, (part + 1) * per), first=part == 0, last=part == parts - 1))
    return layouts


def transformer_config(spec: ModelSpec, sizes: MegatronSizes, options: Options, device: torch.device) -> Any:
    """The ``TransformerConfig`` megatron's layers, DDP and schedules read (no megatron transformer is built)."""
    interleaved, dtype = sizes.chunks > 1, options.dtype
    return TransformerConfig(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        num_attention_heads=spec.num_attention_heads,
        tensor_model_parallel_size=sizes.tensor,
        pipeline_model_parallel_size=sizes.pipeline,
        virtual_pipeline_model_parallel_size=sizes.virtual_pipeline,
        sequence_parallel=options.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=device.type == "cpu",
        perform_initialization=False,
        gradient_accumulation_fusion=False,
        variable_seq_lengths=True,  # buckets of different video sizes pass between stages
        moe_token_dispatcher_type="alltoall",  # (megatron checks it against variable_seq_lengths)
        calculate_per_token_loss=True,  # gradients are summed, never averaged, over data ranks
        # interleaving sends activations and gradients to the same peer at once (always with pipeline=2):
        # batched p2p ops would match them in the wrong order, so use megatron's separate (overlapped) ops
        overlap_p2p_comm=interleaved,
        batch_p2p_comm=not interleaved,
    )


def _no_init(weight: torch.Tensor) -> None:
    """Megatron's ``init_method``: nothing (the weights come from :func:`.init.initialise`)."""


def _owned_network(spec: ModelSpec, layout: ChunkLayout, options: Options) -> tuple[nn.Module, ParallelPlan]:
    """The network on the meta device with only ``layout``'s blocks and stage modules."""
    with torch.device("meta"):
        network = network_class(spec)(spec, attention=SDPAAttention(options.attention_backend), generator=None)
    plan: ParallelPlan = network.parallel_plan
    blocks = network.get_submodule(plan.blocks)
    setattr(network, plan.blocks, nn.ModuleList([blocks[i] for i in layout.blocks]))
    dropped = (() if layout.first else plan.first_stage) + (() if layout.last else plan.last_stage)
    for name in dropped:
        delattr(network, name)
    return network, plan


def _parallel_linears(network: nn.Module, plan: ParallelPlan, config: Any, tp: tuple[int, int]) -> dict[str, Piece]:
    """Replace the planned linears by megatron layers; their parameters' pieces by local name."""
    rank, size = tp
    pieces: dict[str, Piece] = {}
    columns = {name for name, _ in plan.modules_matching(network, plan.column_parallel)}
    texts = {name for name, _ in plan.modules_matching(network, plan.text_linears)}
    text_config = dataclasses.replace(config, sequence_parallel=False)  # the text is never split
    for name, old in plan.modules_matching(network, plan.column_parallel + plan.row_parallel):
        column = name in columns
        width = old.out_features if column else old.in_features
        if width % size:
            raise ValueError(f"parallel.tensor={size} does not divide the {width} features of {name}")
        common = {
            "config": text_config if name in texts else config,
            "init_method": _no_init,
            "bias": old.bias is not None,
            "skip_bias_add": False,
        }
        if column:
            new: nn.Module = ColumnLinear(old.in_features, old.out_features, gather_output=False, **common)
        else:
            new = RowLinear(old.in_features, old.out_features, input_is_parallel=True, **common)
        parent, _, attr = name.rpartition(".")
        setattr(network.get_submodule(parent), attr, new)
        # megatron marks them only when it initialises them itself (perform_initialization)
        set_tensor_model_parallel_attributes(new.weight, True, 0 if column else 1, 1)
        pieces[f"{name}.weight"] = Piece(new.weight, 0 if column else 1, rank, size)
        if new.bias is not None:
            pieces[f"{name}.bias"] = Piece(new.bias, 0, rank, size) if column else Piece(new.bias)
    return pieces


def _head_norms(network: nn.Module, plan: ParallelPlan, options: Options, device: torch.device) -> dict[str, Piece]:
    """Give each head norm this rank's channels of its weight and a forward reduced over the tensor group."""
    rank, size = mpu.get_tensor_model_parallel_rank(), mpu.get_tensor_model_parallel_world_size()
    pieces = {}
    for name, norm in plan.modules_matching(network, plan.head_norms):
        (dim,) = norm.normalized_shape
        weight = nn.Parameter(torch.empty(dim // size, device=device, dtype=options.dtype))
        weight.tensor_model_parallel, weight.partition_dim, weight.partition_stride = True, 0, 1
        norm.weight = weight
        norm.forward = HeadNormForward(norm, mpu.get_tensor_model_parallel_group())
        pieces[f"{name}.weight"] = Piece(weight, 0, rank, size)
    return pieces


def _materialise(
    network: nn.Module, plan: ParallelPlan, options: Options, device: torch.device, taken: set[str]
) -> dict[str, Piece]:
    """Allocate every parameter still on the meta device (replicated: whole on every rank).

    With sequence parallelism a replicated parameter that acts on the split tokens (in a block, outside
    the gathered span between a column- and a row-parallel linear) gets partial gradients on each
    tensor-parallel rank; it is marked ``sequence_parallel`` so megatron sums them over the group.
    """
    pieces = {}
    gathered = _gathered_modules(network, plan)
    for name, param in list(network.named_parameters()):
        if name in taken:
            continue
        assert param.is_meta, f"{name} was allocated outside the plan"
        module_name, _, attr = name.rpartition(".")
        real = nn.Parameter(torch.empty(param.shape, device=device, dtype=options.dtype))
        setattr(network.get_submodule(module_name), attr, real)
        if options.sequence_parallel and name.startswith(plan.blocks + ".") and not _inside(module_name, gathered):
            real.sequence_parallel = True
        pieces[name] = Piece(real)
    meta_buffers = [n for n, b in network.named_buffers() if b.is_meta]
    assert not meta_buffers, f"buffers left on the meta device: {meta_buffers}"
    return pieces


def _gathered_modules(network: nn.Module, plan: ParallelPlan) -> set[str]:
    """The modules whose inside sees whole sequences under sequence parallelism: parents of column linears."""
    return {name.rpartition(".")[0] for name, _ in plan.modules_matching(network, plan.column_parallel)}


def _inside(module: str, parents: set[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in parents)


def _global_name(name: str, blocks: str, layout: ChunkLayout) -> str:
    """``blocks.<local>.rest`` -> ``blocks.<global>.rest``; other names unchanged."""
    prefix = blocks + "."
    if not name.startswith(prefix):
        return name
    index, _, rest = name[len(prefix) :].partition(".")
    return f"{prefix}{layout.blocks[int(index)]}.{rest}"


def build_chunks(
    spec: ModelSpec, sizes: MegatronSizes, config: Any, device: torch.device, options: Options, seed: int | None
) -> list[Chunk]:
    """This rank's model chunks, initialised from ``seed`` (``None``: left uninitialised).

    Raises:
        ValueError: If the plan leaves a linear unassigned, or a width does not divide by the tensor size.
    """
    tp = (mpu.get_tensor_model_parallel_rank(), sizes.tensor)
    cp_group = mpu.get_context_parallel_group() if sizes.context > 1 else None
    chunks, pieces = [], {}
    for layout in chunk_layouts(spec.num_layers, sizes, mpu.get_pipeline_model_parallel_rank()):
        network, plan = _owned_network(spec, layout, options)
        unassigned = plan.unassigned_linears(network)
        if unassigned and sizes.tensor > 1:
            raise ValueError(
                f"parallel.tensor={sizes.tensor}: the network's parallel plan does not say how to split these "
                f"linears: {listing(unassigned)}"
            )
        # without tensor parallelism the plan's linears and head norms stay the network's own modules: megatron's
        # parallel layers run through custom autograd functions that torch.compile cannot trace into a block graph
        local = {} if sizes.tensor == 1 else _parallel_linears(network, plan, config, tp)
        local |= {} if sizes.tensor == 1 else _head_norms(network, plan, options, device)
        local |= _materialise(network, plan, options, device, set(local))
        pieces |= {_global_name(name, plan.blocks, layout): piece for name, piece in local.items()}
        if cp_group is not None:
            use_ulysses_attention(network, plan, cp_group, options.attention_backend)
        if options.activation_checkpointing != "off":
            apply_activation_checkpointing(
                network, plan.blocks, options.activation_checkpointing_every_k, options.activation_checkpointing
            )
        if options.compile:
            for block in network.get_submodule(plan.blocks):
                block.compile()
        chunks.append(Chunk(network, layout, config, cp_group, options.dtype))
    if seed is not None:
        with torch.device("meta"):
            skeleton = network_class(spec)(spec, generator=None)
        initialise(skeleton, pieces, seed)
    return chunks
