"""Model and optimizer state of a sharded network, keyed by fully-qualified parameter names.

``torch.distributed.checkpoint.state_dict`` gives the layout every dfm runtime checkpoints (the local
runtime's included): ``{name: DTensor}`` for the model, ``{"state": {name: {...}}, "param_groups":
[{..., "params": [names]}]}`` for AdamW. The tensors alias the live shards, so a
``torch.distributed.checkpoint`` load into them, from any layout, restores in place; :func:`load`
then sets them through the same API (it does not rely on the aliasing).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from dfm.adapters.torch_dist.optim import own_group_settings
from dfm.adapters.torch_dist.state import check_compatible


def model_state(model: nn.Module) -> dict[str, Any]:
    """``{name: tensor}`` of ``model`` (its shards as ``DTensor``), aliasing the live parameters."""
    return get_model_state_dict(model)


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state keyed by parameter name; it must already exist (see ``materialize_state``)."""
    assert optimizer.state, "the optimizer state must be materialized before it is checkpointed"
    return get_optimizer_state_dict(model, optimizer)


def load_full_weights(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Load whole (unsharded) weights, present on every rank, into the sharded ``model``; strict.

    Raises:
        ValueError: Naming the missing and unexpected keys and the shape mismatches, if any.
    """
    check_compatible(model_state(model), weights, "initial weights")
    set_model_state_dict(model, dict(weights), options=StateDictOptions(full_state_dict=True))


def load_weights(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Load sharded weights of :func:`model_state`'s layout (``DTensor`` s, any placement) into ``model``; strict.

    Raises:
        ValueError: Naming the missing and unexpected keys and the shape mismatches, if any.
    """
    check_compatible(model_state(model), weights, "checkpointed weights")
    set_model_state_dict(model, dict(weights))


def load(model: nn.Module, optimizer: torch.optim.Optimizer, weights: Mapping[str, Any], saved: Mapping) -> None:
    """Restore model weights and optimizer state from :func:`model_state` / :func:`optimizer_state` layouts.

    The checkpoint supplies the per-parameter state (moments, step counters); the parameter groups'
    settings (learning rate, betas, epsilon, weight decay, kernel flags) stay this runtime's, i.e. the
    current config's (see :func:`dfm.adapters.torch_dist.optim.own_group_settings`).

    Raises:
        ValueError: If the model keys or shapes differ, or the optimizer state names other parameters.
    """
    check_compatible(model_state(model), weights, "checkpointed model weights")
    missing = [k for k in ("state", "param_groups") if k not in saved]
    if missing:
        raise ValueError(f"the checkpointed optimizer state lacks {missing}; is it from a dfm runtime?")
    trainable = {name: None for name, p in model.named_parameters() if p.requires_grad}
    check_compatible(trainable, saved["state"], "checkpointed optimizer states")
    set_model_state_dict(model, dict(weights))
    with own_group_settings([optimizer]):
        set_optimizer_state_dict(model, optimizer, dict(saved))
