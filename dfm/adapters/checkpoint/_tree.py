"""A checkpoint state as flat leaves under dotted keys: the engine's tensors and the plain values.

The store hands the tensors to its ``CheckpointIO`` (torch DCP, or megatron's dist_checkpointing) and
keeps every other value itself, as JSON. Walking follows DCP's naming: mappings are walked key by key
(``str(key)``), a list or tuple is walked item by item when it holds a mapping, a tensor or an engine
leaf (directly or deeper), and any other value is one plain leaf. A leaf's key is its path joined with
dots, so ``{"runtime": {"optimizer": {"state": {0: {"step": t}}}}}`` holds ``runtime.optimizer.state.0.step``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch

from dfm.ports.checkpoint import CheckpointError

Path = tuple[str | int, ...]
"""Where a leaf sits: dict keys (as the caller wrote them) and list indices."""


@attrs.frozen(kw_only=True)
class Leaves:
    """The leaves of a state, split by who stores them."""

    engine: dict[str, Any]
    """Key -> value the ``CheckpointIO`` writes (tensors for DCP, sharded tensors for megatron)."""
    plain: dict[str, Any]
    """Key -> every other value (numbers, strings, lists of them, None; tensors the engine does not take)."""
    paths: dict[str, Path]
    """Key -> its path in the nested state."""


def _walks(value: Any, owns: Callable[[object], bool]) -> bool:
    """Whether a list item makes its list walked item by item."""
    if owns(value) or isinstance(value, torch.Tensor | Mapping):
        return True
    return isinstance(value, list | tuple) and any(_walks(item, owns) for item in value)


def flatten(state: Mapping[str, Any], owns: Callable[[object], bool]) -> Leaves:
    """The leaves of ``state``; ``owns(value)`` says which leaves the engine stores.

    Raises:
        CheckpointError: Two leaves would get the same key (e.g. ``{"a.b": x, "a": {"b": y}}``).
    """
    engine: dict[str, Any] = {}
    plain: dict[str, Any] = {}
    paths: dict[str, Path] = {}

    def visit(value: Any, path: Path) -> None:
        if not owns(value) and isinstance(value, Mapping):
            for key, item in value.items():
                visit(item, (*path, key))
            return
        if not owns(value) and isinstance(value, list | tuple) and any(_walks(item, owns) for item in value):
            for index, item in enumerate(value):
                visit(item, (*path, index))
            return
        key = ".".join(str(part) for part in path)
        if key in paths:
            raise CheckpointError(f"two entries of the checkpoint state have the same dotted key {key!r}")
        paths[key] = path
        (engine if owns(value) else plain)[key] = value

    for top, value in state.items():
        visit(value, (top,))
    return Leaves(engine=engine, plain=plain, paths=paths)


def set_leaf(state: Any, path: Path, value: Any) -> None:
    """Puts ``value`` at ``path`` in ``state``'s own containers (a tuple on the way is rebuilt in its parent)."""
    parents = [state]
    for part in path[:-1]:
        parents.append(parents[-1][part])
    for depth in range(len(path) - 1, -1, -1):
        container, part = parents[depth], path[depth]
        if isinstance(container, tuple):
            items = list(container)
            items[part] = value  # type: ignore[index]
            value = tuple(items)
            continue
        container[part] = value
        return
