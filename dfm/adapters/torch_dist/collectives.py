"""The collectives dfm's adapters and services share, all no-ops in a single process.

Every helper here must be called by every rank of the default process group (when one is
initialised), in the same order. :func:`on_every_rank` and :func:`on_rank_zero` share a failure on any
rank, so all ranks raise together (a :class:`RemoteRankError`, a ``CheckpointError``: the checkpoint
store's steps are the ones all ranks take together) instead of some waiting forever in the next
collective. :func:`all_gather_json` gathers JSON-safe values as the JSON a checkpoint would hold.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

from dfm.ports.checkpoint import CheckpointCorruptError, CheckpointError

T = TypeVar("T")


class RemoteRankError(CheckpointError):
    """Another rank failed in a step all ranks take together.

    Attributes:
        rank: The failing rank.
        errno: The ``errno`` of its OSError, if it was one (``errno.ENOSPC`` for a full disk).
    """

    def __init__(self, message: str, *, rank: int, errno: int | None) -> None:
        super().__init__(message)
        self.rank = rank
        self.errno = errno


class RemoteCorruptError(RemoteRankError, CheckpointCorruptError):
    """Another rank found the checkpoint corrupted (so every rank treats it as corrupted)."""


def is_distributed() -> bool:
    """Whether a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Ranks in the default process group, 1 without one."""
    return dist.get_world_size() if is_distributed() else 1


def process_rank() -> int:
    """This process's rank in the default process group, 0 without one."""
    return dist.get_rank() if is_distributed() else 0


def _failure(exc: BaseException) -> tuple[str, int | None, bool]:
    """A transportable description of an exception: its message, OSError errno, and whether it is corruption."""
    code = exc.errno if isinstance(exc, RemoteRankError) else getattr(exc, "errno", None)
    message = str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}"
    return message, code if isinstance(code, int) else None, isinstance(exc, CheckpointCorruptError)


def _raise_first(outcomes: list[tuple[Any, tuple[str, int | None, bool] | None]], local: BaseException | None) -> None:
    """Re-raises this rank's own exception, or a RemoteRankError for the lowest failing rank."""
    if local is not None:
        raise local
    for rank, (_, failure) in enumerate(outcomes):
        if failure is not None:
            message, code, corrupt = failure
            kind = RemoteCorruptError if corrupt else RemoteRankError
            raise kind(f"rank {rank} failed: {message}", rank=rank, errno=code) from None


def _attempt(fn: Callable[[], T], run: bool) -> tuple[Any, BaseException | None, Any]:
    """``(result, exception, transportable failure)`` of ``fn()`` (nothing when not ``run``); without a process
    group this rank's exception is raised at once."""
    result: Any = None
    local: BaseException | None = None
    failure = None
    if run:
        try:
            result = fn()
        except Exception as exc:
            local, failure = exc, _failure(exc)
    if local is not None and not is_distributed():
        raise local
    return result, local, failure


def on_every_rank(fn: Callable[[], T]) -> list[T]:
    """Runs ``fn`` on every rank and returns every rank's result (index = rank).

    Raises:
        Exception: This rank's own exception if ``fn`` raised here; else a ``RemoteRankError`` if it raised
            on another rank.
    """
    result, local, failure = _attempt(fn, True)
    if not is_distributed():
        return [result]
    outcomes: list[Any] = [None] * world_size()
    dist.all_gather_object(outcomes, (result, failure))
    _raise_first(outcomes, local)
    return [value for value, _ in outcomes]


def on_rank_zero(fn: Callable[[], T], *, rank: int) -> T:
    """Runs ``fn`` on rank 0 only and gives its result (or its failure) to every rank."""
    result, local, failure = _attempt(fn, rank == 0)
    if not is_distributed():
        return result
    box: list[Any] = [(result, failure)]
    dist.broadcast_object_list(box, src=0)
    outcomes = [box[0]]
    _raise_first(outcomes, local)
    return outcomes[0][0]


def all_gather_json(value: Any) -> list[Any]:
    """Every rank's JSON-safe ``value``, by global rank (``[value]`` without a process group). Collective.

    The values travel as JSON text, so what arrives is what a checkpoint's JSON would hold.
    """
    if not is_distributed():
        return [value]
    texts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(texts, json.dumps(value))
    return [json.loads(text) for text in texts]
