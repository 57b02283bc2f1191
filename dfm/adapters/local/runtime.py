"""The ``local`` runtime: one process on the CPU or one GPU (the embedded default).

It is the numerical reference every parallel runtime must reproduce: gradients are accumulated over
micro-batches as ``sum(per_sample) / global_batch_size``, so any micro-batch split of a global batch
gives the gradient of the whole batch; weights and AdamW state stay in fp32 and bf16 enters only
through ``torch.autocast``. A network built to sample with (``inference_dtype``) is allocated once, on the
device and in that dtype, and filled from a checkpoint's or exported weights; it never gets optimizer state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch
from torch import nn

from dfm.adapters.torch_dist.checkpointing import apply_activation_checkpointing
from dfm.adapters.torch_dist.core import (
    PRECISIONS,
    TrainingCore,
    Which,
    check_inference_dtype,
    check_options,
    compute_dtype,
)
from dfm.adapters.torch_dist.fp8 import check_fp8, convert_to_fp8
from dfm.adapters.torch_dist.lora import cast_frozen, check_lora_options, init_lora, inject_lora
from dfm.adapters.torch_dist.optim import build_adamw
from dfm.adapters.torch_dist.state import check_compatible
from dfm.adapters.torch_dist.train_state import load_model_and_optimizer_state, model_and_optimizer_state
from dfm.domain.networks.attention import SDPAAttention
from dfm.domain.networks.registry import network_class
from dfm.domain.specs import ModelSpec
from dfm.ports.runtime import LoraSettings, OptimizerSettings, Topology

Precision = Literal["auto", "fp32", "bf16"]
ActivationCheckpointing = Literal["off", "full", "selective", "selective_matmul"]


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
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision must be one of {PRECISIONS}, got {precision!r}")
    dtype = compute_dtype(precision, device.type)
    return None if dtype == torch.float32 else dtype


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
    check_inference_dtype(dtype)
    with torch.device("meta"):
        model = network_class(spec)(spec, attention=attention, generator=None).to(dtype)
    keep = set(getattr(model, "fp32_modules", ()))
    for name, param in model.named_parameters():
        if keep & set(name.split(".")):  # the network's declared float32 parts (its norms, time embedding...)
            param.data = param.data.float()
    return model.to_empty(device=device).requires_grad_(False).eval()


class LocalRuntime(TrainingCore):
    """One process, one device: the network, then (to train) AdamW, the LR schedule and an optional EMA.

    The step, the schedule, the EMA and the state layout are :class:`~dfm.adapters.torch_dist.core.TrainingCore`'s;
    what is this runtime's own: the network on one device, fp32 weights with bf16 through ``torch.autocast``,
    the EMA in a frozen copy of the network, state through ``torch.distributed.checkpoint.state_dict``.

    Args:
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        precision: ``"auto"`` (bf16 autocast on CUDA, fp32 on CPU), ``"fp32"`` or ``"bf16"`` (autocast;
            weights, gradients and optimizer state stay fp32).
        grad_clip: Clip the global gradient norm to this value; ``None`` disables clipping.
        ema_decay: Keep an EMA of the weights with this decay (:mod:`dfm.adapters.torch_dist.ema`); ``None``: none.
        activation_checkpointing: ``"off"``, ``"full"`` (recompute whole blocks in the backward pass) or
            ``"selective"`` (recompute them but keep the attention outputs) or ``"selective_matmul"`` (keep the
            linears' outputs too).
        activation_checkpointing_every_k: Checkpoint every k-th block only (1 = all blocks).
        attention_backend: SDPA backend (``"auto"``, ``"math"``, ``"flash"``, ``"efficient"``, ``"cudnn"``).
        seed: Seed of the initial weights (the same seed always gives the same weights).
        fp8: Train the plan's linears with torchao's float8 recipe (:mod:`dfm.adapters.torch_dist.fp8`; CUDA).
        lora: Train LoRA adapters on the frozen network (:mod:`dfm.adapters.torch_dist.lora`); ``None``: all weights.

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
        activation_checkpointing_every_k: int = 1,
        attention_backend: str = "auto",
        seed: int = 0,
        fp8: bool = False,
        lora: LoraSettings | None = None,
    ) -> None:
        check_options(
            precision=precision,
            grad_clip=grad_clip,
            ema_decay=ema_decay,
            checkpointing=activation_checkpointing,
            every_k=activation_checkpointing_every_k,
        )
        super().__init__(grad_clip=grad_clip, ema_decay=ema_decay, seed=seed, lora=lora)
        self.device = resolve_device(device)
        self.autocast_dtype = resolve_precision(precision, self.device)
        check_lora_options(lora, fp8=fp8, compute=self.autocast_dtype or torch.float32)
        self.attention = SDPAAttention(attention_backend)
        self.activation_checkpointing = activation_checkpointing
        self.every_k = activation_checkpointing_every_k
        self.topology = Topology(device=str(self.device))
        if fp8:
            check_fp8(self.device)
        self.fp8 = fp8
        self._spec: ModelSpec | None = None

    def _build(self, spec: ModelSpec, inference_dtype: torch.dtype | None) -> nn.Module:
        self._spec = spec
        if inference_dtype is None:
            generator = torch.Generator(device="cpu").manual_seed(self.seed)
            network = build_network(spec, self.attention, generator)
            if self.lora is not None:
                inject_lora(network, self.lora)
                init_lora(network, self.seed)
                cast_frozen(network, self.lora.base_dtype)
            self._network = network.to(self.device).train()
            if self.fp8:
                convert_to_fp8(self._network, self._network.parallel_plan)
        else:
            self._network = empty_network(spec, self.attention, self.device, inference_dtype)
        return self._network

    def _attach(self, settings: OptimizerSettings) -> None:
        model = self._network
        self._optimizer = build_adamw(model, settings, fused=self.device.type == "cuda")
        if self.activation_checkpointing != "off":
            blocks = model.parallel_plan.blocks
            apply_activation_checkpointing(model, blocks, self.every_k, self.activation_checkpointing)

    def _average(self) -> tuple[dict[str, torch.Tensor], nn.Module]:
        assert self._spec is not None
        average = empty_network(self._spec, self.attention, self.device, torch.float32)  # filled by the EMA's reset
        return average.state_dict(), average

    def _named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self._network.named_parameters()

    def _micro_context(self, index: int, count: int) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _model_and_optimizer_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return model_and_optimizer_state(self._network, self._optimizer)

    def _load_model_and_optimizer(self, model: Mapping[str, Any], optimizer: Mapping[str, Any]) -> None:
        load_model_and_optimizer_state(self._network, self._optimizer, model, optimizer)

    def _weight_leaves(self, which: Which) -> dict[str, torch.Tensor]:
        return self._network.state_dict()

    def _set_weights(self, loaded: Mapping[str, torch.Tensor], *, whole: bool) -> None:
        own = self._network.state_dict()
        if whole or any(tensor is not own.get(name) for name, tensor in loaded.items()):
            check_compatible(own, loaded, "initial weights" if whole else "checkpointed weights")
            self._network.load_state_dict(dict(loaded), strict=True)
