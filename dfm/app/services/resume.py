"""Which checkpoint a run (or a generation) starts from, and what happens when one is corrupted.

``checkpoint.resume`` (and ``generate``/``convert export --checkpoint``) name ``auto`` (this run's
checkpoints), ``never``, a run directory or checkpoint root (its checkpoints), or one checkpoint
directory. A set of checkpoints is tried in the store's order — the one ``latest`` names, then older
ones, newest first — and one that is incomplete or corrupted (found from its manifest and file sizes,
or when its hashes are verified as it loads) is skipped with a warning naming it and why; the
checkpoint used is logged. When every one is unusable, that is an error (``--resume never`` starts
over). One checkpoint named by its directory is used or refused, never replaced by another; a refusal
for corruption names the newest intact checkpoint beside it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import attrs

from dfm.app.bootstrap import is_checkpoint_dir
from dfm.app.logging import get_logger
from dfm.ports.checkpoint import (
    CheckpointCandidate,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointInfo,
    CheckpointStore,
)

log = get_logger("dfm.checkpoints")
T = TypeVar("T")
StoreAt = Callable[[Path], CheckpointStore]
"""The checkpoint store of a checkpoint root (``bootstrap.checkpoint_store_at``)."""


@attrs.frozen(kw_only=True)
class Selection:
    """The checkpoints to try, in order."""

    candidates: list[CheckpointCandidate]
    named: bool
    """One checkpoint directory the user named: used or refused, with no fallback."""
    store_at: StoreAt


def select(resume: str, store: CheckpointStore, store_at: StoreAt) -> Selection | None:
    """What ``checkpoint.resume`` names (``store`` is the run's own); None for ``never``.

    Raises:
        CheckpointError: A path that does not exist, or a directory without checkpoints.
    """
    if resume == "never":
        return None
    if resume == "auto":
        return Selection(candidates=store.candidates(), named=False, store_at=store_at)
    return select_path(Path(resume), store_at, option="checkpoint.resume")


def select_path(path: Path, store_at: StoreAt, *, option: str) -> Selection:
    """The checkpoints a path names: a checkpoint directory (just it), a run directory or a checkpoint root.

    Raises:
        CheckpointError: ``path`` does not exist, or holds no checkpoint.
    """
    if not path.exists():
        raise CheckpointError(
            f"{option}: {path} does not exist (expected a run, checkpoint root or checkpoint directory)"
        )
    if is_checkpoint_dir(path):
        step = _step_of(path)
        return Selection(
            candidates=[CheckpointCandidate(info=CheckpointInfo(step=step, path=path))], named=True, store_at=store_at
        )
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    candidates = store_at(root).candidates()
    if not candidates:
        raise CheckpointError(
            f"{option}: no checkpoint under {path} (expected a run directory, a checkpoint root holding "
            "step_XXXXXXX directories, or a checkpoint directory)"
        )
    return Selection(candidates=candidates, named=False, store_at=store_at)


def restore_first(selection: Selection, restore: Callable[[CheckpointInfo], T]) -> tuple[CheckpointInfo, T] | None:
    """Runs ``restore`` on the first usable checkpoint of ``selection``; None when it holds none.

    ``restore`` must raise ``CheckpointCorruptError`` before it changes anything (the store verifies a
    checkpoint's files before loading them), so the next candidate starts from a clean state.

    Raises:
        CheckpointCorruptError: A named checkpoint is corrupted (naming an intact one beside it, if any).
        CheckpointError: Every candidate is unusable, or one fails for another reason (e.g. it does not
            match the model, or holds refused content): that is not skipped.
    """
    skipped: list[str] = []
    for candidate in selection.candidates:
        problem = candidate.problem
        if problem is None:
            try:
                result = restore(candidate.info)
            except CheckpointCorruptError as exc:
                if selection.named:
                    raise _with_sibling(exc, candidate.info.path, selection.store_at) from None
                problem = str(exc)
            else:
                _report_used(candidate.info, skipped)
                return candidate.info, result
        elif selection.named:
            raise _with_sibling(CheckpointCorruptError(problem), candidate.info.path, selection.store_at)
        log.warning("checkpoint unusable, trying an older one", checkpoint=str(candidate.info.path), problem=problem)
        skipped.append(f"{candidate.info.path.name}: {problem}")
    if skipped:
        raise CheckpointError(
            "no usable checkpoint: "
            + "; ".join(skipped)
            + " (start over with --resume never, or name a checkpoint to use with --resume PATH)"
        )
    return None


def _report_used(info: CheckpointInfo, skipped: list[str]) -> None:
    if skipped:
        log.warning(
            "using an older checkpoint: newer ones are unusable",
            checkpoint=str(info.path),
            step=info.step,
            skipped=[entry.split(":", 1)[0] for entry in skipped],
        )


def _with_sibling(exc: CheckpointCorruptError, path: Path, store_at: StoreAt) -> CheckpointCorruptError:
    """``exc`` with the newest intact checkpoint beside ``path`` named, if there is one."""
    others = [c.info.path for c in store_at(path.parent).candidates() if c.problem is None and c.info.path != path]
    if not others:
        return exc
    return CheckpointCorruptError(f"{exc}; the checkpoint {others[0]} is intact: name it instead, or use auto")


def _step_of(path: Path) -> int:
    name = path.name
    if name.startswith("step_") and name[5:].isdigit():
        return int(name[5:])
    return -1
