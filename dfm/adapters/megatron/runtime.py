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

import math
from collections.abc import Mapping, Sequence
from datetime import timedelta
from functools import partial
from typing import Any, Literal

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
from dfm.adapters.torch_dist.devices import batch_to_device, check_rank_share, device_type, peak_memory_gib
from dfm.adapters.torch_dist.process_group import DEFAULT_TIMEOUT, DistEnv, destroy
from dfm.adapters.torch_dist.schedule import check_optimizer_settings, lr_factor
from dfm.domain.batch import Batch
from dfm.domain.specs import ModelSpec
from dfm.ports.runtime import LossFn, OptimizerSettings, StepResult, WeightsReader

_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
_OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}
"""The distributed optimizer's checkpoint format that loads at any tensor/pipeline/data layout."""


class MegatronRuntime:
    """Megatron-core TP/PP/CP/DP (see the module docstring).

    Constructing it joins (or creates) the process group and megatron's parallel groups, so
    :attr:`topology` is known before the data source is built.

    Args:
        tensor, context, pipeline, virtual_pipeline, data_replicate, data_shard: The ``parallel.*`` keys.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``; a rank uses ``cuda:LOCAL_RANK``.
        precision: ``"auto"`` (bf16 on CUDA, fp32 on CPU), ``"fp32"`` or ``"bf16"`` (bf16 weights and
            compute, float32 main weights in the optimizer and float32 gradient reduction).
        grad_clip: Clip the global gradient norm to this; ``None`` disables clipping.
        ema_decay: Keep an EMA of this rank's weights (float32); ``None``: none.
        activation_checkpointing: ``"off"``, ``"full"`` or ``"selective"``; ``checkpoint_every``: every k-th block.
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
        checkpoint_every: int = 1,
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
        if precision not in ("auto", *_PRECISIONS):
            raise ValueError(f"train.precision must be one of ('auto', 'fp32', 'bf16'), got {precision!r}")
        if activation_checkpointing not in ("off", "full", "selective"):
            raise ValueError(
                f"train.activation_checkpointing must be 'off', 'full' or 'selective', got {activation_checkpointing!r}"
            )
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
        bf16 = precision == "bf16" or (precision == "auto" and kind == "cuda")
        self.options = Options(
            dtype=torch.bfloat16 if bf16 else torch.float32,
            attention_backend=attention_backend,
            activation_checkpointing=activation_checkpointing,
            checkpoint_every=checkpoint_every,
            sequence_parallel=sequence_parallel and self.sizes.tensor > 1,
            compile=compile and kind == "cuda",
        )
        self.grad_clip, self.ema_decay, self.seed = grad_clip, ema_decay, seed
        self.ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=overlap_grad_reduce,
            overlap_param_gather=overlap_param_gather,
            use_distributed_optimizer=distributed_optimizer,
        )
        self._chunks: list[Chunk] = []
        self._config: Any = None
        self._inference = False
        self._ddp: list[DistributedDataParallel] = []
        self._optimizer: Any = None
        self._settings: OptimizerSettings | None = None
        self._blocks = "blocks"
        self._step = 0
        self._ema: dict[str, torch.Tensor] | None = None
        self._n_averaged = 0

    # Building --------------------------------------------------------------------------------------

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

    def build_network(self, spec: ModelSpec, *, inference_dtype: torch.dtype | None = None) -> nn.Module:
        """Build this rank's model chunks alone (no DDP buffers, optimizer or EMA). Collective.

        Args:
            spec: The architecture.
            inference_dtype: ``None``: the chunks to train, in the precision's dtype, initialised from the seed.
                A dtype: chunks in that dtype, not initialised (load their weights next), without activation
                checkpointing, in eval mode without gradients (weights to read or export; this runtime does
                not sample in-process, see :meth:`inference_model`). Building again replaces the chunks and
                drops an attached DDP, optimizer and EMA.

        Returns:
            The first chunk.

        Raises:
            ValueError: For sizes the model does not divide, or a non-floating ``inference_dtype``.
        """
        self._ddp, self._optimizer, self._ema, self._step = [], None, None, 0  # building again starts over
        self.check_model(spec)
        options = self.options
        if inference_dtype is not None:
            if not inference_dtype.is_floating_point:
                raise ValueError(
                    f"the inference dtype must be a floating type such as torch.bfloat16, got {inference_dtype}"
                )
            options = attrs.evolve(options, dtype=inference_dtype, activation_checkpointing="off", compile=False)
        self._config = transformer_config(spec, self.sizes, options, self.device)
        seed = self.seed if inference_dtype is None else None
        self._chunks = build_chunks(spec, self.sizes, self._config, self.device, options, seed)
        self._blocks = type(self._chunks[0].network).parallel_plan.blocks
        self._inference = inference_dtype is not None
        for chunk in self._chunks if self._inference else []:
            chunk.requires_grad_(False).eval()
        return self._chunks[0]

    def attach_optimizer(self, settings: OptimizerSettings) -> None:
        """Wrap the chunks in megatron's DDP and attach its optimizer and (with ``ema_decay``) the EMA. Collective.

        Raises:
            ValueError: For invalid optimizer settings.
            RuntimeError: Before :meth:`build_network`, for chunks built for inference, or a second time.
        """
        self._require_built()
        if self._inference:
            raise RuntimeError("a network built with an inference_dtype takes no optimizer; build one to train")
        if self._optimizer is not None:
            raise RuntimeError("MegatronRuntime.attach_optimizer was already called")
        check_optimizer_settings(settings)
        self._ddp = wrap_ddp(self._chunks, self._config, self.ddp_config)
        self._optimizer = build_optimizer(
            self._ddp,
            settings,
            grad_clip=self.grad_clip,
            dtype=self.options.dtype,
            distributed=self.ddp_config.use_distributed_optimizer,
        )
        self._settings = settings
        self._step = 0
        if self.ema_decay is not None:
            self._reset_ema()

    # Weights ---------------------------------------------------------------------------------------

    def weights(self, use_ema: bool = True) -> dict[str, torch.Tensor]:
        """This rank's weights by global name (tensor-parallel slices, this stage's blocks), aliasing them.

        The float32 EMA copies when attached and ``use_ema``.
        """
        self._require_built()
        if use_ema and self._ema is not None:
            return dict(self._ema)
        return {name: param.detach() for name, param in mstate.named_parameters(self._chunks, self._blocks)}

    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Load whole weights (imported diffusers weights, say); strict; each rank keeps its part, cast to its dtype.

        With an optimizer attached only before the first step; the EMA restarts at these weights.

        Raises:
            ValueError: Naming missing keys and shape mismatches.
            RuntimeError: Before :meth:`build_network`, or once a step was taken.
        """
        self._require_built()
        self._check_fresh()
        params = dict(mstate.named_parameters(self._chunks, self._blocks))
        missing = sorted(set(params) - set(weights))
        if missing:
            raise ValueError(f"initial weights miss {len(missing)} parameters, e.g. {missing[:5]}")
        with torch.no_grad():
            for name, param in params.items():
                value = mstate.local_part(weights[name], param)
                if value.shape != param.shape:
                    raise ValueError(f"{name}: initial weight of shape {tuple(value.shape)} does not fit")
                param.copy_(value)
        self._weights_changed()

    def restore_weights(self, read: WeightsReader, *, use_ema: bool = True) -> Literal["ema", "model"]:
        """Load a checkpoint's EMA weights (when ``ema_decay`` is set and ``use_ema``) or model weights. Collective.

        ``read`` fills ``{"ema": {"module.<name>": ShardedTensor}}`` or ``{"model": {"<name>": ShardedTensor}}``
        (the layout of :meth:`state_dict`, keyed ``runtime.ema.module.<name>`` / ``runtime.model.<name>``),
        laid out over this rank's parameters; no optimizer state is read.

        Raises:
            RuntimeError: Before :meth:`build_network`, or once a step was taken.
        """
        self._require_built()
        self._check_fresh()
        which: Literal["ema", "model"] = "ema" if use_ema and self.ema_decay is not None else "model"
        state: dict[str, Any] = {
            which: mstate.ema_weights_state(self._chunks, self._blocks)
            if which == "ema"
            else mstate.model_state(self._chunks, self._blocks)
        }
        read(state)
        prefix = "module." if which == "ema" else ""
        with torch.no_grad():
            for name, param in mstate.named_parameters(self._chunks, self._blocks):
                loaded = state[which][prefix + name]
                if loaded is not param:
                    param.copy_(loaded)
        self._weights_changed()
        return which

    def _check_fresh(self) -> None:
        if self._step > 0:
            raise RuntimeError("weights load before the first train_step; to resume a run use load_state_dict")

    def _weights_changed(self) -> None:
        """The optimizer's main copies and the EMA restart at the network's weights (when attached)."""
        if self._optimizer is not None:
            self._optimizer.reload_model_params()
        if self._ema is not None:
            self._reset_ema()

    # Training --------------------------------------------------------------------------------------

    def train_step(self, micro_batches: Sequence[Batch], loss_fn: LossFn, global_batch_size: int) -> StepResult:
        """Run megatron's schedule over this rank's micro-batches, reduce, clip, and step (or skip). Collective.

        Raises:
            ValueError: If the micro-batches are empty or do not hold this rank's share of the batch.
        """
        self._require_optimizer()
        check_rank_share(micro_batches, global_batch_size, self.topology.dp_size)
        settings = self._settings
        assert settings is not None
        lr = settings.lr * lr_factor(self._step, settings)
        for group in self._optimizer.param_groups:  # what megatron's OptimizerParamScheduler would set
            group["lr"] = lr
            group["weight_decay"] = settings.weight_decay * group.get("wd_mult", 1.0)
        for model in self._ddp:
            model.train()
            model.zero_grad_buffer()
        self._optimizer.zero_grad()
        totals: dict[str, Any] = {"rows": []}
        batches = [batch_to_device(b, self.device) for b in micro_batches]
        iterators = [iter(batches) for _ in self._ddp]
        get_forward_backward_func()(
            forward_step_func=partial(self._forward_step, loss_fn, global_batch_size, totals),
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
        names, sums = self._reduce(totals)
        found_inf = self._optimizer.prepare_grads()
        norm = float(self._optimizer.get_grad_norm() or 0.0)
        loss = sums[0] / global_batch_size
        metrics = {name: v / global_batch_size for name, v in zip(names, sums[1:], strict=True)}
        finite = math.isfinite(loss) and math.isfinite(norm) and not found_inf
        if finite:
            self._update(norm)
        return StepResult(loss=loss, grad_norm=norm, lr=lr, skipped=not finite, metrics=metrics)

    def _forward_step(
        self, loss_fn: LossFn, global_batch_size: int, totals: dict[str, Any], data_iterator: Any, model: Any
    ) -> tuple[torch.Tensor, Any]:
        """Megatron's ``forward_step_func``: the objective on one micro-batch through one chunk."""
        batch = next(data_iterator)
        out = loss_fn(model, batch)
        chunk: Chunk = model.module
        if not chunk.last:
            assert chunk.output is not None
            return chunk.output, _not_last
        if out.per_sample.shape != (batch.size,):
            raise ValueError(
                f"loss_fn returned per_sample of shape {tuple(out.per_sample.shape)}, expected ({batch.size},)"
            )
        totals["names"] = list(out.metrics)
        row = [out.per_sample.detach().float().sum()]
        row += [v.detach().float().to(self.device) * batch.size for v in out.metrics.values()]
        totals["rows"].append(torch.stack(row))
        loss = out.per_sample.float().sum() / global_batch_size
        return loss, _last

    def _reduce(self, totals: dict[str, Any]) -> tuple[list[str], list[float]]:
        """Loss and metric sums over the micro-batches, from the last stage to every rank, over data ranks."""
        names: list[str] = totals.get("names", [])
        count = torch.tensor([len(names)], device=self.device)
        pp_group = mpu.get_pipeline_model_parallel_group()
        if self.sizes.pipeline > 1:  # only the last stage knows the metric names; every stage learns their count
            dist.all_reduce(count, op=dist.ReduceOp.MAX, group=pp_group)
        rows = totals["rows"]
        sums = torch.stack(rows).sum(0) if rows else torch.zeros(int(count.item()) + 1, device=self.device)
        if self.sizes.pipeline > 1:
            dist.all_reduce(sums, group=pp_group)
            names = self._broadcast_names(names, pp_group)
        if self.topology.dp_size > 1:
            dist.all_reduce(sums, group=mpu.get_data_parallel_group())
        return names, sums.tolist()

    def _broadcast_names(self, names: list[str], group: dist.ProcessGroup) -> list[str]:
        holder = [names if mpu.is_pipeline_last_stage() else None]
        last = dist.get_global_rank(group, dist.get_world_size(group) - 1)
        dist.broadcast_object_list(holder, src=last, group=group)
        return list(holder[0] or [])

    def _update(self, norm: float) -> None:
        """Clip (to the norm already computed), step, average the EMA."""
        optimizers = getattr(self._optimizer, "chained_optimizers", [self._optimizer])
        if self.grad_clip is not None:
            for optimizer in optimizers:
                params = optimizer.get_parameters()
                if params:
                    clip_grad_by_total_norm_fp32(params, max_norm=self.grad_clip, total_norm=norm)
        self._optimizer.step_with_ready_grads()
        self._step += 1
        if self._ema is not None:
            self._update_ema()

    # EMA -------------------------------------------------------------------------------------------

    def _reset_ema(self) -> None:
        self._ema = {n: p.detach().float().clone() for n, p in mstate.named_parameters(self._chunks, self._blocks)}
        self._n_averaged = 1

    @torch.no_grad()
    def _update_ema(self) -> None:
        assert self._ema is not None and self.ema_decay is not None
        for name, param in mstate.named_parameters(self._chunks, self._blocks):
            self._ema[name].lerp_(param.detach().float(), 1.0 - self.ema_decay)
        self._n_averaged += 1

    # State -----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``{"model", "optimizer", "scheduler"[, "ema"]}`` as megatron sharded state (see :mod:`.state`)."""
        self._require_optimizer()
        if self.ddp_config.overlap_param_gather:  # the weights of the last step are gathered in the next forward
            for model in self._ddp:
                model.start_param_sync(force_sync=True)
        model = mstate.model_state(self._chunks, self._blocks)
        state: dict[str, Any] = {
            "model": model,
            "optimizer": self._optimizer.sharded_state_dict(model, metadata=_OPTIMIZER_FORMAT),
            "scheduler": {"step": self._step},
        }
        if self._ema is not None:
            state["ema"] = mstate.ema_state(self._ema, self._chunks, self._blocks, self._n_averaged)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` described, as loaded by ``DistCheckpointIO``. Collective.

        Raises:
            ValueError: If an entry is missing.
        """
        self._require_optimizer()
        missing = [k for k in ("model", "optimizer", "scheduler") if k not in state]
        if missing:
            raise ValueError(f"runtime state lacks {missing}")
        with torch.no_grad():
            for name, param in mstate.named_parameters(self._chunks, self._blocks):
                loaded = state["model"][name]
                if loaded is not param:
                    param.copy_(loaded)
        load_optimizer(self._optimizer, state["optimizer"])
        self._step = int(state["scheduler"]["step"])
        if self._ema is not None and "ema" in state:
            self._n_averaged = mstate.load_ema(self._ema, state["ema"])
        elif self._ema is not None:
            self._reset_ema()

    # Inference and reporting -----------------------------------------------------------------------

    def inference_model(self, use_ema: bool = True) -> nn.Module:
        """Not available: generate from a megatron checkpoint with ``python -m dfm.app.generate``."""
        raise RuntimeError(
            "the megatron runtime does not sample in-process; generate from its checkpoint with "
            "`python -m dfm.app.generate --checkpoint RUN_DIR` (it loads into one process)"
        )

    def max_memory_gib(self) -> float:
        """This rank's peak: CUDA memory allocated on its device, else the process's resident set, in GiB."""
        return peak_memory_gib(self.device)

    def close(self) -> None:
        """Destroy megatron's groups, and the process group if this runtime created it."""
        teardown()
        if self._owns_group:
            destroy()

    def _require_built(self) -> None:
        if not self._chunks:
            raise RuntimeError("MegatronRuntime.build_network(spec) must be called first")

    def _require_optimizer(self) -> None:
        self._require_built()
        if self._optimizer is None:
            raise RuntimeError("MegatronRuntime.attach_optimizer(settings) must be called first")


def _not_last(output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Loss function of a stage that is not the last (megatron never calls it)."""
    return output, torch.tensor(0), {}


def _last(loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The last stage's loss function: the micro-batch's share of the global mean, as is (no averaging)."""
    return loss, torch.tensor(1), {}
