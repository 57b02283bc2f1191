"""Which checkpoint a run starts from: ``checkpoint.resume`` = auto | never | PATH."""

from __future__ import annotations

from pathlib import Path

from dfm.ports.checkpoint import CheckpointError, CheckpointInfo, CheckpointStore


def resolve_resume(resume: str, store: CheckpointStore) -> CheckpointInfo | None:
    """``auto``: the newest complete checkpoint of the run, if any; ``never``: none; else that path.

    Raises:
        CheckpointError: an explicit path that does not exist.
    """
    if resume == "never":
        return None
    if resume == "auto":
        return store.latest()
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"checkpoint.resume: {path} does not exist")
    step = _step_of(path)
    return CheckpointInfo(step=step, path=path)


def _step_of(path: Path) -> int:
    name = path.name
    if name.startswith("step_") and name[5:].isdigit():
        return int(name[5:])
    return -1
