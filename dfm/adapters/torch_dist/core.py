"""The training step and state every runtime shares; each engine fills in what it does differently.

:class:`TrainingCore` implements the :class:`~dfm.ports.runtime.ParallelRuntime` port once:

- the micro-batch contract (:class:`Tally`): each micro-batch backpropagates ``sum(per_sample) /
  global_batch_size`` (so any split of a global batch over micro-batches and data-parallel ranks gives the
  gradient of the whole batch's mean loss), its per-sample loss has one entry per sample, and its metrics
  are summed weighted by its size;
- the reduction of those sums over the data-parallel ranks, and the non-finite decision, made on reduced
  values so every rank skips a step alike;
- the order clip -> optimizer step -> schedule -> EMA, the learning-rate :class:`~.schedule.Schedule` and one
  :class:`~.ema.EMA`;
- weights apart from training state (build the network, attach the optimizer, read and load weights), and
  the ``{"model", "optimizer", "scheduler"[, "ema"]}`` state layout with its checks.

An engine (``local``, ``fsdp2``, ``megatron``) subclasses it and implements the hooks: build (and shard) the
network, attach its optimizer, run the micro-batches (megatron keeps its pipeline schedule there), reduce
sums over its groups, the gradient norm, clipping and the optimizer step, and its sharded state. The
defaults of the optimizer hooks serve a ``torch.optim`` optimizer over the network's own parameters
(``local``, ``fsdp2``).
"""

from __future__ import annotations

import abc
import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from dfm.adapters.torch_dist.devices import batch_to_device, check_rank_share, peak_memory_gib
from dfm.adapters.torch_dist.ema import EMA, PREFIX, check_decay, local_part
from dfm.adapters.torch_dist.grads import clip_grads, total_grad_norm
from dfm.adapters.torch_dist.lora import is_adapter, peft_names
from dfm.adapters.torch_dist.schedule import Schedule
from dfm.domain.batch import Batch
from dfm.domain.objective import LossOutput
from dfm.domain.specs import ModelSpec
from dfm.ports.runtime import LoraSettings, LossFn, OptimizerSettings, StepResult, Topology, WeightsReader

Which = Literal["ema", "model"]
PRECISIONS = ("auto", "fp32", "bf16")
CHECKPOINTING = ("off", "full", "selective", "selective_matmul")
STATE_ENTRIES = ("model", "optimizer", "scheduler")
"""The entries every runtime's :meth:`TrainingCore.state_dict` has (``"ema"`` too when it keeps one)."""


def check_options(
    *, precision: str, grad_clip: float | None, ema_decay: float | None, checkpointing: str, every_k: int
) -> None:
    """Validate the ``train.*`` options every runtime takes; one ``ValueError`` naming each bad key."""
    problems = [
        None if precision in PRECISIONS else f"train.precision must be one of {PRECISIONS}, got {precision!r}",
        None if grad_clip is None or grad_clip > 0 else f"train.grad_clip must be > 0 or None, got {grad_clip}",
        None
        if checkpointing in CHECKPOINTING
        else f"train.activation_checkpointing must be one of {CHECKPOINTING}, got {checkpointing!r}",
        None if every_k >= 1 else f"train.activation_checkpointing_every_k must be >= 1, got {every_k}",
    ]
    try:
        check_decay(ema_decay)
    except ValueError as err:
        problems.append(str(err))
    if any(problems):
        raise ValueError("; ".join(p for p in problems if p))


def compute_dtype(precision: str, device_type: str) -> torch.dtype:
    """The dtype training computes in: ``"auto"`` is bf16 on CUDA and float32 elsewhere."""
    if precision == "bf16" or (precision == "auto" and device_type == "cuda"):
        return torch.bfloat16
    return torch.float32


def check_inference_dtype(dtype: torch.dtype | None) -> None:
    """Raise ``ValueError`` unless ``dtype`` is ``None`` or a floating dtype."""
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"the inference dtype must be a floating type such as torch.bfloat16, got {dtype}")


class Tally:
    """This rank's loss and size-weighted metric sums over its micro-batches: the micro-batch contract.

    Args:
        device: Where the sums live.
        global_batch_size: Samples over every data-parallel rank and micro-batch.
    """

    def __init__(self, device: torch.device, global_batch_size: int) -> None:
        self.device = device
        self.global_batch_size = global_batch_size
        self.names: list[str] = []
        self.rows: list[torch.Tensor] = []

    def add(self, out: LossOutput, size: int) -> torch.Tensor:
        """Record a micro-batch of ``size`` samples; returns what it backpropagates, ``sum(per_sample) / G``.

        Raises:
            ValueError: If ``out.per_sample`` does not hold one loss per sample.
        """
        if out.per_sample.shape != (size,):
            raise ValueError(f"loss_fn returned per_sample of shape {tuple(out.per_sample.shape)}, expected ({size},)")
        self.names = list(out.metrics)
        row = [out.per_sample.detach().float().sum()]
        row += [v.detach().float().to(self.device) * size for v in out.metrics.values()]
        self.rows.append(torch.stack(row))
        return out.per_sample.float().sum() / self.global_batch_size

    def sums(self, width: int | None = None) -> torch.Tensor:
        """``[loss sum, metric sums...]`` (zeros of ``1 + width`` entries where no micro-batch was recorded)."""
        if self.rows:
            return torch.stack(self.rows).sum(0)
        return torch.zeros(1 + (width if width is not None else len(self.names)), device=self.device)


class TrainingCore(abc.ABC):
    """The :class:`~dfm.ports.runtime.ParallelRuntime` port over an engine's hooks (see the module docstring).

    Args:
        grad_clip: Clip the global gradient norm to this; ``None`` disables clipping.
        ema_decay: Keep an EMA of the weights with this decay; ``None``: none.
        seed: Seed of the initial weights (the same seed gives the same weights in every runtime).
        lora: Train LoRA adapters on the frozen network (:mod:`dfm.adapters.torch_dist.lora`); ``None``: all weights.
            The optimizer, the EMA and the state's ``model`` entry then hold the adapters alone.
    """

    topology: Topology
    device: torch.device
    schedule_key = "last_epoch"
    """The name of the step counter in the state's ``"scheduler"`` entry."""

    def __init__(
        self, *, grad_clip: float | None, ema_decay: float | None, seed: int, lora: LoraSettings | None = None
    ) -> None:
        self.grad_clip, self.ema_decay, self.seed, self.lora = grad_clip, ema_decay, seed, lora
        self._schedule: Schedule | None = None
        self._ema: EMA | None = None
        self._ema_network: nn.Module | None = None
        self._built = False
        self._inference = False

    # Hooks every engine implements ------------------------------------------------------------------

    @abc.abstractmethod
    def _build(self, spec: ModelSpec, inference_dtype: torch.dtype | None) -> nn.Module:
        """Build (and shard) the network; drop what an earlier build attached. Returns the port's network."""

    @abc.abstractmethod
    def _attach(self, settings: OptimizerSettings) -> None:
        """Build the optimizer (and what training adds: DDP buffers, activation checkpointing)."""

    @abc.abstractmethod
    def _named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, parameter)`` of this rank's weights, named as in the whole network."""

    @abc.abstractmethod
    def _average(self) -> tuple[dict[str, torch.Tensor], nn.Module | None]:
        """The tensors that hold the EMA (by name), and the network they belong to when there is one."""

    @abc.abstractmethod
    def _model_and_optimizer_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """This rank's model and optimizer state in the engine's checkpoint format (aliasing live tensors)."""

    @abc.abstractmethod
    def _load_model_and_optimizer(self, model: Mapping[str, Any], optimizer: Mapping[str, Any]) -> None:
        """Restore what :meth:`_model_and_optimizer_state` described (strict)."""

    @abc.abstractmethod
    def _weight_leaves(self, which: Which) -> dict[str, torch.Tensor]:
        """The network's weights by name as the checkpoint entries ``which`` holds them, aliasing them."""

    @abc.abstractmethod
    def _set_weights(self, loaded: Mapping[str, torch.Tensor], *, whole: bool) -> None:
        """Copy ``loaded`` (by name; ``whole``: unsharded tensors on every rank) into the network; strict."""

    # Hooks with defaults for a torch.optim optimizer over the network (local, fsdp2) ------------------

    _optimizer: Any = None
    _network: nn.Module | None = None

    def _micro_context(self, index: int, count: int) -> contextlib.AbstractContextManager:
        """What the ``index``-th of ``count`` micro-batches runs in (autocast, gradient sync...)."""
        return contextlib.nullcontext()

    def _run_micro_batches(self, batches: Sequence[Batch], loss_fn: LossFn, tally: Tally) -> None:
        """Forward and backward of each micro-batch, in order, each moved to the device when its turn comes."""
        for i, micro in enumerate(batches):
            batch = batch_to_device(micro, self.device)
            with self._micro_context(i, len(batches)):
                out = loss_fn(self._network, batch)
            tally.add(out, batch.size).backward()

    def _reduce(self, tally: Tally) -> tuple[list[str], torch.Tensor]:
        """``(metric names, [loss sum, metric sums...])`` over the job's data-parallel ranks."""
        return tally.names, tally.sums()

    def _set_lr(self, lr: float) -> None:
        for group in self._optimizer.param_groups:
            group["lr"] = lr

    def _begin_step(self) -> None:
        self._network.train()
        self._optimizer.zero_grad(set_to_none=True)

    def _grad_norm(self) -> tuple[torch.Tensor, bool]:
        """The global gradient norm before clipping, and whether the engine found inf/nan gradients itself."""
        return total_grad_norm(list(self._network.parameters()), self.device), False

    def _clip(self, max_norm: float, norm: torch.Tensor) -> None:
        clip_grads(list(self._network.parameters()), max_norm, norm)

    def _optimizer_step(self) -> None:
        self._optimizer.step()

    def _skip(self) -> None:
        self._optimizer.zero_grad(set_to_none=True)

    def _weights_loaded(self) -> None:
        """The network's weights were replaced outside training (before the first step)."""
        return None

    def _inference_network(self, use_ema: bool) -> nn.Module:
        self._require_built()
        return self._ema_network if use_ema and self._ema_network is not None else self._network

    # Building ---------------------------------------------------------------------------------------

    def build_network(self, spec: ModelSpec, *, inference_dtype: torch.dtype | None = None) -> nn.Module:
        """Build the network of ``spec`` alone (no optimizer state, no EMA); see the port. Collective.

        Building again replaces the network and drops an attached optimizer and EMA.

        Raises:
            ValueError: For an unknown architecture, a non-floating ``inference_dtype``, or a layout the
                model's sizes do not divide (naming the ``parallel.*`` keys).
        """
        check_inference_dtype(inference_dtype)
        self._schedule, self._ema, self._ema_network, self._optimizer = None, None, None, None
        network = self._build(spec, inference_dtype)
        self._built, self._inference = True, inference_dtype is not None
        return network

    def attach_optimizer(self, settings: OptimizerSettings) -> None:
        """Attach the optimizer, the LR schedule and (with ``ema_decay``) the EMA started at the weights. Collective.

        Raises:
            ValueError: For invalid optimizer settings.
            RuntimeError: Before :meth:`build_network`, for a network built for inference, or a second time.
        """
        self._require_built()
        if self._inference:
            raise RuntimeError("a network built with an inference_dtype takes no optimizer; build one to train")
        if self._schedule is not None:
            raise RuntimeError(f"{type(self).__name__}.attach_optimizer was already called")
        schedule = Schedule(settings, key=self.schedule_key)  # validates the settings first
        self._attach(settings)
        self._schedule = schedule
        self._set_lr(schedule.lr())
        if self.ema_decay is not None:
            average, self._ema_network = self._adapter_average() if self.lora is not None else self._average()
            self._ema = EMA(average, self.ema_decay)
            self._ema.reset(self._named_parameters())

    def _adapter_average(self) -> tuple[dict[str, torch.Tensor], None]:
        """Float32 copies of the trained (adapter) parameters, sharded like them: the EMA of a LoRA run."""
        with torch.no_grad():
            trained = {n: p.detach().float().clone() for n, p in self._named_parameters() if p.requires_grad}
        return trained, None

    # Weights ----------------------------------------------------------------------------------------

    def weights(self, use_ema: bool = True) -> dict[str, torch.Tensor]:
        """This rank's weights by name, aliasing them: the EMA's when attached and ``use_ema``, else the network's.

        With LoRA: every parameter under peft's names, the adapters' from the EMA when it is used.
        """
        self._require_built()
        own = {name: param.detach() for name, param in self._named_parameters()}
        if use_ema and self._ema is not None:
            return own | dict(self._ema.average) if self.lora is not None else dict(self._ema.average)
        return own

    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Load whole weights held by every rank (imported diffusers weights, say); strict. Collective.

        Each rank keeps its part, cast to the network's dtype. With an optimizer attached only before the
        first step, and the EMA restarts at these weights. A LoRA runtime takes the base weights (the network's
        own names), the adapters (peft's names, ``...lora_A.default.weight``) or both; a group left out stays.

        Raises:
            ValueError: Naming the missing and unexpected keys and the shape mismatches, if any.
            RuntimeError: Before :meth:`build_network`, or once a step was taken.
        """
        self._require_fresh()
        if self.lora is not None:
            weights = self._with_adapters(weights)
        self._set_weights(weights, whole=True)
        self._after_weights_loaded()

    def _with_adapters(self, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Whole weights for the LoRA network from the base's (the network's names), the adapters' (peft's) or both.

        A group that ``weights`` lacks entirely keeps the network's current values; a partial group is an error.
        """
        renamed = peft_names(weights, self._network)
        given = {is_adapter(name) for name in renamed}
        with torch.no_grad():
            for name, param in self._named_parameters():
                if is_adapter(name) not in given:
                    renamed[name] = param.full_tensor() if hasattr(param, "full_tensor") else param.detach()
        return renamed

    def restore_weights(self, read: WeightsReader, *, use_ema: bool = True) -> Which:
        """Load a checkpoint's EMA weights (when ``ema_decay`` is set and ``use_ema``) or model weights. Collective.

        ``read`` fills ``{"ema": {"module.<name>": tensor}}`` or ``{"model": {"<name>": tensor}}`` (the layout of
        :meth:`state_dict`), whose tensors are this rank's parts of the network: the store reshards any
        runtime's checkpoint into them. No optimizer state is read.

        Returns:
            ``"ema"`` or ``"model"``.

        Raises:
            RuntimeError: Before :meth:`build_network`, or once a step was taken.
        """
        self._require_fresh()
        if self.lora is not None:
            raise RuntimeError(
                "a LoRA runtime's checkpoints hold the adapters alone: resume with load_state_dict, or sample "
                "the base weights with the adapters merged (convert merge-lora, generate --lora)"
            )
        which: Which = "ema" if use_ema and self.ema_decay is not None else "model"
        prefix = PREFIX if which == "ema" else ""
        state: dict[str, Any] = {which: {prefix + k: v for k, v in self._weight_leaves(which).items()}}
        read(state)
        self._set_weights({name.removeprefix(prefix): t for name, t in state[which].items()}, whole=False)
        self._after_weights_loaded()
        return which

    def _after_weights_loaded(self) -> None:
        self._weights_loaded()
        if self._ema is not None:
            self._ema.reset(self._named_parameters())

    # Training ---------------------------------------------------------------------------------------

    def train_step(self, micro_batches: Sequence[Batch], loss_fn: LossFn, global_batch_size: int) -> StepResult:
        """Forward/backward over this rank's micro-batches, reduce, clip, step (or skip a non-finite step).

        Collective. A step whose loss or gradient norm is not finite changes nothing (weights, optimizer,
        schedule, EMA) and is reported with ``skipped=True``.

        Args:
            micro_batches: This data-parallel rank's micro-batches (the same on its context/tensor peers).
            loss_fn: ``(model, batch) -> LossOutput`` (the domain objective bound to this step).
            global_batch_size: Samples over all data-parallel ranks and micro-batches.

        Returns:
            Mean loss, gradient norm before clipping, the learning rate used and mean metrics.

        Raises:
            ValueError: If the micro-batches are empty or do not hold this rank's share of the batch.
        """
        schedule = self._require_optimizer()
        check_rank_share(micro_batches, global_batch_size, self.topology.dp_size)
        lr = schedule.lr()
        self._set_lr(lr)
        self._begin_step()
        tally = Tally(self.device, global_batch_size)
        self._run_micro_batches(micro_batches, loss_fn, tally)
        names, sums = self._reduce(tally)
        norm, found_inf = self._grad_norm()
        values = torch.cat([sums.double(), norm.reshape(1).double().to(sums.device)]).tolist()  # one device sync
        loss, grad_norm = values[0] / global_batch_size, values[-1]
        metrics = {name: v / global_batch_size for name, v in zip(names, values[1:-1], strict=True)}
        finite = math.isfinite(loss) and math.isfinite(grad_norm) and not found_inf  # reduced: all ranks alike
        if not finite:
            self._skip()
            return StepResult(loss=loss, grad_norm=grad_norm, lr=lr, skipped=True, metrics=metrics)
        if self.grad_clip is not None:
            self._clip(self.grad_clip, norm)
        self._optimizer_step()
        schedule.advance()
        self._set_lr(schedule.lr())  # the groups hold the next step's rate, as after LambdaLR.step()
        if self._ema is not None:
            self._ema.update(self._named_parameters())
        return StepResult(loss=loss, grad_norm=grad_norm, lr=lr, metrics=metrics)

    # State ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``{"model", "optimizer", "scheduler"[, "ema"]}``, aliasing the live (sharded) tensors.

        Model and optimizer state are keyed by parameter names, so a checkpoint store loads them in place
        from any runtime's checkpoint; the EMA entry has ``AveragedModel``'s keys (``n_averaged``,
        ``module.<name>``); the scheduler entry is the step counter.
        """
        schedule = self._require_optimizer()
        model, optimizer = self._model_and_optimizer_state()
        state: dict[str, Any] = {"model": model, "optimizer": optimizer, "scheduler": schedule.state_dict()}
        if self._ema is not None:
            state["ema"] = self._ema_state(self._ema)
        return state

    def _ema_state(self, ema: EMA) -> dict[str, Any]:
        return ema.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (strict). Collective.

        Without an ``"ema"`` entry while this runtime keeps an EMA, the EMA restarts at the loaded weights;
        an ``"ema"`` entry is ignored when this runtime keeps none. The optimizer's settings (rates, betas,
        weight decay) stay the current config's; the schedule goes on from the saved step.

        Raises:
            ValueError: If an entry is missing or does not match the model.
        """
        schedule = self._require_optimizer()
        missing = [k for k in STATE_ENTRIES if k not in state]
        if missing:
            raise ValueError(f"runtime state lacks {missing} (has {sorted(state)}); is it a dfm training checkpoint?")
        self._load_model_and_optimizer(state["model"], state["optimizer"])
        schedule.load_state_dict(state["scheduler"])
        self._set_lr(schedule.lr())
        if self._ema is not None and "ema" in state:
            self._ema.load_state_dict(state["ema"])
        elif self._ema is not None:
            self._ema.reset(self._named_parameters())

    # Inference and reporting ------------------------------------------------------------------------

    def inference_model(self, use_ema: bool = True) -> nn.Module:
        """The EMA's network when attached and ``use_ema``, else the network; in eval mode."""
        return self._inference_network(use_ema).eval()

    @contextlib.contextmanager
    def sampling_model(self, use_ema: bool = True) -> Iterator[nn.Module]:
        """The network to sample with in the middle of training (collective: every rank enters), without gradients.

        The EMA's weights when kept and ``use_ema`` (under LoRA the EMA's adapters are copied into the network
        meanwhile and the trained ones copied back after); eval mode meanwhile. Nothing of the training state
        changes: weights, optimizer, schedule, EMA and the RNG streams are as before.
        """
        model = self._inference_network(use_ema)
        swap = self.lora is not None and use_ema and self._ema is not None
        params = dict(self._named_parameters()) if swap else {}
        saved: list[torch.Tensor] = []
        with torch.no_grad():
            if swap:
                assert self._ema is not None
                live = [local_part(params[name]) for name in self._ema.average]
                saved = [t.clone() for t in live]
                torch._foreach_copy_(live, [local_part(t) for t in self._ema.average.values()])
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                yield model
        finally:
            model.train(was_training)
            if swap:
                with torch.no_grad():
                    torch._foreach_copy_([local_part(params[name]) for name in self._ema.average], saved)

    def max_memory_gib(self) -> float:
        """This rank's peak: CUDA memory allocated on its device, else the process's resident set, in GiB."""
        return peak_memory_gib(self.device)

    def close(self) -> None:
        """Release what the runtime created (nothing by default)."""
        return None

    # Guards -----------------------------------------------------------------------------------------

    def _require_built(self) -> None:
        if not self._built:
            raise RuntimeError(f"{type(self).__name__}.build_network(spec) must be called first")

    def _require_optimizer(self) -> Schedule:
        self._require_built()
        if self._schedule is None:
            raise RuntimeError(f"{type(self).__name__}.attach_optimizer(settings) must be called first")
        return self._schedule

    def _require_fresh(self) -> None:
        self._require_built()
        if self._schedule is not None and self._schedule.step > 0:
            raise RuntimeError("weights load before the first train_step; to resume a run use load_state_dict")
