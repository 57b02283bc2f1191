"""torch Distributed Checkpoint (DCP) calls for the store's tensors, with failures turned into readable messages.

dfm's checkpoints (layout version 2) hand DCP only tensors (plain values are the store's JSON), as a
flat ``{dotted key: tensor}`` dict; DCP writes them through torch's safetensors storage layer (see
:mod:`dfm.adapters.torch_dist.dcp_storage`) and loads them in place into the caller's tensors (cast to
the caller's dtype), resharding ``DTensor`` s from any saved layout.

Layout version 1 (the pickle era) stored every leaf through DCP: tensors raw, every other value
(int, float, str, None, tuples...) with ``torch.save`` inside the ``.distcp`` file, and DCP's index as a
pickled ``.metadata``. :func:`load_legacy` still reads such checkpoints, but through refusing readers:
the metadata with an unpickler that builds only DCP's metadata types, the values with
``torch.load(weights_only=True)``, which refuses anything but plain data. Loading needs the caller's
state to have the saved structure: a list of dicts must have the saved length, and keys absent from
the caller's state are not loaded.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem

from dfm.adapters.torch_dist.collectives import is_distributed
from dfm.adapters.torch_dist.dcp_storage import (
    RefusingFileSystemReader,
    load_plain_value,
    safetensors_reader,
    safetensors_writer,
)
from dfm.ports.checkpoint import CheckpointError

_SHOWN = 5
"""How many mismatched keys an error message lists."""


class StateMismatchError(ValueError):
    """The state to load and the checkpoint disagree on keys, kinds or shapes."""


def _kind_problem(key: str, wanted: Any, stored: object) -> str | None:
    """Why ``wanted`` (a state leaf) cannot be loaded from ``stored`` (its checkpoint metadata), or None."""
    is_tensor = isinstance(wanted, torch.Tensor)
    if is_tensor and isinstance(stored, BytesStorageMetadata):
        return f"{key} is a tensor in the state but a non-tensor value in the checkpoint"
    if not is_tensor and isinstance(stored, TensorStorageMetadata):
        return f"{key} is a {type(wanted).__name__} in the state but a tensor in the checkpoint"
    if is_tensor and isinstance(stored, TensorStorageMetadata) and tuple(stored.size) != tuple(wanted.size()):
        return f"{key} has shape {tuple(wanted.size())} in the state but {tuple(stored.size)} in the checkpoint"
    return None


def missing_keys(keys: list[str]) -> str:
    """``"3 keys missing from the checkpoint: a, b, c"`` with at most ``_SHOWN`` keys named."""
    shown = ", ".join(keys[:_SHOWN]) + (f", … ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")
    return f"{len(keys)} key{'s' if len(keys) > 1 else ''} missing from the checkpoint: {shown}"


def _own_key(container: Any, key: str | int) -> Any:
    """The caller's key for a flattened path element: ``0`` for ``"0"`` in a dict keyed by ints."""
    if isinstance(container, Mapping) and key not in container:
        return next((own for own in container if str(own) == key), key)
    return key


def _set_leaf(root: dict[str, Any], path: tuple[str | int, ...], value: Any) -> None:
    """Puts ``value`` at ``path`` in the caller's own containers, matching keys as DCP flattened them."""
    container: Any = root
    for key in path[:-1]:
        container = container[_own_key(container, key)]
    container[_own_key(container, path[-1])] = value


class StrictLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner that reports every mismatch at once (DCP stops at the first).

    Keys in the checkpoint that the state does not ask for are allowed (e.g. load only the model).
    Non-tensor values are put back under the caller's own keys: DCP's planner writes them under
    ``str(key)``, so ``{0: {"step": 3}}`` would come back as ``{0: {"step": 0}, "0": {"step": 3}}``.
    """

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        """Sets one non-tensor value of a layout-version-1 checkpoint (read with ``torch.load(weights_only=True)``,
        which refuses anything but plain data) at its place in the caller's state."""
        fqn = read_item.dest_index.fqn
        path = tuple(self.mappings[fqn])
        _set_leaf(self.original_state_dict, path, load_plain_value(value, fqn))

    def create_local_plan(self) -> LoadPlan:
        """Checks keys, kinds and shapes of the (flattened) state against the checkpoint, then plans."""
        assert self.metadata is not None
        stored = self.metadata.state_dict_metadata
        missing = sorted(key for key in self.state_dict if key not in stored)
        wrong = [_kind_problem(key, value, stored[key]) for key, value in self.state_dict.items() if key in stored]
        problems = [missing_keys(missing)] if missing else []
        problems += [text for text in wrong if text is not None][:_SHOWN]
        if problems:
            raise StateMismatchError("; ".join(problems))
        return super().create_local_plan()


@contextmanager
def _quiet_single_process() -> Iterator[None]:
    """Silences DCP's "assuming the intent is to save in a single process" warning when that is the intent."""
    with warnings.catch_warnings():
        if not is_distributed():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def causes(exc: BaseException) -> list[BaseException]:
    """``exc``, the per-rank failures inside a DCP ``CheckpointException``, and their cause chains."""
    found: list[BaseException] = []
    pending = [exc]
    while pending:
        current = pending.pop(0)
        if current in found:
            continue
        found.append(current)
        if isinstance(current, CheckpointException):
            pending += [failure for failure, _ in current.failures.values()]
        pending += [link for link in (current.__cause__, current.__context__) if link is not None]
    return found


def describe(exc: BaseException) -> str:
    """One line for a failure: its first OSError (``[Errno 28] ...``), else its first real cause inside
    DCP's wrapper as ``Type: message`` (just the message for our own errors)."""
    inner = [cause for cause in causes(exc) if not isinstance(cause, CheckpointException)]
    chosen = next((cause for cause in inner if isinstance(cause, OSError)), inner[0] if inner else exc)
    if isinstance(chosen, OSError | CheckpointError):
        return str(chosen)
    return f"{type(chosen).__name__}: {chosen}"


def check_top_level_keys(state: Mapping[Any, Any]) -> None:
    """Raises CheckpointError unless every top-level key is a string (``dcp.load`` sorts them)."""
    if not isinstance(state, Mapping):
        raise CheckpointError(f"a checkpoint state must be a mapping, got {type(state).__name__}")
    bad = [key for key in state if not isinstance(key, str)]
    if bad:
        raise CheckpointError(
            "the top-level keys of a checkpoint state must be strings (nested dicts may use ints), "
            f"got {bad[:_SHOWN]!r}"
        )


class DCPIO:
    """The default ``CheckpointIO``: torch DCP writing safetensors files (see the module docstring)."""

    def owns(self, value: object) -> bool:
        """DCP stores the tensors (``DTensor`` shards included); the store keeps the plain values."""
        return isinstance(value, torch.Tensor)

    def save(self, leaves: dict[str, Any], directory: Path) -> None:
        """``dcp.save`` of ``{key: tensor}`` into ``directory`` (collective when a process group is initialised).

        Raises:
            CheckpointException: DCP's failure (a ``BaseException``) on every rank if any rank failed.
        """
        Path(directory).mkdir(parents=True, exist_ok=True)
        contiguous = {key: value if value.is_contiguous() else value.contiguous() for key, value in leaves.items()}
        with _quiet_single_process():
            dcp.save(contiguous, storage_writer=safetensors_writer(directory), no_dist=not is_distributed())

    def load(self, leaves: dict[str, Any], directory: Path) -> dict[str, Any]:
        """``dcp.load`` into the tensors of ``leaves`` in place, with the strict planner; returns ``leaves``.

        Raises:
            CheckpointException: DCP's failure on every rank if any rank failed; a ``StateMismatchError``
                among its causes when keys, kinds or shapes disagree.
        """
        reader = safetensors_reader(directory)
        reader.read_metadata()  # files that are not safetensors raise here, as themselves
        with _quiet_single_process():
            dcp.load(leaves, storage_reader=reader, planner=StrictLoadPlanner(), no_dist=not is_distributed())
        return leaves

    def load_legacy(self, state: dict[str, Any], directory: Path) -> None:
        """Fills the nested ``state`` from a layout-version-1 checkpoint through refusing readers."""
        reader = RefusingFileSystemReader(directory)
        reader.read_metadata()  # a refused .metadata raises here, as itself
        with _quiet_single_process():
            dcp.load(state, storage_reader=reader, planner=StrictLoadPlanner(), no_dist=not is_distributed())


DCP_IO = DCPIO()
"""The default ``CheckpointIO``."""
