"""The ``fsdp2`` runtime: PyTorch FSDP2 (``fully_shard``) with DTensor tensor and Ulysses context parallelism.

One process per device (``torchrun``), or a lone process as a world of one. The ranks form the mesh
``dp_replicate x dp_shard x cp x tp`` (:mod:`dfm.adapters.torch_dist.mesh`). Data-parallel ranks read
different samples; the context- and tensor-parallel ranks of one data-parallel coordinate read the
same ones. It reproduces the local runtime's numbers: each rank backpropagates
``sum(per_sample) / global_batch_size`` over its samples and FSDP sums the gradients over the
data- and context-parallel ranks; gradients are reduced only after the last micro-batch; the norm is
clipped like ``clip_grad_norm_``; a non-finite step is skipped on every rank alike (it is decided on
reduced values); weights and AdamW state stay float32 and bf16 enters through FSDP's mixed precision.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from dfm.adapters.fsdp2 import state as fsdp_state
from dfm.adapters.fsdp2.ema import PREFIX as EMA_PREFIX
from dfm.adapters.fsdp2.ema import ShardedEMA
from dfm.adapters.fsdp2.grads import clip_grads, set_gradient_sync, total_grad_norm
from dfm.adapters.fsdp2.parallelize import ShardingOptions, build_sharded_network
from dfm.adapters.torch_dist.devices import batch_to_device, check_rank_share, device_type, peak_memory_gib
from dfm.adapters.torch_dist.mesh import build_mesh, resolve_sizes, topology
from dfm.adapters.torch_dist.optim import build_adamw
from dfm.adapters.torch_dist.process_group import DEFAULT_TIMEOUT, DistEnv, destroy, init_process_group
from dfm.adapters.torch_dist.schedule import (
    build_scheduler,
    check_optimizer_settings,
    load_scheduler_state,
    scheduler_state,
)
from dfm.domain.batch import Batch
from dfm.domain.specs import ModelSpec
from dfm.ports.runtime import LossFn, OptimizerSettings, StepResult, WeightsReader

_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def _check_options(precision: str, grad_clip: float | None, ema_decay: float | None, ac: str, every: int) -> None:
    problems = [
        f"train.precision must be one of ('auto', 'fp32', 'bf16'), got {precision!r}"
        if precision not in ("auto", *_PRECISIONS)
        else None,
        f"train.grad_clip must be > 0 or None, got {grad_clip}" if grad_clip is not None and grad_clip <= 0 else None,
        f"train.ema_decay must be in (0, 1) or None, got {ema_decay}"
        if ema_decay is not None and not 0 < ema_decay < 1
        else None,
        f"train.activation_checkpointing must be 'off', 'full' or 'selective', got {ac!r}"
        if ac not in ("off", "full", "selective")
        else None,
        f"train.activation_checkpointing_every_k must be >= 1, got {every}" if every < 1 else None,
    ]
    if any(problems):
        raise ValueError("; ".join(p for p in problems if p))


class FSDP2Runtime:
    """FSDP2/HSDP over ``dp_replicate x dp_shard``, DTensor tensor parallelism, Ulysses context parallelism.

    Constructing it joins (or creates) the default process group and builds the device mesh, so
    :attr:`topology` is known before the data source is built.

    Args:
        data_replicate: ``parallel.data_replicate`` (HSDP replicas).
        data_shard: ``parallel.data_shard``; ``-1`` infers it from the world size.
        context: ``parallel.context`` (Ulysses; the heads must divide by ``tensor * context``).
        tensor: ``parallel.tensor``.
        pipeline: ``parallel.pipeline``; must be 1.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``; a rank uses ``cuda:LOCAL_RANK``.
        precision: ``"auto"`` (bf16 on CUDA, fp32 on CPU), ``"fp32"`` or ``"bf16"`` (FSDP mixed precision:
            bf16 compute, float32 weights, optimizer state and gradient reduction).
        grad_clip: Clip the global gradient norm to this; ``None`` disables clipping.
        ema_decay: Keep a sharded EMA of the weights with this decay; ``None``: none.
        activation_checkpointing: ``"off"``, ``"full"`` or ``"selective"`` (attention outputs kept).
        checkpoint_every: With ``"full"``, checkpoint every k-th block (1 = all).
        attention_backend: SDPA backend (``"auto"``, ``"math"``, ``"flash"``, ``"efficient"``, ``"cudnn"``).
        compile: ``torch.compile`` each block (on CUDA; ignored on the CPU).
        seed: Seed of the initial weights (the local runtime's weights for the same seed).
        timeout: How long a collective waits for the other ranks.

    Raises:
        ValueError: Naming the config key, for sizes that do not fit the world, or an invalid option.
    """

    def __init__(
        self,
        *,
        data_replicate: int = 1,
        data_shard: int = -1,
        context: int = 1,
        tensor: int = 1,
        pipeline: int = 1,
        device: str = "auto",
        precision: str = "auto",
        grad_clip: float | None = 1.0,
        ema_decay: float | None = None,
        activation_checkpointing: str = "off",
        checkpoint_every: int = 1,
        attention_backend: str = "auto",
        compile: bool = False,
        seed: int = 0,
        timeout: timedelta = DEFAULT_TIMEOUT,
    ) -> None:
        kind = device_type(device)
        _check_options(precision, grad_clip, ema_decay, activation_checkpointing, checkpoint_every)
        self._parallel = {
            "data_replicate": data_replicate,
            "data_shard": data_shard,
            "context": context,
            "tensor": tensor,
            "pipeline": pipeline,
        }
        env = DistEnv.from_env()
        sizes = resolve_sizes(env.world_size, **self._parallel)
        self._owns_group = not dist.is_initialized()
        init_process_group(kind, timeout, env=env)
        self.device = env.device(kind)
        self.mesh = build_mesh(kind, sizes)
        self.topology = topology(self.mesh, self.device)
        self._dp_group = self.mesh["dp"].get_group()
        dtype = torch.bfloat16 if precision == "auto" and kind == "cuda" else _PRECISIONS.get(precision)
        self.options = ShardingOptions(
            param_dtype=dtype,
            activation_checkpointing=activation_checkpointing,
            checkpoint_every=checkpoint_every,
            compile=compile and kind == "cuda",
            attention_backend=attention_backend,
        )
        self.grad_clip, self.ema_decay, self.seed = grad_clip, ema_decay, seed
        self._model: nn.Module | None = None
        self._optimizer: torch.optim.AdamW | None = None
        self._scheduler: LambdaLR | None = None
        self._ema: ShardedEMA | None = None
        self._spec: ModelSpec | None = None
        self._inference = False

    # Building --------------------------------------------------------------------------------------

    def build_network(self, spec: ModelSpec, *, inference_dtype: torch.dtype | None = None) -> nn.Module:
        """Build the sharded network alone (no optimizer state, no EMA). Collective.

        Args:
            spec: The architecture.
            inference_dtype: ``None``: the network to train, float32 weights initialised from the seed, with
                the configured mixed precision, activation checkpointing and compile. A dtype: the network to
                sample or export with, its shards allocated in that dtype and not initialised (load them next),
                computing in that dtype, in eval mode without gradients. Building again replaces the network
                and drops an attached optimizer and EMA.

        Returns:
            The network (its ``forward`` runs the context-parallel stages).

        Raises:
            ValueError: For an unknown architecture, a non-floating ``inference_dtype``, or a parallel layout the
                model's heads, hidden or feed-forward sizes do not divide (naming the ``parallel.*`` keys).
        """
        self._optimizer, self._scheduler, self._ema = None, None, None  # building again starts over
        self.check_model(spec)
        if inference_dtype is None:
            model = build_sharded_network(spec, self.mesh, self.device, self.options, seed=self.seed).train()
        else:
            if not inference_dtype.is_floating_point:
                raise ValueError(
                    f"the inference dtype must be a floating type such as torch.bfloat16, got {inference_dtype}"
                )
            compute = None if inference_dtype == torch.float32 else inference_dtype
            options = ShardingOptions(param_dtype=compute, attention_backend=self.options.attention_backend)
            model = build_sharded_network(spec, self.mesh, self.device, options, seed=None, dtype=inference_dtype)
            model.requires_grad_(False).eval()
        self._model, self._spec, self._inference = model, spec, inference_dtype is not None
        return model

    def attach_optimizer(self, settings: OptimizerSettings) -> None:
        """Attach AdamW, the LR schedule and (with ``ema_decay``) a sharded EMA started at the weights. Collective.

        Raises:
            ValueError: For invalid optimizer settings.
            RuntimeError: Before :meth:`build_network`, for a network built for inference, or a second time.
        """
        model = self._require_model()
        if self._inference:
            raise RuntimeError("a network built with an inference_dtype takes no optimizer; build one to train")
        if self._optimizer is not None:
            raise RuntimeError("FSDP2Runtime.attach_optimizer was already called")
        check_optimizer_settings(settings)
        self._optimizer = build_adamw(model, settings, fused=self.device.type == "cuda")
        self._scheduler = build_scheduler(self._optimizer, settings)
        if self.ema_decay is not None:
            assert self._spec is not None
            plain = ShardingOptions(
                param_dtype=self.options.param_dtype, attention_backend=self.options.attention_backend
            )
            average = build_sharded_network(self._spec, self.mesh, self.device, plain, seed=None)
            self._ema = ShardedEMA(average, self.ema_decay)
            self._ema.reset(model)

    def check_model(self, spec: ModelSpec) -> None:
        """Check that the model's heads, hidden and feed-forward sizes divide by the layout.

        Raises:
            ValueError: Naming the ``parallel.*`` keys and the model sizes that do not fit.
        """
        hidden, ffn = spec.hidden_size, spec.ffn_dim
        resolve_sizes(
            self.topology.world_size, **self._parallel, heads=spec.num_attention_heads, hidden=hidden, ffn=ffn
        )

    # Weights ---------------------------------------------------------------------------------------

    def weights(self, use_ema: bool = True) -> dict[str, torch.Tensor]:
        """``{name: DTensor}`` of the EMA (when attached and ``use_ema``) or the network, aliasing its shards."""
        return fsdp_state.model_state(self._inference_network(use_ema))

    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Load whole weights held by every rank (imported diffusers weights, say); strict. Collective.

        Each rank keeps its shards of them, cast to the network's dtype. With an optimizer attached only
        before the first step, and the EMA restarts at these weights.

        Raises:
            ValueError: Naming the missing and unexpected keys and the shape mismatches, if any.
            RuntimeError: Before :meth:`build_network`, or once a step was taken (resume with :meth:`load_state_dict`).
        """
        model = self._require_model()
        self._check_fresh()
        fsdp_state.load_full_weights(model, weights)
        if self._ema is not None:
            self._ema.reset(model)

    def restore_weights(self, read: WeightsReader, *, use_ema: bool = True) -> Literal["ema", "model"]:
        """Load a checkpoint's EMA weights (when ``ema_decay`` is set and ``use_ema``) or model weights. Collective.

        ``read`` fills ``{"ema": {"module.<name>": DTensor}}`` or ``{"model": {"<name>": DTensor}}`` (the layout of
        :meth:`state_dict`), whose tensors are this rank's shards of the network: a DCP store reshards any
        runtime's checkpoint into them. No optimizer state is read.

        Raises:
            RuntimeError: Before :meth:`build_network`, or once a step was taken.
        """
        model = self._require_model()
        self._check_fresh()
        which: Literal["ema", "model"] = "ema" if use_ema and self.ema_decay is not None else "model"
        prefix = EMA_PREFIX if which == "ema" else ""
        own = fsdp_state.model_state(model)
        state: dict[str, Any] = {which: {prefix + name: tensor for name, tensor in own.items()}}
        read(state)
        loaded = {name.removeprefix(prefix): tensor for name, tensor in state[which].items()}
        if any(tensor is not own[name] for name, tensor in loaded.items()):  # a reader that returned new tensors
            fsdp_state.load_weights(model, loaded)
        if self._ema is not None:
            self._ema.reset(model)
        return which

    def _check_fresh(self) -> None:
        if self._scheduler is not None and self._scheduler.last_epoch > 0:
            raise RuntimeError("weights load before the first train_step; to resume a run use load_state_dict")

    # Training --------------------------------------------------------------------------------------

    def train_step(self, micro_batches: Sequence[Batch], loss_fn: LossFn, global_batch_size: int) -> StepResult:
        """Accumulate over this rank's ``micro_batches``, reduce, clip, and step (or skip a non-finite step).

        Collective. Each micro-batch contributes ``sum(per_sample) / global_batch_size`` to the backward
        pass; gradients are summed over the data- and context-parallel ranks after the last one. Loss
        and metrics are summed over the data-parallel ranks only (context/tensor ranks hold copies).

        Args:
            micro_batches: This data-parallel rank's micro-batches (the same on its cp/tp peers).
            loss_fn: ``(model, batch) -> LossOutput``.
            global_batch_size: Samples over all data-parallel ranks and micro-batches.

        Returns:
            Mean loss, gradient norm before clipping, the learning rate used and mean metrics.

        Raises:
            ValueError: If the micro-batches are empty or do not hold this rank's share of the batch.
        """
        model, optimizer, _ = self._parts()
        check_rank_share(micro_batches, global_batch_size, self.topology.dp_size)
        model.train()
        optimizer.zero_grad(set_to_none=True)
        names, sums = self._accumulate(model, micro_batches, loss_fn, global_batch_size)
        if self.topology.dp_size > 1:
            dist.all_reduce(sums, group=self._dp_group)
        params = list(model.parameters())
        grad_norm = total_grad_norm(params, self.device)
        values = torch.cat([sums, grad_norm.reshape(1)]).tolist()  # one device sync
        loss, norm = values[0] / global_batch_size, values[-1]
        metrics = {name: v / global_batch_size for name, v in zip(names, values[1:-1], strict=True)}
        lr = float(optimizer.param_groups[0]["lr"])
        finite = math.isfinite(loss) and math.isfinite(norm)  # reduced values: every rank decides alike
        if finite:
            self._update(params, grad_norm)
        else:
            optimizer.zero_grad(set_to_none=True)
        return StepResult(loss=loss, grad_norm=norm, lr=lr, skipped=not finite, metrics=metrics)

    def _update(self, params: list[nn.Parameter], grad_norm: torch.Tensor) -> None:
        """Clip, take the optimizer and schedule step, average the EMA."""
        model, optimizer, scheduler = self._parts()
        if self.grad_clip is not None:
            clip_grads(params, self.grad_clip, grad_norm)
        optimizer.step()
        scheduler.step()
        if self._ema is not None:
            self._ema.update(model)

    def _accumulate(
        self, model: nn.Module, micro_batches: Sequence[Batch], loss_fn: LossFn, global_batch_size: int
    ) -> tuple[list[str], torch.Tensor]:
        """Forward and backward of each micro-batch; ``(metric names, [loss sum, size-weighted metric sums])``."""
        totals: list[torch.Tensor] = []
        names: list[str] = []
        for i, micro in enumerate(micro_batches):
            set_gradient_sync(model, i == len(micro_batches) - 1)
            batch = batch_to_device(micro, self.device)
            out = loss_fn(model, batch)
            if out.per_sample.shape != (batch.size,):
                raise ValueError(
                    f"loss_fn returned per_sample of shape {tuple(out.per_sample.shape)}, expected ({batch.size},)"
                )
            (out.per_sample.float().sum() / global_batch_size).backward()
            names = list(out.metrics)
            row = [out.per_sample.detach().float().sum()]
            row += [v.detach().float().to(self.device) * batch.size for v in out.metrics.values()]
            totals.append(torch.stack(row))
        return names, torch.stack(totals).sum(0)

    # State -----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``{"model", "optimizer", "scheduler"[, "ema"]}``, the local runtime's layout with sharded tensors.

        Model and optimizer state are keyed by parameter names and alias the live shards (``DTensor``),
        so ``torch.distributed.checkpoint`` saves them sharded and loads them from any layout (global
        shapes are in its metadata), the local runtime's included. The EMA entry has
        ``AveragedModel``'s keys (``n_averaged``, ``module.<name>``).
        """
        model, optimizer, scheduler = self._parts()
        state: dict[str, Any] = {
            "model": fsdp_state.model_state(model),
            "optimizer": fsdp_state.optimizer_state(model, optimizer),
            "scheduler": scheduler_state(scheduler),
        }
        return state | ({} if self._ema is None else {"ema": self._ema.state_dict()})

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (strict). Collective.

        Without an ``"ema"`` entry while this runtime keeps an EMA, the EMA restarts at the loaded
        weights; an ``"ema"`` entry is ignored when this runtime keeps none.

        Raises:
            ValueError: If an entry is missing or does not match the model.
        """
        model, optimizer, scheduler = self._parts()
        fsdp_state.check_runtime_state(state)
        fsdp_state.load(model, optimizer, state["model"], state["optimizer"])
        load_scheduler_state(scheduler, state["scheduler"])
        if self._ema is not None and "ema" in state:
            self._ema.load_state_dict(state["ema"])
        elif self._ema is not None:
            self._ema.reset(model)

    # Inference and reporting -----------------------------------------------------------------------

    def inference_model(self, use_ema: bool = True) -> nn.Module:
        """The EMA's network when attached and ``use_ema``, else the network; in eval mode.

        Its forward is collective (every rank of the mesh calls it with the same inputs).
        """
        return self._inference_network(use_ema).eval()

    def _inference_network(self, use_ema: bool) -> nn.Module:
        model = self._require_model()
        return self._ema.module if (use_ema and self._ema is not None) else model

    def max_memory_gib(self) -> float:
        """This rank's peak: CUDA memory allocated on its device, else the process's resident set, in GiB."""
        return peak_memory_gib(self.device)

    def close(self) -> None:
        """Destroy the process group if this runtime created it (the mesh and model become unusable)."""
        if self._owns_group:
            destroy()

    def _parts(self) -> tuple[nn.Module, torch.optim.AdamW, LambdaLR]:
        model = self._require_model()
        if self._optimizer is None or self._scheduler is None:
            raise RuntimeError("FSDP2Runtime.attach_optimizer(settings) must be called first")
        return model, self._optimizer, self._scheduler

    def _require_model(self) -> nn.Module:
        if self._model is None:
            raise RuntimeError("FSDP2Runtime.build_network(spec) must be called first")
        return self._model
