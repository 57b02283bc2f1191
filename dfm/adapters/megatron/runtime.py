"""The ``megatron`` runtime: megatron-core tensor/pipeline parallelism, its DDP and distributed optimizer.

One process per device (``torchrun``), or a lone process as a world of one. Megatron's groups come from
the ``parallel.*`` keys (:mod:`.engine`); the network becomes model chunks of megatron layers
(:mod:`.model`); megatron's ``get_forward_backward_func`` runs the micro-batches (1F1B across pipeline
stages, interleaved with a virtual pipeline); megatron's ``DistributedDataParallel`` sums gradients over
the data- and context-parallel ranks; its optimizer (distributed by default) keeps float32 main weights.
It reproduces the local runtime's numbers: each micro-batch backpropagates ``sum(per_sample) /
global_batch_size`` (``calculate_per_token_loss``: no averaging anywhere), the global norm is clipped like
``clip_grad_norm_`` and a non-finite step is skipped on every rank alike.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from datetime import timedelta
from functools import partial
from typing import Any

import attrs
import torch
import torch.distributed as dist
from megatron.core import parallel_state as mpu
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.pipeline_parallel import get_forward_backward_func
from torch import nn

from dfm.adapters.megatron import state as mstate
from dfm.adapters.megatron.engine import initialize, megatron_sizes, megatron_topology, teardown
from dfm.adapters.megatron.model import Options, build_chunks, transformer_config
from dfm.adapters.megatron.optimizer import build_optimizer, load_optimizer, sum_sequence_parallel_grads, wrap_ddp
from dfm.adapters.megatron.stage import Chunk
from dfm.adapters.torch_dist.core import Tally, TrainingCore, Which, check_options, compute_dtype
from dfm.adapters.torch_dist.devices import batch_to_device, device_type
from dfm.adapters.torch_dist.ema import EMA
from dfm.adapters.torch_dist.process_group import DEFAULT_TIMEOUT, DistEnv, destroy
from dfm.domain.batch import Batch
from dfm.domain.objective import Objective
from dfm.domain.specs import ModelSpec
from dfm.ports.runtime import LossFn, OptimizerSettings

_OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}
"""The distributed optimizer's checkpoint format that loads at any tensor/pipeline/data layout."""


class MegatronRuntime(TrainingCore):
    """Megatron-core TP/PP/CP/DP (see the module docstring).

    The step, the schedule, the EMA and the state layout are :class:`~dfm.adapters.torch_dist.core.TrainingCore`'s;
    what is this runtime's own: megatron's groups, the network as model chunks, megatron's pipeline schedule
    running the micro-batches, its DDP and optimizer (clipping, inf checks, float32 main weights), the EMA as
    float32 copies of this rank's parameters, and state as ``ShardedTensor`` s.

    Constructing it joins (or creates) the process group and megatron's parallel groups, so
    :attr:`topology` is known before the data source is built.

    Args:
        tensor, context, pipeline, virtual_pipeline, data_replicate, data_shard: The ``parallel.*`` keys.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``; a rank uses ``cuda:LOCAL_RANK``.
        precision: ``"auto"`` (bf16 on CUDA, fp32 on CPU), ``"fp32"`` or ``"bf16"`` (bf16 weights and
            compute, float32 main weights in the optimizer and float32 gradient reduction).
        grad_clip: Clip the global gradient norm to this; ``None`` disables clipping.
        ema_decay: Keep an EMA of this rank's weights (float32); ``None``: none.
        activation_checkpointing: ``"off"``, ``"full"``, ``"selective"`` or ``"selective_matmul"``;
            ``activation_checkpointing_every_k``: every k-th block.
        compile: ``torch.compile`` each block, as the fsdp2 runtime does (on CUDA; ignored on the CPU).
        attention_backend: SDPA backend.
        seed: Seed of the initial weights (the local runtime's weights for the same seed).
        distributed_optimizer: Shard the optimizer state over the data-parallel ranks (``megatron.*``).
        overlap_grad_reduce: Overlap the gradient reduce-scatter with the backward pass.
        overlap_param_gather: Overlap the parameter all-gather with the next forward pass.
        sequence_parallel: Megatron sequence parallelism: the tokens between the tensor-parallel linears
            are split over the tensor-parallel ranks (no effect with ``tensor=1``).
        timeout: How long a collective waits for the other ranks.

    Raises:
        ValueError: Naming the config key, for sizes that do not fit the world, or an invalid option.
    """

    schedule_key = "step"  # the name megatron checkpoints have always given the step counter

    def __init__(
        self,
        *,
        tensor: int = 1,
        context: int = 1,
        pipeline: int = 1,
        virtual_pipeline: int | None = None,
        data_replicate: int = 1,
        data_shard: int = -1,
        device: str = "auto",
        precision: str = "auto",
        grad_clip: float | None = 1.0,
        ema_decay: float | None = None,
        activation_checkpointing: str = "off",
        activation_checkpointing_every_k: int = 1,
        attention_backend: str = "auto",
        compile: bool = False,
        seed: int = 0,
        distributed_optimizer: bool = True,
        overlap_grad_reduce: bool = False,
        overlap_param_gather: bool = False,
        sequence_parallel: bool = False,
        timeout: timedelta = DEFAULT_TIMEOUT,
    ) -> None:
        kind = device_type(device)
        check_options(
            precision=precision,
            grad_clip=grad_clip,
            ema_decay=ema_decay,
            checkpointing=activation_checkpointing,
            every_k=activation_checkpointing_every_k,
        )
        super().__init__(grad_clip=grad_clip, ema_decay=ema_decay, seed=seed)
        self._parallel = {
            "tensor": tensor,
            "context": context,
            "pipeline": pipeline,
            "virtual_pipeline": virtual_pipeline,
            "data_replicate": data_replicate,
            "data_shard": data_shard,
        }
        env = DistEnv.from_env()
        self.sizes = megatron_sizes(env.world_size, **self._parallel)
        self._owns_group = not dist.is_initialized()
        self.device = initialize(kind, self.sizes, seed, timeout, env)
        self.topology = megatron_topology(self.sizes, self.device)
        self.options = Options(
            dtype=compute_dtype(precision, kind),
            attention_backend=attention_backend,
            activation_checkpointing=activation_checkpointing,
            activation_checkpointing_every_k=activation_checkpointing_every_k,
            sequence_parallel=sequence_parallel and self.sizes.tensor > 1,
            compile=compile and kind == "cuda",
        )
        self.ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=overlap_grad_reduce,
            overlap_param_gather=overlap_param_gather,
            use_distributed_optimizer=distributed_optimizer,
        )
        self._chunks: list[Chunk] = []
        self._config: Any = None
        self._ddp: list[DistributedDataParallel] = []
        self._settings: OptimizerSettings | None = None
        self._blocks = "blocks"
        self._spec: ModelSpec | None = None

    def check_model(self, spec: ModelSpec) -> None:
        """Check that the model's heads, widths and layers divide by the layout.

        Raises:
            ValueError: Naming the ``parallel.*`` keys and the model sizes that do not fit.
        """
        megatron_sizes(
            self.topology.world_size,
            **self._parallel,
            heads=spec.num_attention_heads,
            hidden=spec.hidden_size,
            ffn=spec.ffn_dim,
            layers=spec.num_layers,
        )

    # Building ---------------------------------------------------------------------------------------

    def _build(self, spec: ModelSpec, inference_dtype: torch.dtype | None) -> nn.Module:
        """This rank's model chunks; returns the first. Inference chunks: no checkpointing or compile, eval mode.

        This runtime does not sample in-process (:meth:`inference_model`); inference chunks hold weights to
        read or export.
        """
        self._ddp = []
        self.check_model(spec)
        options = self.options
        if inference_dtype is not None:
            options = attrs.evolve(options, dtype=inference_dtype, activation_checkpointing="off", compile=False)
        self._config = transformer_config(spec, self.sizes, options, self.device)
        seed = self.seed if inference_dtype is None else None
        self._chunks = build_chunks(spec, self.sizes, self._config, self.device, options, seed)
        self._spec = spec
        self._blocks = type(self._chunks[0].network).parallel_plan.blocks
        for chunk in self._chunks if inference_dtype is not None else []:
            chunk.requires_grad_(False).eval()
        return self._chunks[0]

    def _attach(self, settings: OptimizerSettings) -> None:
        """Megatron's DDP around the chunks and its (distributed) optimizer. Collective."""
        self._ddp = wrap_ddp(self._chunks, self._config, self.ddp_config)
        self._optimizer = build_optimizer(
            self._ddp,
            settings,
            grad_clip=self.grad_clip,
            dtype=self.options.dtype,
            distributed=self.ddp_config.use_distributed_optimizer,
        )
        self._settings = settings

    def _average(self) -> tuple[dict[str, torch.Tensor], None]:
        return {n: p.detach().float().clone() for n, p in self._named_parameters()}, None

    def _named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        return mstate.named_parameters(self._chunks, self._blocks)

    # Training ---------------------------------------------------------------------------------------

    def _set_lr(self, lr: float) -> None:
        """The rate, and each group's weight decay, as megatron's ``OptimizerParamScheduler`` would set them."""
        assert self._settings is not None
        for group in self._optimizer.param_groups:
            group["lr"] = lr
            group["weight_decay"] = self._settings.weight_decay * group.get("wd_mult", 1.0)

    def _begin_step(self) -> None:
        for model in self._ddp:
            model.train()
            model.zero_grad_buffer()
        self._optimizer.zero_grad()

    def _run_micro_batches(self, batches: Sequence[Batch], loss_fn: LossFn, tally: Tally) -> None:
        """Megatron's schedule (1F1B, interleaved with a virtual pipeline), then its gradient reduction."""
        batches = [batch_to_device(b, self.device) for b in batches]
        iterators = [iter(batches) for _ in self._ddp]
        get_forward_backward_func()(
            forward_step_func=partial(self._forward_step, loss_fn, tally),
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=self._ddp,
            num_microbatches=len(batches),
            seq_length=1,  # variable_seq_lengths: the shapes travel with the tensors
            micro_batch_size=batches[0].size,
            forward_only=False,
        )
        for model in self._ddp:
            model.finish_grad_sync()
        if self.options.sequence_parallel:
            sum_sequence_parallel_grads(self._ddp)

    def _forward_step(self, loss_fn: LossFn, tally: Tally, data_iterator: Any, model: Any) -> tuple[torch.Tensor, Any]:
        """Megatron's ``forward_step_func``: one micro-batch through one chunk; the loss on the last stage only.

        With an :class:`~dfm.domain.objective.Objective` every stage forms the network's inputs (the first embeds
        them, later ones rebuild positions and masks from them) and runs its blocks; only the last stage turns
        the prediction into the loss. Any other loss function runs whole, so it needs a single stage.
        """
        batch = next(data_iterator)
        chunk: Chunk = model.module
        if not isinstance(loss_fn, Objective):
            if not (chunk.first and chunk.last):
                raise ValueError(
                    "megatron pipeline stages need the step's loss as a dfm.domain.objective.Objective (its network "
                    f"call and its loss run on different stages); got {type(loss_fn).__name__}"
                )
            return tally.add(loss_fn(model, batch), batch.size), _last
        prepared = loss_fn.prepare(batch)
        output = model(*prepared.call)
        if not chunk.last:
            return output, _not_last
        return tally.add(loss_fn.loss(prepared, output), batch.size), _last

    def _reduce(self, tally: Tally) -> tuple[list[str], torch.Tensor]:
        """Loss and metric sums from the last stage to every stage, then over the data-parallel ranks."""
        names = tally.names
        pp_group = mpu.get_pipeline_model_parallel_group()
        width = None
        if self.sizes.pipeline > 1:  # only the last stage knows the metric names; every stage learns their count
            count = torch.tensor([len(names)], device=self.device)
            dist.all_reduce(count, op=dist.ReduceOp.MAX, group=pp_group)
            width = int(count.item())
        sums = tally.sums(width)
        if self.sizes.pipeline > 1:
            dist.all_reduce(sums, group=pp_group)
            names = _broadcast_names(names, pp_group)
        if self.topology.dp_size > 1:
            dist.all_reduce(sums, group=mpu.get_data_parallel_group())
        return names, sums

    def _grad_norm(self) -> tuple[torch.Tensor, bool]:
        found_inf = bool(self._optimizer.prepare_grads())
        return torch.tensor(float(self._optimizer.get_grad_norm() or 0.0), dtype=torch.float64), found_inf

    def _clip(self, max_norm: float, norm: torch.Tensor) -> None:
        for optimizer in getattr(self._optimizer, "chained_optimizers", [self._optimizer]):
            params = optimizer.get_parameters()
            if params:
                clip_grad_by_total_norm_fp32(params, max_norm=max_norm, total_norm=float(norm))

    def _optimizer_step(self) -> None:
        self._optimizer.step_with_ready_grads()

    def _skip(self) -> None:
        """Nothing: the next step zeroes megatron's gradient buffers."""

    # Weights and state ------------------------------------------------------------------------------

    def _weight_leaves(self, which: Which) -> dict[str, torch.Tensor]:
        key = "runtime.ema.module." if which == "ema" else "runtime.model."
        return {n: mstate.sharded(key + n, p, p) for n, p in self._named_parameters()}

    def _set_weights(self, loaded: Mapping[str, torch.Tensor], *, whole: bool) -> None:
        params = dict(self._named_parameters())
        missing = sorted(set(params) - set(loaded))
        if missing:
            raise ValueError(f"initial weights miss {len(missing)} parameters, e.g. {missing[:5]}")
        with torch.no_grad():
            for name, param in params.items():
                value = mstate.local_part(loaded[name], param) if whole else loaded[name]
                if value is param:
                    continue
                if value.shape != param.shape:
                    raise ValueError(f"{name}: weight of shape {tuple(value.shape)} does not fit {tuple(param.shape)}")
                param.copy_(value)

    def _weights_loaded(self) -> None:
        """The optimizer's float32 main copies restart at the network's weights."""
        if self._optimizer is not None:
            self._optimizer.reload_model_params()

    def _model_and_optimizer_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        if self.ddp_config.overlap_param_gather:  # the weights of the last step are gathered in the next forward
            for model in self._ddp:
                model.start_param_sync(force_sync=True)
        model = mstate.model_state(self._chunks, self._blocks)
        return model, self._optimizer.sharded_state_dict(model, metadata=_OPTIMIZER_FORMAT)

    def _load_model_and_optimizer(self, model: Mapping[str, Any], optimizer: Mapping[str, Any]) -> None:
        self._set_weights(model, whole=False)
        load_optimizer(self._optimizer, optimizer)

    def _ema_state(self, ema: EMA) -> dict[str, Any]:
        return mstate.ema_state(ema.average, self._chunks, self._blocks, int(ema.n_averaged))

    # Inference and reporting ------------------------------------------------------------------------

    def _inference_network(self, use_ema: bool) -> nn.Module:
        """The model chunk (pipeline 1: it is the whole network; collective under tensor or context parallelism),
        or, for the EMA, a second chunk without checkpointing or compile holding the EMA weights in this runtime's
        dtype (copied at each call).

        Raises:
            RuntimeError: Under pipeline parallelism (sample from the checkpoint in one process instead).
        """
        self._require_built()
        if self.sizes.pipeline > 1:
            raise RuntimeError(
                "with parallel.pipeline > 1 the megatron runtime does not sample in-process; generate from its "
                "checkpoint with `python -m dfm.app.generate --checkpoint RUN_DIR` (it loads into one process)"
            )
        if not (use_ema and self._ema is not None):
            return self._chunks[0]
        if self._ema_network is None:
            assert self._spec is not None
            options = attrs.evolve(self.options, activation_checkpointing="off", compile=False)
            (chunk,) = build_chunks(self._spec, self.sizes, self._config, self.device, options, seed=None)
            self._ema_network = chunk.requires_grad_(False)
        with torch.no_grad():
            for name, param in mstate.named_parameters([self._ema_network], self._blocks):
                param.copy_(self._ema.average[name])
        return self._ema_network

    def close(self) -> None:
        """Destroy megatron's groups, and the process group if this runtime created it."""
        teardown()
        if self._owns_group:
            destroy()


def _broadcast_names(names: list[str], group: dist.ProcessGroup) -> list[str]:
    holder = [names if mpu.is_pipeline_last_stage() else None]
    last = dist.get_global_rank(group, dist.get_world_size(group) - 1)
    dist.broadcast_object_list(holder, src=last, group=group)
    return list(holder[0] or [])


def _not_last(output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Loss function of a stage that is not the last (megatron never calls it)."""
    return output, torch.tensor(0), {}


def _last(loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The last stage's loss function: the micro-batch's share of the global mean, as is (no averaging)."""
    return loss, torch.tensor(1), {}
