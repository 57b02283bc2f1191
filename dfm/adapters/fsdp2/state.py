"""The weights of a sharded network by fully-qualified parameter names: read, and loaded whole or sharded.

``torch.distributed.checkpoint.state_dict`` gives ``{name: DTensor}`` (this rank's shards, aliasing the live
parameters); whole weights held by every rank (imported diffusers weights) are sharded on the way in. Model
and optimizer state together are :mod:`dfm.adapters.torch_dist.train_state`'s, shared with the local runtime.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)

from dfm.adapters.torch_dist.state import check_compatible


def model_state(model: nn.Module) -> dict[str, Any]:
    """``{name: tensor}`` of ``model`` (its shards as ``DTensor``), aliasing the live parameters."""
    return get_model_state_dict(model)


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
