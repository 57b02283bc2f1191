"""In-memory checkpoint store: the ``CheckpointStore`` port on a dict, for unit tests and embedding users.

It behaves like the DCP store where a caller can tell: saves keep copies (tensors cloned), ``meta``
goes through JSON (tuples come back as lists), ``load`` fills the caller's state in place (tensors
copied into the caller's tensors, other values replaced), refuses keys the checkpoint lacks, kinds
or shapes that differ, and checks everything before changing anything; ``latest`` is the last saved
step; ``keep_last`` prunes the oldest by step, never the one just saved.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import torch

from dfm.ports.checkpoint import CheckpointCandidate, CheckpointError, CheckpointInfo

_STEP_RE = re.compile(r"^step_(\d{7,})$")
_SHOWN = 5
"""How many mismatched keys an error message lists."""


@attrs.frozen(kw_only=True)
class _Saved:
    """One checkpoint: private copies of the state and of the meta."""

    state: dict[str, Any]
    meta: dict[str, Any]


def _copy(value: Any) -> Any:
    """A deep copy that clones tensors (detached) and keeps container types and keys."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, Mapping):
        return {key: _copy(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_copy(item) for item in value)
    return copy.deepcopy(value)


def _walks_into(value: Any) -> bool:
    """Whether loading descends into ``value`` (as DCP does: mappings, lists holding tensors or mappings)."""
    if isinstance(value, Mapping):
        return True
    if isinstance(value, list):
        return any(isinstance(item, torch.Tensor) or _walks_into(item) for item in value)
    return False


def _lookup(source: Any, key: Any) -> tuple[bool, Any]:
    """``(found, value)`` of ``key`` in a saved container; dict keys match by ``str`` as in DCP."""
    if isinstance(source, Mapping):
        if key in source:
            return True, source[key]
        return next(((True, item) for own, item in source.items() if str(own) == str(key)), (False, None))
    if isinstance(source, list) and isinstance(key, int) and key < len(source):
        return True, source[key]
    return False, None


def _children(target: Any) -> list[tuple[Any, Any]]:
    """``(key, value)`` pairs of a container that loading descends into."""
    return list(target.items()) if isinstance(target, Mapping) else list(enumerate(target))


def _problems(target: Any, source: Any, path: str, missing: list[str], wrong: list[str]) -> None:
    """Collects what keeps ``source`` from loading into ``target`` (keys as dotted paths)."""
    for key, wanted in _children(target):
        name = f"{path}.{key}" if path else str(key)
        found, stored = _lookup(source, key)
        if not found:
            missing.append(name)
        elif _walks_into(wanted):
            _problems(wanted, stored, name, missing, wrong)
        elif isinstance(wanted, torch.Tensor) and not isinstance(stored, torch.Tensor):
            wrong.append(f"{name} is a tensor in the state but a non-tensor value in the checkpoint")
        elif not isinstance(wanted, torch.Tensor) and isinstance(stored, torch.Tensor):
            wrong.append(f"{name} is a {type(wanted).__name__} in the state but a tensor in the checkpoint")
        elif isinstance(wanted, torch.Tensor) and wanted.shape != stored.shape:
            wrong.append(
                f"{name} has shape {tuple(wanted.shape)} in the state but {tuple(stored.shape)} in the checkpoint"
            )


def _fill(target: Any, source: Any) -> None:
    """Loads ``source`` into ``target`` in place (already checked by ``_problems``)."""
    for key, wanted in _children(target):
        _, stored = _lookup(source, key)
        if _walks_into(wanted):
            _fill(wanted, stored)
        elif isinstance(wanted, torch.Tensor):
            with torch.no_grad():
                wanted.copy_(stored)
        else:
            target[key] = _copy(stored)


def _mismatch_text(missing: list[str], wrong: list[str]) -> str:
    """The message part listing mismatched keys, as the DCP store words it."""
    parts = []
    if missing:
        shown = ", ".join(missing[:_SHOWN]) + (f", … ({len(missing) - _SHOWN} more)" if len(missing) > _SHOWN else "")
        parts.append(f"{len(missing)} key{'s' if len(missing) > 1 else ''} missing from the checkpoint: {shown}")
    return "; ".join(parts + wrong[:_SHOWN])


def _json_copy(meta: Mapping[str, Any]) -> dict[str, Any]:
    """``meta`` through JSON, as the DCP store keeps it."""
    try:
        return json.loads(json.dumps(dict(meta)))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint meta must be JSON-safe (dicts with string keys, lists, str, int, float, bool, None): {exc}"
        ) from exc


class InMemoryCheckpointStore:
    """Keeps checkpoints in a dict (implements the ``CheckpointStore`` port); writes no file.

    Args:
        keep_last: Keep this many checkpoints (by step, the one just saved always kept); None keeps all.
        name: Shown as the root of the checkpoints' paths (``<name>/step_0000100``).

    Raises:
        ValueError: For ``keep_last < 1``.
    """

    def __init__(self, *, keep_last: int | None = None, name: str = "memory") -> None:
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be at least 1 (or None to keep all), got {keep_last}")
        self.keep_last = keep_last
        self.root = Path(name)
        self._saved: dict[int, _Saved] = {}
        self._last: int | None = None

    def save(self, step: int, state: Mapping[str, Any], meta: Mapping[str, Any]) -> CheckpointInfo:
        """Keeps a copy of ``state`` (tensors cloned) and of ``meta``; replaces a checkpoint of the same step.

        Raises:
            CheckpointError: For meta that is not JSON-safe or non-string top-level keys in ``state``.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        bad = [key for key in state if not isinstance(key, str)]
        if bad:
            raise CheckpointError(f"the top-level keys of a checkpoint state must be strings, got {bad[:_SHOWN]!r}")
        self._saved[step] = _Saved(state=_copy(state), meta=_json_copy(meta))
        self._last = step
        self._apply_retention(step)
        return self._info(step)

    def load(self, where: CheckpointInfo | Path, state: dict[str, Any]) -> dict[str, Any]:
        """Fills ``state`` in place from a checkpoint and returns its ``meta``; checks everything first.

        Raises:
            CheckpointError: For an unknown checkpoint, or keys, kinds or shapes that do not match.
        """
        step = self._resolve(where)
        saved = self._saved[step]
        missing: list[str] = []
        wrong: list[str] = []
        _problems(state, saved.state, "", missing, wrong)
        if missing or wrong:
            raise CheckpointError(
                f"checkpoint {self._info(step).path} does not match the state to load: {_mismatch_text(missing, wrong)}"
            )
        _fill(state, saved.state)
        return copy.deepcopy(saved.meta)

    def read_meta(self, where: CheckpointInfo | Path) -> dict[str, Any]:
        """The ``meta`` of a checkpoint without loading it."""
        return copy.deepcopy(self._saved[self._resolve(where)].meta)

    def latest(self) -> CheckpointInfo | None:
        """The last saved checkpoint, or None."""
        return None if self._last is None else self._info(self._last)

    def list(self) -> list[CheckpointInfo]:
        """All kept checkpoints, oldest (lowest step) first."""
        return [self._info(step) for step in sorted(self._saved)]

    def candidates(self) -> list[CheckpointCandidate]:
        """Every kept checkpoint, newest first (an in-memory checkpoint is never corrupted)."""
        return [CheckpointCandidate(info=self._info(step)) for step in sorted(self._saved, reverse=True)]

    def _info(self, step: int) -> CheckpointInfo:
        """The ``CheckpointInfo`` of a kept step."""
        return CheckpointInfo(step=step, path=self.root / f"step_{step:07d}")

    def _resolve(self, where: CheckpointInfo | Path) -> int:
        """The step ``where`` names: a checkpoint's info or path, or the root (then the latest)."""
        path = where.path if isinstance(where, CheckpointInfo) else Path(where)
        if path == self.root:
            if self._last is None:
                raise CheckpointError(f"no checkpoint in the in-memory store {self.root}")
            return self._last
        match = _STEP_RE.match(path.name)
        if match is None or path.parent != self.root or int(match.group(1)) not in self._saved:
            raise CheckpointError(f"checkpoint {path} does not exist in the in-memory store {self.root}")
        return int(match.group(1))

    def _apply_retention(self, just_saved: int) -> None:
        """Drops the oldest checkpoints beyond ``keep_last``, never ``just_saved``."""
        if self.keep_last is None:
            return
        others = sorted(step for step in self._saved if step != just_saved)
        for step in others[: max(0, len(others) - (self.keep_last - 1))]:
            del self._saved[step]
