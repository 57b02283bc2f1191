"""Activation checkpointing applied from outside (DESIGN.md rule 4), keeping every name unchanged.

Instead of wrapping a block in another module (which inserts a name such as
``_checkpoint_wrapped_module`` into ``named_parameters``), the block's own ``forward`` is replaced, on
the instance, by a callable that runs the original ``forward`` under ``torch.utils.checkpoint``
(non-reentrant). Parameter names, state-dict keys and optimizer keys are therefore the same with and
without checkpointing; the block's hooks still run once per forward, and its submodules run again
during the backward pass.

Three modes: ``full`` recomputes the whole block; ``selective`` recomputes it too but keeps the outputs of the
attention kernels (:data:`SAVED_OPS`), so the most expensive op of a long-sequence block is never run twice
(torch's selective-checkpoint policy, ``create_selective_checkpoint_contexts``; the cheap rest — linears, norms,
RoPE, modulation — is recomputed); ``selective_matmul`` keeps the linears' GEMM outputs as well
(:data:`MATMUL_OPS`), so only element-wise work is recomputed, for more memory. Numerics are those of no
checkpointing in every mode.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

CheckpointMode = Literal["full", "selective", "selective_matmul"]

SAVED_OPS: frozenset[Any] = frozenset(
    {
        torch.ops.aten._scaled_dot_product_cudnn_attention.default,
        torch.ops.aten._scaled_dot_product_flash_attention.default,
        torch.ops.aten._scaled_dot_product_efficient_attention.default,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
        torch.ops.aten._scaled_dot_product_fused_attention_overrideable.default,
    }
)
"""The ops whose outputs ``selective`` keeps: every fused SDPA kernel (each returns the attention output and
the softmax statistics its backward needs). At 32,760 tokens they are ~70 % of a WAN block's FLOPs."""


MATMUL_OPS: frozenset[Any] = frozenset({torch.ops.aten.mm.default, torch.ops.aten.addmm.default})
"""The ops whose outputs ``selective_matmul`` keeps besides :data:`SAVED_OPS`: the linears' GEMMs (the rest of a
block's FLOPs). At 32,760 WAN tokens they hold ~1.3 GB per block of WAN 1.3B in bf16 and save their recompute."""


def _keep_attention(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _keep_attention_and_matmul(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS or op in MATMUL_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context() -> tuple[Any, Any]:
    return create_selective_checkpoint_contexts(_keep_attention)


def _selective_matmul_context() -> tuple[Any, Any]:
    return create_selective_checkpoint_contexts(_keep_attention_and_matmul)


_CONTEXTS = {"selective": _selective_context, "selective_matmul": _selective_matmul_context}


class CheckpointedForward:
    """A block's original ``forward``, recomputed in the backward pass instead of keeping activations.

    Args:
        forward: The block's bound ``forward`` method (copied along when the block is deep-copied).
        mode: ``"full"`` recomputes everything; ``"selective"`` keeps the attention outputs (:data:`SAVED_OPS`).
    """

    def __init__(self, forward: Callable[..., Any], mode: CheckpointMode = "full") -> None:
        self.forward = forward
        self.mode = mode

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.mode in _CONTEXTS:
            kwargs = {"context_fn": _CONTEXTS[self.mode], **kwargs}
        return checkpoint(self.forward, *args, use_reentrant=False, **kwargs)


def is_checkpointed(module: nn.Module) -> bool:
    """Whether :func:`checkpoint_module` was applied to ``module``."""
    return isinstance(module.__dict__.get("forward"), CheckpointedForward)


def checkpoint_module(module: nn.Module, mode: CheckpointMode = "full") -> None:
    """Recompute ``module``'s forward in the backward pass (idempotent: a checkpointed module keeps its mode)."""
    if mode not in ("full", *_CONTEXTS):
        raise ValueError(
            f"activation checkpointing mode must be 'full', 'selective' or 'selective_matmul', got {mode!r}"
        )
    if not is_checkpointed(module):
        module.forward = CheckpointedForward(module.forward, mode)


def apply_activation_checkpointing(
    model: nn.Module, blocks: str, every: int = 1, mode: CheckpointMode = "full"
) -> list[int]:
    """Checkpoint every ``every``-th block of the ``nn.ModuleList`` named ``blocks`` in ``model``.

    Blocks ``every - 1, 2 * every - 1, ...`` (0-based) are checkpointed; ``every=1`` checkpoints all.

    Args:
        model: The network.
        blocks: Dotted name of its block list (the network's ``parallel_plan.blocks``).
        every: Checkpoint one block in this many.
        mode: ``"full"`` or ``"selective"`` (see :class:`CheckpointedForward`).

    Returns:
        The indices of the checkpointed blocks.

    Raises:
        ValueError: If ``mode`` is unknown.
    """
    assert every >= 1, f"every must be >= 1 (the runtime checks train.activation_checkpointing_every_k), got {every}"
    block_list = model.get_submodule(blocks)
    assert isinstance(block_list, nn.ModuleList), f"{blocks!r} must name an nn.ModuleList"
    chosen = [i for i in range(len(block_list)) if (i + 1) % every == 0]
    for i in chosen:
        checkpoint_module(block_list[i], mode)
    return chosen
