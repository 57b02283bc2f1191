"""How and where training runs: the ``ParallelRuntime`` port and the values that cross it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import attrs
import torch
from torch import nn

from dfm.domain.batch import Batch
from dfm.domain.objective import LossOutput
from dfm.domain.specs import ModelSpec

LossFn = Callable[[nn.Module, Batch], LossOutput]
"""Computes one micro-batch's loss with the runtime's model (the domain objective, bound to a step)."""


@attrs.frozen(kw_only=True)
class Topology:
    """Where this process sits in the job."""

    world_size: int = 1
    """Processes in the job."""
    rank: int = 0
    """This process's global rank."""
    dp_size: int = 1
    """Data-parallel size (ranks that see different samples)."""
    dp_rank: int = 0
    """This rank's data-parallel index."""
    tp_size: int = 1
    """Tensor-parallel size."""
    cp_size: int = 1
    """Context-parallel size."""
    pp_size: int = 1
    """Pipeline-parallel size."""
    device: str = "cpu"
    """This rank's device (``cpu``, ``cuda:0``...)."""

    @property
    def is_main(self) -> bool:
        """Whether this is global rank 0 (the one that writes shared files and logs)."""
        return self.rank == 0


@attrs.frozen(kw_only=True)
class OptimizerSettings:
    """AdamW and its learning-rate schedule, as every runtime builds them with ``torch.optim``."""

    lr: float
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    eps: float = 1e-8
    """AdamW epsilon."""
    schedule: Literal["constant", "cosine"] = "constant"
    """After warmup: constant, or cosine decay to ``min_lr_ratio * lr`` at ``total_steps``."""
    warmup_steps: int = 0
    """Linear warmup steps from ``lr / (warmup_steps + 1)``."""
    min_lr_ratio: float = 0.0
    """Floor of the cosine schedule as a fraction of ``lr``."""
    total_steps: int = 1
    """Steps of the whole run (the cosine horizon)."""


@attrs.frozen(kw_only=True)
class LoraSettings:
    """Low-rank adapters trained on a frozen network: ``W x + (alpha / rank) * B A x`` on each targeted linear.

    Only ``A`` (``rank x in``) and ``B`` (``out x rank``) train; they are all the optimizer, the EMA and the
    checkpoint hold. ``B`` starts at zero, so training starts from the frozen network's outputs.
    """

    rank: int
    """``r``: the adapters' inner width."""
    alpha: float
    """Scale numerator: the update is ``alpha / rank * B A``."""
    dropout: float = 0.0
    """Dropout on the adapters' input (training only)."""
    targets: tuple[str, ...] | None = None
    """``fnmatch`` globs over module names of the linears to adapt; ``None``: the network's parallel plan's
    column- and row-parallel linears (attention q/k/v/out and the feed-forward)."""
    base_dtype: torch.dtype = torch.float32
    """The frozen weights' dtype (``torch.bfloat16`` halves their memory; the adapters stay float32; the parts a
    network keeps in float32 — norms, time embedding — stay float32)."""

    @property
    def scale(self) -> float:
        """``alpha / rank``."""
        return self.alpha / self.rank


@attrs.frozen(kw_only=True)
class StepResult:
    """What one optimizer step reports."""

    loss: float
    """Mean loss over the global batch (NaN/inf when the step was skipped)."""
    grad_norm: float
    """Global gradient norm before clipping."""
    lr: float
    """Learning rate the step used."""
    skipped: bool = False
    """True when the loss or gradients were not finite and no update was made."""
    metrics: Mapping[str, float] = attrs.field(factory=dict)
    """Other means over the global batch (sigma_mean, mse, ...)."""


WeightsReader = Callable[[dict[str, Any]], object]
"""Fills a nested state in place from a checkpoint of the runtime's :meth:`ParallelRuntime.state_dict` layout
(e.g. ``lambda state: store.load(directory, {"runtime": state})``); keys it lacks are left alone."""


@runtime_checkable
class ParallelRuntime(Protocol):
    """Builds the parallel network, attaches its optimizer, runs optimizer steps; reads and loads weights.

    The steps are separate (DESIGN.md rule 9): :meth:`build_network` makes the network alone (for
    training, or uninitialised in an inference dtype), :meth:`attach_optimizer` adds what only training
    needs, and :meth:`weights` / :meth:`load_weights` / :meth:`restore_weights` move one set of weights
    without touching optimizer state. Sampling and export build the network alone.
    """

    topology: Topology

    def build_network(self, spec: ModelSpec, *, inference_dtype: torch.dtype | None = None) -> nn.Module:
        """Build the network of ``spec``, parallelized for this runtime, on its device; returns it.

        ``inference_dtype=None``: the network to train, its weights initialised from the runtime's seed
        (float32 unless the runtime trains in another dtype), in train mode. A dtype: the network to
        sample or export with, allocated in that dtype and not initialised (fill it with :meth:`load_weights`
        or :meth:`restore_weights`), in eval mode without gradients or activation checkpointing; it takes no
        optimizer. Collective under a parallel runtime.
        """
        ...

    def attach_optimizer(self, settings: OptimizerSettings) -> None:
        """Attach AdamW, its learning-rate schedule and (when configured) the EMA to the training network."""
        ...

    def weights(self, use_ema: bool = True) -> dict[str, torch.Tensor]:
        """This rank's weights by parameter name, aliasing the live tensors (sharded under a parallel runtime).

        The EMA's when one is attached and ``use_ema``; else the network's.
        """
        ...

    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Load whole weights (e.g. imported diffusers weights) into the network; strict; cast to its dtype.

        With an optimizer attached: only before the first step, and the EMA restarts at these weights.
        """
        ...

    def restore_weights(self, read: WeightsReader, *, use_ema: bool = True) -> Literal["ema", "model"]:
        """Load one set of a checkpoint's weights into the network, without reading any optimizer state.

        ``read`` gets the entries of :meth:`state_dict`'s layout that hold the EMA weights (when this
        runtime keeps an EMA and ``use_ema``) or the model weights, aliasing the network's own tensors,
        and fills them in place. Returns which. As :meth:`load_weights` once an optimizer is attached.
        Collective under a parallel runtime.
        """
        ...

    def train_step(self, micro_batches: Sequence[Batch], loss_fn: LossFn, global_batch_size: int) -> StepResult:
        """Forward/backward over this rank's micro-batches, reduce, clip, step (or skip if non-finite)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Model, optimizer, scheduler and EMA state (as the runtime's checkpoint format wants it)."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        ...

    def inference_model(self, use_ema: bool = True) -> nn.Module:
        """The model to sample with (the EMA's network when one is attached and asked for), in eval mode."""
        ...

    def sampling_model(self, use_ema: bool = True) -> contextlib.AbstractContextManager[nn.Module]:
        """A context giving the network to sample with during training (EMA weights when kept and ``use_ema``),
        without gradients; the training state is unchanged after it. Collective under a parallel runtime."""
        ...

    def max_memory_gib(self) -> float:
        """Peak accelerator memory of this rank (process RSS on CPU)."""
        ...

    def close(self) -> None:
        """Release what the runtime created (a process group it initialised); the model becomes unusable."""
        ...
