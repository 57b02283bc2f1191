"""Activation checkpointing applied from outside (DESIGN.md rule 4), keeping every name unchanged.

Instead of wrapping a block in another module (which inserts a name such as
``_checkpoint_wrapped_module`` into ``named_parameters``), the block's own ``forward`` is replaced, on
the instance, by a callable that runs the original ``forward`` under ``torch.utils.checkpoint``
(non-reentrant). Parameter names, state-dict keys and optimizer keys are therefore the same with and
without checkpointing; the block's hooks still run once per forward, and its submodules run again
during the backward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torch.utils.checkpoint import checkpoint


class CheckpointedForward:
    """A block's original ``forward``, recomputed in the backward pass instead of keeping activations.

    Args:
        forward: The block's bound ``forward`` method (copied along when the block is deep-copied).
    """

    def __init__(self, forward: Callable[..., Any]) -> None:
        self.forward = forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return checkpoint(self.forward, *args, use_reentrant=False, **kwargs)


def is_checkpointed(module: nn.Module) -> bool:
    """Whether :func:`checkpoint_module` was applied to ``module``."""
    return isinstance(module.__dict__.get("forward"), CheckpointedForward)


def checkpoint_module(module: nn.Module) -> None:
    """Recompute ``module``'s forward in the backward pass (idempotent)."""
    if not is_checkpointed(module):
        module.forward = CheckpointedForward(module.forward)


def apply_activation_checkpointing(model: nn.Module, blocks: str, every: int = 1) -> list[int]:
    """Checkpoint every ``every``-th block of the ``nn.ModuleList`` named ``blocks`` in ``model``.

    Blocks ``every - 1, 2 * every - 1, ...`` (0-based) are checkpointed; ``every=1`` checkpoints all.

    Args:
        model: The network.
        blocks: Dotted name of its block list (the network's ``parallel_plan.blocks``).
        every: Checkpoint one block in this many.

    Returns:
        The indices of the checkpointed blocks.

    Raises:
        ValueError: If ``every < 1``.
    """
    if every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {every}")
    block_list = model.get_submodule(blocks)
    assert isinstance(block_list, nn.ModuleList), f"{blocks!r} must name an nn.ModuleList"
    chosen = [i for i in range(len(block_list)) if (i + 1) % every == 0]
    for i in chosen:
        checkpoint_module(block_list[i])
    return chosen
