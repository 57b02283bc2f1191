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

import contextlib
from collections.abc import Iterator, Mapping
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dfm.adapters.fsdp2 import state as fsdp_state
from dfm.adapters.fsdp2.parallelize import ShardingOptions, build_sharded_network
from dfm.adapters.torch_dist.core import PRECISIONS, Tally, TrainingCore, Which, check_options, compute_dtype
from dfm.adapters.torch_dist.devices import device_type
from dfm.adapters.torch_dist.fp8 import check_fp8
from dfm.adapters.torch_dist.grads import set_gradient_sync
from dfm.adapters.torch_dist.lora import check_lora_options
from dfm.adapters.torch_dist.mesh import build_mesh, resolve_sizes, topology
from dfm.adapters.torch_dist.optim import build_adamw
from dfm.adapters.torch_dist.process_group import DEFAULT_TIMEOUT, DistEnv, destroy, init_process_group
from dfm.adapters.torch_dist.train_state import load_model_and_optimizer_state, model_and_optimizer_state
from dfm.domain.specs import ModelSpec
from dfm.ports.runtime import LoraSettings, OptimizerSettings


class FSDP2Runtime(TrainingCore):
    """FSDP2/HSDP over ``dp_replicate x dp_shard``, DTensor tensor parallelism, Ulysses context parallelism.

    The step, the schedule, the EMA and the state layout are :class:`~dfm.adapters.torch_dist.core.TrainingCore`'s;
    what is this runtime's own: the mesh, the sharded network (FSDP mixed precision), gradients reduced by
    FSDP after the last micro-batch, loss and metrics summed over the data-parallel ranks, a norm taken per
    device mesh, the EMA in a second network sharded like the trained one, and state as ``DTensor`` s.

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
        activation_checkpointing: ``"off"``, ``"full"``, ``"selective"`` (attention outputs kept) or
            ``"selective_matmul"`` (the linears' outputs too).
        activation_checkpointing_every_k: Checkpoint every k-th block (1 = all).
        attention_backend: SDPA backend (``"auto"``, ``"math"``, ``"flash"``, ``"efficient"``, ``"cudnn"``).
        compile: ``torch.compile`` each block (on CUDA; ignored on the CPU).
        seed: Seed of the initial weights (the local runtime's weights for the same seed).
        timeout: How long a collective waits for the other ranks.
        fp8: Train the plan's linears with torchao's float8 recipe (:mod:`dfm.adapters.torch_dist.fp8`; CUDA,
            without tensor parallelism).
        lora: Train LoRA adapters on the frozen network (:mod:`dfm.adapters.torch_dist.lora`); ``None``: all weights.

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
        activation_checkpointing_every_k: int = 1,
        attention_backend: str = "auto",
        compile: bool = False,
        seed: int = 0,
        timeout: timedelta = DEFAULT_TIMEOUT,
        fp8: bool = False,
        lora: LoraSettings | None = None,
    ) -> None:
        kind = device_type(device)
        check_lora_options(lora, fp8=fp8, compute=compute_dtype(precision, kind) if precision in PRECISIONS else None)
        if fp8 and kind != "cuda":
            check_fp8(torch.device(kind))  # refused before any process group is made
        if fp8 and tensor > 1:
            raise ValueError("train.fp8 does not combine with parallel.tensor > 1 yet; use data or context parallelism")
        check_options(
            precision=precision,
            grad_clip=grad_clip,
            ema_decay=ema_decay,
            checkpointing=activation_checkpointing,
            every_k=activation_checkpointing_every_k,
        )
        super().__init__(grad_clip=grad_clip, ema_decay=ema_decay, seed=seed, lora=lora)
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
        if fp8:
            check_fp8(self.device)
            if tensor > 1:
                raise ValueError(
                    "train.fp8 does not combine with parallel.tensor > 1 yet; use data/context parallelism"
                )
        dtype = compute_dtype(precision, kind)
        self.options = ShardingOptions(
            param_dtype=None if dtype == torch.float32 else dtype,
            activation_checkpointing=activation_checkpointing,
            activation_checkpointing_every_k=activation_checkpointing_every_k,
            compile=compile and kind == "cuda",
            attention_backend=attention_backend,
            fp8=fp8,
            lora=lora,
        )
        self._spec: ModelSpec | None = None

    def check_model(self, spec: ModelSpec) -> None:
        """Check that the model's heads, hidden and feed-forward sizes divide by the layout.

        Raises:
            ValueError: Naming the ``parallel.*`` keys and the model sizes that do not fit.
        """
        hidden, ffn = spec.hidden_size, spec.ffn_dim
        resolve_sizes(
            self.topology.world_size, **self._parallel, heads=spec.num_attention_heads, hidden=hidden, ffn=ffn
        )

    # Hooks -----------------------------------------------------------------------------------------

    def _build(self, spec: ModelSpec, inference_dtype: torch.dtype | None) -> nn.Module:
        """The sharded network; its ``forward`` runs the context-parallel stages. Collective."""
        self.check_model(spec)
        self._spec = spec
        if inference_dtype is None:
            model = build_sharded_network(spec, self.mesh, self.device, self.options, seed=self.seed).train()
        else:
            compute = None if inference_dtype == torch.float32 else inference_dtype
            options = ShardingOptions(param_dtype=compute, attention_backend=self.options.attention_backend)
            model = build_sharded_network(spec, self.mesh, self.device, options, seed=None, dtype=inference_dtype)
            model.requires_grad_(False).eval()
        self._network = model
        return model

    def _attach(self, settings: OptimizerSettings) -> None:
        self._optimizer = build_adamw(self._network, settings, fused=self.device.type == "cuda")

    def _average(self) -> tuple[dict[str, torch.Tensor], nn.Module]:
        """A second network sharded like the trained one, without checkpointing or compile. Collective."""
        assert self._spec is not None
        plain = ShardingOptions(param_dtype=self.options.param_dtype, attention_backend=self.options.attention_backend)
        average = build_sharded_network(self._spec, self.mesh, self.device, plain, seed=None).requires_grad_(False)
        return fsdp_state.model_state(average), average

    def _named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self._network.named_parameters()

    def _micro_context(self, index: int, count: int) -> contextlib.AbstractContextManager:
        set_gradient_sync(self._network, index == count - 1)  # FSDP reduces after the last micro-batch only
        return contextlib.nullcontext()

    def _reduce(self, tally: Tally) -> tuple[list[str], torch.Tensor]:
        sums = tally.sums()
        if self.topology.dp_size > 1:  # context/tensor ranks hold copies: data-parallel ranks only
            dist.all_reduce(sums, group=self._dp_group)
        return tally.names, sums

    def _model_and_optimizer_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return model_and_optimizer_state(self._network, self._optimizer)

    def _load_model_and_optimizer(self, model: Mapping[str, Any], optimizer: Mapping[str, Any]) -> None:
        load_model_and_optimizer_state(self._network, self._optimizer, model, optimizer)

    def _weight_leaves(self, which: Which) -> dict[str, torch.Tensor]:
        return fsdp_state.model_state(self._network)

    def _set_weights(self, loaded: Mapping[str, torch.Tensor], *, whole: bool) -> None:
        if whole:
            fsdp_state.load_full_weights(self._network, loaded)
            return
        own = fsdp_state.model_state(self._network)
        if any(tensor is not own.get(name) for name, tensor in loaded.items()):  # a reader that returned new tensors
            fsdp_state.load_weights(self._network, loaded)

    def close(self) -> None:
        """Destroy the process group if this runtime created it (the mesh and model become unusable)."""
        if self._owns_group:
            destroy()
