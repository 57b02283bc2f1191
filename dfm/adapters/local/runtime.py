"""The ``local`` runtime: one process on the CPU or one GPU (the embedded default).

It is the numerical reference every parallel runtime must reproduce: gradients are accumulated over
micro-batches as ``sum(per_sample) / global_batch_size``, so any micro-batch split of a global batch
gives the gradient of the whole batch; weights and AdamW state stay in fp32 and bf16 enters only
through ``torch.autocast``. A network built to sample with (``inference_dtype``) is allocated once, on the
device and in that dtype, and filled from a checkpoint's or exported weights; it never gets optimizer state.
"""

from __future__ import annotations

import contextlib
import math
import resource
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import AveragedModel

from dfm.adapters.local.ema import EMA_PREFIX, build_ema, reset_ema
from dfm.adapters.local.state import load_model_and_optimizer_state, model_and_optimizer_state
from dfm.adapters.torch_dist.checkpointing import apply_activation_checkpointing
from dfm.adapters.torch_dist.devices import batch_to_device
from dfm.adapters.torch_dist.optim import build_adamw
from dfm.adapters.torch_dist.schedule import (
    build_scheduler,
    check_optimizer_settings,
    load_scheduler_state,
    scheduler_state,
)
from dfm.adapters.torch_dist.state import check_compatible
from dfm.domain.batch import Batch
from dfm.domain.networks.attention import SDPAAttention
from dfm.domain.networks.registry import network_class
from dfm.domain.specs import ModelSpec
from dfm.ports.runtime import LossFn, OptimizerSettings, StepResult, Topology, WeightsReader

Precision = Literal["auto", "fp32", "bf16"]
ActivationCheckpointing = Literal["off", "full", "selective"]

_PRECISIONS = ("auto", "fp32", "bf16")
_CHECKPOINTING = ("off", "full", "selective")


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> the current CUDA device if there is one, else the CPU; other names are checked.

    Raises:
        ValueError: For an unknown device name, or a CUDA device when none is visible.
    """
    if device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from err
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but no CUDA device is visible; use 'cpu' or 'auto'")
        index = torch.cuda.current_device() if resolved.index is None else resolved.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} asked for, but only {torch.cuda.device_count()} CUDA devices exist")
        resolved = torch.device("cuda", index)
    return resolved


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: ``"auto"`` is bf16 on CUDA and fp32 (no autocast, ``None``) elsewhere.

    Raises:
        ValueError: For an unknown precision.
    """
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {_PRECISIONS}, got {precision!r}")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def build_network(spec: ModelSpec, attention: SDPAAttention, generator: torch.Generator) -> nn.Module:
    """The domain network of ``spec`` (WAN or DiT), initialised from ``generator`` on the CPU.

    Raises:
        ValueError: For a spec of another architecture.
    """
    return network_class(spec)(spec, attention=attention, generator=generator)


def empty_network(spec: ModelSpec, attention: SDPAAttention, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The network of ``spec`` allocated on ``device`` in ``dtype`` and not initialised; eval mode, no gradients.

    It is built on the meta device, so the weights are allocated once, where and as they will be used. The parts
    the network declares in ``fp32_modules`` stay float32 (a checkpoint loads into them cast to float32).

    Raises:
        ValueError: For a spec of another architecture, or a ``dtype`` that is not a floating type.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"the inference dtype must be a floating type such as torch.bfloat16, got {dtype}")
    with torch.device("meta"):
        model = network_class(spec)(spec, attention=attention, generator=None).to(dtype)
    keep = set(getattr(model, "fp32_modules", ()))
    for name, param in model.named_parameters():
        if keep & set(name.split(".")):  # the network's declared float32 parts (its norms, time embedding...)
            param.data = param.data.float()
    return model.to_empty(device=device).requires_grad_(False).eval()


class LocalRuntime:
    """One process, one device: the network, then (to train) AdamW, the LR schedule and an optional EMA.

    Args:
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        precision: ``"auto"`` (bf16 autocast on CUDA, fp32 on CPU), ``"fp32"`` or ``"bf16"`` (autocast;
            weights, gradients and optimizer state stay fp32).
        grad_clip: Clip the global gradient norm to this value; ``None`` disables clipping.
        ema_decay: Keep an EMA of the weights with this decay (see :mod:`dfm.adapters.local.ema`); ``None``: none.
        activation_checkpointing: ``"off"``, ``"full"`` (recompute whole blocks in the backward pass) or
            ``"selective"`` (recompute them but keep the attention outputs).
        checkpoint_every: With ``"full"``, checkpoint every k-th block only (1 = all blocks).
        attention_backend: SDPA backend (``"auto"``, ``"math"``, ``"flash"``, ``"efficient"``, ``"cudnn"``).
        seed: Seed of the initial weights (the same seed always gives the same weights).

    Raises:
        ValueError: For an invalid choice of any argument.
    """

    def __init__(
        self,
        *,
        device: str = "auto",
        precision: Precision = "auto",
        grad_clip: float | None = 1.0,
        ema_decay: float | None = None,
        activation_checkpointing: ActivationCheckpointing = "off",
        checkpoint_every: int = 1,
        attention_backend: str = "auto",
        seed: int = 0,
    ) -> None:
        self.device = resolve_device(device)
        self.autocast_dtype = resolve_precision(precision, self.device)
        _check_options(grad_clip, ema_decay, activation_checkpointing, checkpoint_every)
        self.attention = SDPAAttention(attention_backend)
        self.grad_clip = grad_clip
        self.ema_decay = ema_decay
        self.activation_checkpointing = activation_checkpointing
        self.checkpoint_every = checkpoint_every
        self.seed = seed
        self.topology = Topology(device=str(self.device))
        self._model: nn.Module | None = None
        self._optimizer: torch.optim.AdamW | None = None
        self._scheduler: LambdaLR | None = None
        self._ema: AveragedModel | None = None
        self._inference = False

    # Building --------------------------------------------------------------------------------------

    def build_network(self, spec: ModelSpec, *, inference_dtype: torch.dtype | None = None) -> nn.Module:
        """Build the network of ``spec`` on :attr:`device`, alone (no optimizer state, no EMA).

        Args:
            spec: The architecture (``WanSpec`` or ``DiTSpec``).
            inference_dtype: ``None``: the network to train, fp32 weights drawn from the seed, in train mode.
                A dtype: the network to sample with, built on the meta device and allocated on :attr:`device`
                in that dtype without initialising it (load its weights next), in eval mode, no gradients.
                Building again replaces the network and drops an attached optimizer and EMA.

        Returns:
            The network.

        Raises:
            ValueError: For an unknown architecture or a non-floating ``inference_dtype``.
        """
        self._optimizer, self._scheduler, self._ema = None, None, None  # building again starts over
        if inference_dtype is None:
            generator = torch.Generator(device="cpu").manual_seed(self.seed)
            model = build_network(spec, self.attention, generator).to(self.device).train()
        else:
            model = empty_network(spec, self.attention, self.device, inference_dtype)
        self._model, self._inference = model, inference_dtype is not None
        return model

    def attach_optimizer(self, settings: OptimizerSettings) -> None:
        """Attach AdamW, the LR schedule and the EMA (when ``ema_decay`` is set), and apply activation checkpointing.

        Raises:
            ValueError: For invalid optimizer settings.
            RuntimeError: Before :meth:`build_network`, for a network built for inference, or a second time.
        """
        model = self._require_model()
        if self._inference:
            raise RuntimeError("a network built with an inference_dtype takes no optimizer; build one to train")
        if self._optimizer is not None:
            raise RuntimeError("LocalRuntime.attach_optimizer was already called")
        check_optimizer_settings(settings)
        self._optimizer = build_adamw(model, settings, fused=self._fused)
        self._scheduler = build_scheduler(self._optimizer, settings)
        self._ema = None if self.ema_decay is None else build_ema(model, self.ema_decay)
        if self.activation_checkpointing != "off":
            apply_activation_checkpointing(
                model, model.parallel_plan.blocks, self.checkpoint_every, self.activation_checkpointing
            )

    # Weights ---------------------------------------------------------------------------------------

    def weights(self, use_ema: bool = True) -> dict[str, torch.Tensor]:
        """``{name: tensor}`` of the EMA's network (when attached and ``use_ema``) or the network, aliasing them."""
        return self._inference_network(use_ema).state_dict()

    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Load whole weights (e.g. imported diffusers weights) into the network; strict; cast to its dtype.

        With an optimizer attached this must come before the first step, and the EMA restarts at these weights.

        Raises:
            ValueError: Naming the missing and unexpected keys and the shape mismatches, if any.
            RuntimeError: Before :meth:`build_network`, or after a step was taken.
        """
        model = self._require_model()
        self._check_fresh()
        check_compatible(model.state_dict(), weights, "initial weights")
        model.load_state_dict(dict(weights), strict=True)
        if self._ema is not None:
            reset_ema(self._ema, model)

    def restore_weights(self, read: WeightsReader, *, use_ema: bool = True) -> Literal["ema", "model"]:
        """Load a checkpoint's EMA weights (when ``ema_decay`` is set and ``use_ema``) or model weights.

        ``read`` fills ``{"ema": {"module.<name>": tensor}}`` or ``{"model": {"<name>": tensor}}`` (this runtime's
        :meth:`state_dict` layout), whose tensors are the network's own; nothing else is read. Any runtime's
        DCP checkpoint fits: the store reshards and casts into these tensors.

        Returns:
            ``"ema"`` or ``"model"``.

        Raises:
            RuntimeError: Before :meth:`build_network`, or after a step was taken.
        """
        model = self._require_model()
        self._check_fresh()
        which: Literal["ema", "model"] = "ema" if use_ema and self.ema_decay is not None else "model"
        prefix = EMA_PREFIX if which == "ema" else ""
        own = model.state_dict()
        state: dict[str, Any] = {which: {prefix + name: tensor for name, tensor in own.items()}}
        read(state)
        loaded = {name.removeprefix(prefix): tensor for name, tensor in state[which].items()}
        changed = {name: tensor for name, tensor in loaded.items() if tensor is not own[name]}
        if changed:  # a reader that returns new tensors instead of filling the given ones
            check_compatible(own, loaded, "checkpointed weights")
            model.load_state_dict(loaded, strict=True)
        if self._ema is not None:
            reset_ema(self._ema, model)
        return which

    def _check_fresh(self) -> None:
        if self._scheduler is not None and self._scheduler.last_epoch > 0:
            raise RuntimeError("weights load before the first train_step; to resume a run use load_state_dict")

    # Training --------------------------------------------------------------------------------------

    def train_step(self, micro_batches: Sequence[Batch], loss_fn: LossFn, global_batch_size: int) -> StepResult:
        """Accumulate gradients over ``micro_batches``, clip, and step (or skip a non-finite step).

        Each micro-batch contributes ``sum(per_sample) / global_batch_size`` to the backward pass, so the
        gradient is that of the mean loss over the global batch, whatever the split. A step whose loss
        or gradient norm is not finite changes nothing (weights, optimizer, schedule and EMA) and is
        reported with ``skipped=True``.

        Args:
            micro_batches: This step's micro-batches (together, the global batch).
            loss_fn: ``(model, batch) -> LossOutput`` (the domain objective bound to this step).
            global_batch_size: Samples in the global batch; must equal the sum of the micro-batch sizes.

        Returns:
            Mean loss, gradient norm before clipping, the learning rate used and mean metrics.

        Raises:
            ValueError: If the micro-batches are empty or their sizes do not add up to ``global_batch_size``.
        """
        model, optimizer, scheduler = self._training_parts()
        _check_batch_sizes(micro_batches, global_batch_size)
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss_sum, metric_sums = self._accumulate(model, micro_batches, loss_fn, global_batch_size)
        grad_norm = self._grad_norm(model)
        lr = float(optimizer.param_groups[0]["lr"])
        values = torch.stack([loss_sum, grad_norm.float(), *metric_sums.values()]).tolist()  # one device sync
        loss, norm = values[0] / global_batch_size, values[1]
        metrics = {k: v / global_batch_size for k, v in zip(metric_sums, values[2:], strict=True)}
        if not (math.isfinite(loss) and math.isfinite(norm)):
            optimizer.zero_grad(set_to_none=True)
            return StepResult(loss=loss, grad_norm=norm, lr=lr, skipped=True, metrics=metrics)
        optimizer.step()
        scheduler.step()
        if self._ema is not None:
            self._ema.update_parameters(model)
        return StepResult(loss=loss, grad_norm=norm, lr=lr, metrics=metrics)

    def _accumulate(
        self, model: nn.Module, micro_batches: Sequence[Batch], loss_fn: LossFn, global_batch_size: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward and backward over each micro-batch; returns the loss sum and size-weighted metric sums."""
        loss_sum = torch.zeros((), device=self.device)
        metric_sums: dict[str, torch.Tensor] = {}
        for micro in micro_batches:
            batch = batch_to_device(micro, self.device)
            with self._autocast():
                out = loss_fn(model, batch)
            if out.per_sample.shape != (batch.size,):
                raise ValueError(
                    f"loss_fn returned per_sample of shape {tuple(out.per_sample.shape)}, expected ({batch.size},)"
                )
            (out.per_sample.float().sum() / global_batch_size).backward()
            loss_sum += out.per_sample.detach().float().sum()
            for name, value in out.metrics.items():
                weighted = value.detach().float().to(self.device) * batch.size
                metric_sums[name] = metric_sums[name] + weighted if name in metric_sums else weighted
        return loss_sum, metric_sums

    def _grad_norm(self, model: nn.Module) -> torch.Tensor:
        """The global gradient norm before clipping; clips in place to :attr:`grad_clip` when set."""
        max_norm = math.inf if self.grad_clip is None else self.grad_clip
        params = [p for p in model.parameters() if p.grad is not None]
        if not params:
            return torch.zeros((), device=self.device)
        return torch.nn.utils.clip_grad_norm_(params, max_norm=max_norm, error_if_nonfinite=False, foreach=True)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    # State -----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``{"model", "optimizer", "scheduler"[, "ema"]}``: nested dicts of tensors and primitives.

        Model and optimizer state are keyed by fully-qualified parameter names (the layout of
        ``torch.distributed.checkpoint.state_dict``, as FSDP2 writes it) and alias the live tensors, so
        ``torch.distributed.checkpoint.load`` into this dict followed by :meth:`load_state_dict` restores
        a run. The EMA entry is ``AveragedModel.state_dict()`` (``n_averaged`` and ``module.<name>``).
        """
        model, optimizer, scheduler = self._training_parts()
        model_state, optimizer_state = model_and_optimizer_state(model, optimizer)
        state: dict[str, Any] = {
            "model": model_state,
            "optimizer": optimizer_state,
            "scheduler": scheduler_state(scheduler),
        }
        if self._ema is not None:
            state["ema"] = self._ema.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (strict; tensors are copied).

        Without an ``"ema"`` entry while this runtime keeps an EMA, the EMA restarts at the loaded
        weights; an ``"ema"`` entry is ignored when this runtime keeps none.

        Raises:
            ValueError: If an entry is missing or does not match the model.
        """
        model, optimizer, scheduler = self._training_parts()
        missing = [k for k in ("model", "optimizer", "scheduler") if k not in state]
        if missing:
            raise ValueError(f"runtime state lacks {missing} (has {sorted(state)}); is it a dfm training checkpoint?")
        load_model_and_optimizer_state(model, optimizer, state["model"], state["optimizer"])
        load_scheduler_state(scheduler, state["scheduler"])
        if self._ema is None:
            return
        if "ema" not in state:
            reset_ema(self._ema, model)
            return
        check_compatible(self._ema.state_dict(), state["ema"], "checkpointed EMA weights")
        self._ema.load_state_dict(dict(state["ema"]))

    # Inference and reporting -----------------------------------------------------------------------

    def inference_model(self, use_ema: bool = True) -> nn.Module:
        """The EMA's network when attached and ``use_ema``, else the network; in eval mode."""
        return self._inference_network(use_ema).eval()

    def _inference_network(self, use_ema: bool) -> nn.Module:
        model = self._require_model()
        return self._ema.module if (use_ema and self._ema is not None) else model

    def max_memory_gib(self) -> float:
        """Peak CUDA memory allocated on the device, or the process's peak RSS on the CPU, in GiB."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**30 if sys.platform == "darwin" else peak / 2**20  # bytes on macOS, KiB on Linux

    def close(self) -> None:
        """Nothing to release: one process, no process group."""

    @property
    def _fused(self) -> bool:
        return self.device.type == "cuda"

    def _require_model(self) -> nn.Module:
        if self._model is None:
            raise RuntimeError("LocalRuntime.build_network(spec) must be called first")
        return self._model

    def _training_parts(self) -> tuple[nn.Module, torch.optim.AdamW, LambdaLR]:
        model = self._require_model()
        if self._optimizer is None or self._scheduler is None:
            raise RuntimeError("LocalRuntime.attach_optimizer(settings) must be called first")
        return model, self._optimizer, self._scheduler


def _check_options(grad_clip: float | None, ema_decay: float | None, checkpointing: str, every: int) -> None:
    """Validate the constructor's numeric and choice arguments (``ValueError`` naming the argument)."""
    if grad_clip is not None and not grad_clip > 0:
        raise ValueError(f"grad_clip must be > 0 or None, got {grad_clip}")
    if ema_decay is not None and not 0.0 < ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in (0, 1) or None, got {ema_decay}")
    if checkpointing not in _CHECKPOINTING:
        raise ValueError(f"activation_checkpointing must be one of {_CHECKPOINTING}, got {checkpointing!r}")
    if every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {every}")


def _check_batch_sizes(micro_batches: Sequence[Batch], global_batch_size: int) -> None:
    total = sum(b.size for b in micro_batches)
    if not micro_batches or total != global_batch_size:
        raise ValueError(
            f"the local runtime sees the whole global batch: the {len(micro_batches)} micro-batches hold {total} "
            f"samples but global_batch_size is {global_batch_size}"
        )
