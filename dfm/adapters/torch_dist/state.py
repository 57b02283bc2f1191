"""Checks that a state offered to a model (weights, optimizer entries, EMA) fits it, with readable errors.

Every runtime runs these before loading, so a checkpoint of another model fails with the names and
shapes that differ instead of a traceback from inside ``torch.distributed.checkpoint`` or
``load_state_dict``. Shapes are compared as the tensors report them: a ``DTensor`` reports its global
shape, so a sharded model is checked against a checkpoint of any layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

LISTED = 8
"""How many names a message lists before it says how many more there are."""


def check_compatible(expected: Mapping[str, Any], given: Mapping[str, Any], what: str) -> None:
    """Raise a ``ValueError`` naming missing and unexpected keys and shape mismatches of tensor entries.

    Args:
        expected: The state the receiver has (name -> tensor).
        given: The state offered to it.
        what: What is being loaded, for the message (e.g. ``"initial weights"``).
    """
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    mismatched = [
        f"{k}: expected {tuple(expected[k].shape)}, got {tuple(given[k].shape)}"
        for k in sorted(set(expected) & set(given))
        if isinstance(expected[k], torch.Tensor)
        and isinstance(given[k], torch.Tensor)
        and expected[k].shape != given[k].shape
    ]
    problems = [
        f"{label} ({len(items)}): {listing(items)}"
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        )
        if items
    ]
    if problems:
        raise ValueError(
            f"{what} do not match the model: " + "; ".join(problems) + ". Check that the model spec matches the "
            "weights (sizes, number of layers, architecture)"
        )


def listing(items: list[str]) -> str:
    """The first :data:`LISTED` items joined by commas, then how many more there are."""
    shown = ", ".join(items[:LISTED])
    return shown + (f", ... ({len(items) - LISTED} more)" if len(items) > LISTED else "")
