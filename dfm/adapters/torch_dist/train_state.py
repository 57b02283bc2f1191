"""Checkpointable state of a model and its optimizer, keyed by fully-qualified parameter names (local, fsdp2).

``torch.distributed.checkpoint.state_dict.get_state_dict`` gives the model and optimizer state in the
layout FSDP2 uses (optimizer state keyed by parameter name, not index; a sharded network's tensors as
``DTensor`` s), so the ``local`` and ``fsdp2`` runtimes write the same structure and read each other's
checkpoints; a plain module needs no process group. The tensors returned alias the live ones, so
``torch.distributed.checkpoint.load`` into them restores in place; loading copies values into the live
tensors (an in-memory state of another runtime is never shared).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

from dfm.adapters.torch_dist.state import check_compatible, listing


def model_and_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """``(model_state, optimizer_state)`` with fully-qualified names as keys (aliasing the live tensors).

    The model state holds the trained parameters only (frozen ones, e.g. under LoRA the base, are left out).

    The optimizer state is ``{"state": {name: {"step", "exp_avg", ...}}, "param_groups": [{..., "params":
    [names]}]}``; it must already exist (see :func:`dfm.adapters.torch_dist.optim.materialize_state`).
    """
    assert optimizer.state, "the optimizer state must be materialized before it is checkpointed"
    return get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))


def load_model_and_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, model_state: Mapping[str, Any], optimizer_state: Mapping
) -> None:
    """Restore what :func:`model_and_optimizer_state` returned (strict), copying into the live tensors.

    Values are copied in place (``torch.optim.Optimizer.load_state_dict`` would keep the given tensors
    themselves, so a runtime loading another's in-memory state would share its moments). The checkpoint
    supplies the per-parameter state (moments, step counters); the parameter groups' settings (learning
    rate, betas, epsilon, weight decay, kernel flags) stay this runtime's, i.e. the current config's.

    Raises:
        ValueError: If the model keys or shapes differ, or the optimizer state names other parameters.
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    check_compatible(trained_state(model), model_state, "checkpointed model weights")
    missing = [k for k in ("state", "param_groups") if k not in optimizer_state]
    if missing:
        raise ValueError(f"the checkpointed optimizer state lacks {missing}; is it from a dfm runtime?")
    unexpected = model.load_state_dict(dict(model_state), strict=False).unexpected_keys
    assert not unexpected, unexpected
    _load_param_state(optimizer, params, optimizer_state["state"])
    _check_param_groups(optimizer, params, optimizer_state["param_groups"])


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` without its frozen parameters (the model entry of a checkpoint)."""
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k not in frozen}


@torch.no_grad()
def _load_param_state(optimizer: torch.optim.Optimizer, params: Mapping[str, nn.Parameter], saved: Mapping) -> None:
    own = {name: optimizer.state[p] for name, p in params.items()}
    check_compatible({n: None for n in own}, saved, "checkpointed optimizer states")
    for name, state in own.items():
        check_compatible(state, saved[name], f"checkpointed optimizer state entries of {name}")
        for key, value in saved[name].items():
            if isinstance(state[key], torch.Tensor):
                state[key].copy_(value)
            else:
                state[key] = value


def _check_param_groups(optimizer: torch.optim.Optimizer, params: Mapping[str, nn.Parameter], saved: list) -> None:
    """Raise unless each of this optimizer's groups holds exactly the parameters of one saved group.

    Nothing else of the saved groups is used: their settings (``lr``, ``betas``, ...) are the config's.
    """
    name_of = {id(p): name for name, p in params.items()}
    saved_names = {frozenset(group["params"]) for group in saved}
    for group in optimizer.param_groups:
        names = frozenset(name_of[id(p)] for p in group["params"])
        if names not in saved_names:
            raise ValueError(
                "the checkpointed optimizer groups parameters differently (e.g. another weight-decay rule): "
                f"no saved group holds exactly {listing(sorted(names))}"
            )
