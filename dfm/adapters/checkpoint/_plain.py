"""The plain values of a checkpoint state (step counters, optimizer settings...) as JSON, tensors as safetensors.

``state.json`` maps each plain leaf's dotted key to its JSON value (tuples are written as lists and
come back as the tuples the caller's state holds); a plain leaf that is a tensor (one the engine does
not store, e.g. the RNG state under megatron) goes into ``state.safetensors`` under its key. Reading
either runs no code, and every value is checked against the kind the caller's state expects.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dfm.adapters.checkpoint import _layout
from dfm.adapters.checkpoint._dcp_io import missing_keys
from dfm.ports.checkpoint import CheckpointCorruptError, CheckpointError

VALUES = "state.json"
TENSORS = "state.safetensors"
_FORMAT = "dfm-plain-state"
_VERSION = 1


def _json_value(key: str, value: Any) -> Any:
    """``value`` as JSON data (tuples as lists), or a CheckpointError naming ``key``."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_json_value(key, item) for item in value]
    raise CheckpointError(
        f"checkpoint state entry {key} is a {type(value).__name__}; a checkpoint holds tensors and plain values "
        "(None, bool, int, float, str and lists of them)"
    )


def encode(plain: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(JSON values, tensors)`` of plain leaves (tensors detached, on the CPU, contiguous).

    Raises:
        CheckpointError: A value that is neither plain data nor a tensor.
    """
    values: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for key, value in plain.items():
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().to("cpu").contiguous()
        else:
            values[key] = _json_value(key, value)
    return values, tensors


def write(directory: Path, values: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    """Writes ``state.json`` (and ``state.safetensors`` when there are tensors) into ``directory``, fsynced."""
    document = {"format": _FORMAT, "version": _VERSION, "values": dict(values), "tensors": sorted(tensors)}
    _layout.write_durably(directory / VALUES, json.dumps(document, indent=1) + "\n")
    if tensors:
        path = directory / TENSORS
        save_file(dict(tensors), str(path))
        _layout.fsync(path)


class Stored:
    """What a checkpoint directory holds of plain values (``state.json``, ``state.safetensors``)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        document = _read_document(directory)
        self.values: dict[str, Any] = document["values"]
        self.tensor_keys: set[str] = set(document["tensors"])

    def __contains__(self, key: str) -> bool:
        return key in self.values or key in self.tensor_keys

    def resolve(self, wanted: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """``({key: value to set}, [problems])`` for the caller's plain leaves ``wanted`` (key -> current value)."""
        found: dict[str, Any] = {}
        problems: list[str] = []
        missing = sorted(key for key in wanted if key not in self)
        if missing:
            problems.append(missing_keys(missing))
        tensor_keys = [key for key in wanted if key in self.tensor_keys]
        tensors = self._tensors(tensor_keys)
        for key, current in wanted.items():
            if key in self.values:
                value, problem = _like(self.values[key], current, key)
            elif key in tensors:
                value, problem = _tensor_like(tensors[key], current, key)
            else:
                continue
            if problem is None:
                found[key] = value
            else:
                problems.append(problem)
        return found, problems

    def _tensors(self, keys: list[str]) -> dict[str, torch.Tensor]:
        if not keys:
            return {}
        path = self.directory / TENSORS
        try:
            with safe_open(str(path), framework="pt") as stream:
                return {key: stream.get_tensor(key) for key in keys}
        except Exception as exc:  # safetensors raises its own error types for a bad header or missing key
            raise CheckpointCorruptError(f"checkpoint {self.directory}: {TENSORS} cannot be read: {exc}") from None


def _read_document(directory: Path) -> dict[str, Any]:
    path = directory / VALUES
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointCorruptError(f"checkpoint {directory} is corrupted: {VALUES} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointCorruptError(f"checkpoint {directory} is corrupted: {VALUES} cannot be read: {exc}") from None
    if not (
        isinstance(document, dict)
        and document.get("format") == _FORMAT
        and document.get("version") == _VERSION
        and isinstance(document.get("values"), dict)
        and isinstance(document.get("tensors"), list)
        and all(isinstance(key, str) for key in document["tensors"])
    ):
        raise CheckpointCorruptError(
            f"checkpoint {directory}: {VALUES} is not a dfm plain-state file (version {_VERSION})"
        )
    return document


def _kind(value: Any) -> str:
    return "a list" if isinstance(value, list | tuple) else f"a {type(value).__name__}"


def _like(value: Any, current: Any, key: str) -> tuple[Any, str | None]:
    """``value`` (from JSON) in the form of the caller's ``current`` value, or a problem naming ``key``.

    ``None`` on either side matches anything (an unset option); floats accept ints; tuples come back as tuples.
    """
    if current is None or value is None:
        return value, None
    if isinstance(current, bool) or isinstance(value, bool):
        ok = isinstance(current, bool) and isinstance(value, bool)
    elif isinstance(current, int):
        ok = isinstance(value, int)
    elif isinstance(current, float):
        ok = isinstance(value, int | float)
        value = float(value) if ok else value
    elif isinstance(current, str):
        ok = isinstance(value, str)
    elif isinstance(current, list | tuple):
        if not isinstance(value, list):
            return value, f"{key} is a list in the state but {_kind(value)} in the checkpoint"
        if len(value) == len(current):
            items = [_like(item, own, f"{key}.{i}") for i, (item, own) in enumerate(zip(value, current, strict=True))]
            problem = next((p for _, p in items if p is not None), None)
            return type(current)(item for item, _ in items), problem
        return type(current)(value), None
    else:
        return value, f"{key} is {_kind(current)} in the state, which a checkpoint cannot restore"
    if not ok:
        return value, f"{key} is {_kind(current)} in the state but {_kind(value)} in the checkpoint"
    return value, None


def _tensor_like(value: torch.Tensor, current: Any, key: str) -> tuple[Any, str | None]:
    if not isinstance(current, torch.Tensor):
        return value, f"{key} is {_kind(current)} in the state but a tensor in the checkpoint"
    if value.shape != current.shape:
        return value, f"{key} has shape {tuple(current.shape)} in the state but {tuple(value.shape)} in the checkpoint"
    return value, None
