"""The ``train`` section: the training loop."""

from __future__ import annotations

from typing import Literal, get_args

import attrs
from attrs import validators as v

from dfm.app.config.checks import choice, finite_positive, optional, positive

ActivationCheckpointing = Literal["off", "full", "selective", "selective_matmul"]
AttentionBackend = Literal["auto", "math", "flash", "efficient", "cudnn", "fa4"]
ATTENTION_BACKENDS: tuple[str, ...] = get_args(AttentionBackend)
"""``train.attention_backend`` and ``--attention`` values: ``auto`` (cuDNN first on CUDA, torch's choice on the CPU)
or one SDPA backend; ``fa4`` is FlashAttention-4 (the ``flash-attn-4`` package, Hopper or Blackwell)."""
Precision = Literal["fp32", "bf16", "auto"]


@attrs.frozen(kw_only=True)
class TrainingConfig:
    """Length, batch sizes, numerics and stability guards of the training loop."""

    max_steps: int = attrs.field(default=1000, validator=positive)
    """Optimizer steps to train for (a resumed run stops at the same step)."""
    global_batch_size: int = attrs.field(default=8, validator=positive)
    """Samples per optimizer step over all data-parallel ranks and micro-batches."""
    micro_batch_size: int = attrs.field(default=1, validator=positive)
    """Samples per forward/backward on one data-parallel rank (divisibility is checked with the layout)."""
    log_interval: int = attrs.field(default=10, validator=positive)
    """Steps between metric log lines."""
    grad_clip: float | None = attrs.field(default=1.0, validator=optional(finite_positive))
    """Clip the global gradient norm to this value; ``null`` disables clipping."""
    max_consecutive_nonfinite: int = attrs.field(default=3, validator=positive)
    """Skip steps with a non-finite loss or gradient norm; abort after this many in a row."""
    activation_checkpointing: ActivationCheckpointing = attrs.field(
        default="off", validator=choice(ActivationCheckpointing)
    )
    """``off``: keep activations; ``full``: recompute whole blocks in the backward pass; ``selective``: recompute
    them but keep the attention kernels' outputs (the most expensive op at long sequences runs once);
    ``selective_matmul``: keep the linears' outputs too (only element-wise work is recomputed; more memory)."""
    activation_checkpointing_every_k: int = attrs.field(default=1, validator=positive)
    """With ``full`` or ``selective``, checkpoint every k-th block only (1 = every block)."""
    attention_backend: AttentionBackend = attrs.field(default="auto", validator=choice(AttentionBackend))
    """SDPA kernel: ``auto`` lets the runtime choose (cuDNN preferred on Hopper), or force one; ``fa4`` is
    FlashAttention-4 behind torch's flash backend (needs the ``flash-attn-4`` package; Hopper or Blackwell)."""
    compile: bool = False
    """``torch.compile`` each transformer block (CUDA only; the ``fsdp2`` and ``megatron`` runtimes; ignored on CPU)."""
    fp8: bool = False
    """Train the network's planned linears (attention projections, feed-forward) with torchao's float8 recipe:
    FP8 GEMMs, weights and optimizer state unchanged. NVIDIA GPUs with FP8 tensor cores (compute capability 8.9+)
    and the ``local`` or ``fsdp2`` runtime (without tensor parallelism); needs ``pip install torchao``."""
    precision: Precision = attrs.field(default="auto", validator=choice(Precision))
    """Compute precision: ``fp32``, ``bf16`` (mixed, fp32 master weights) or ``auto`` (bf16 on GPU, fp32 on CPU)."""
    ema_decay: float | None = attrs.field(default=None, validator=optional(v.and_(v.gt(0.0), v.lt(1.0))))
    """Decay of an exponential moving average of the weights; ``null`` keeps no EMA."""
