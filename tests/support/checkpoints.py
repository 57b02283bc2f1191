"""Checkpoints as an attacker or an older dfm would hand them over.

- :func:`write_v1_checkpoint` writes layout version 1 exactly as dfm did before safetensors checkpoints
  (``dcp.save`` with DCP's ``FileSystemWriter``: a pickled ``.metadata``, plain values ``torch.save``-d
  inside ``.distcp``; then ``meta.json`` and a sha256 manifest at version 1).
- :class:`Payload` pickles to a call of ``os.system`` that creates a marker file: what a crafted
  checkpoint runs if a loader unpickles it. :func:`rewrite_manifest` re-hashes every file, as whoever
  hands over a checkpoint can (so the manifest never protects against a crafted one).
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter

from dfm.adapters.checkpoint import _layout


class Payload:
    """Unpickling this runs ``touch MARKER`` (through ``os.system``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = Path(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def payload_pickle(marker: Path) -> bytes:
    """The bytes of a pickle whose loading creates ``marker``."""
    return pickle.dumps(Payload(marker), protocol=4)


def rewrite_manifest(directory: Path, *, version: int | None = None) -> None:
    """Re-hash every file of a checkpoint directory into its manifest (keeping its layout version)."""
    if version is None:
        version = json.loads((directory / _layout.MANIFEST).read_text())["version"]
    entries = [_layout.describe(directory, name) for name in _layout.data_files(directory)]
    step = _layout.parse_step(directory.name) or 0
    files = [{"path": e.path, "size": e.size, "sha256": e.sha256} for e in sorted(entries, key=lambda e: e.path)]
    document = {"format": _layout.FORMAT, "version": version, "step": step, "hash": "sha256", "files": files}
    (directory / _layout.MANIFEST).write_text(json.dumps(document, indent=2) + "\n")


def write_v1_checkpoint(root: Path, step: int, state: dict[str, Any], meta: dict[str, Any]) -> Path:
    """``root/step_XXXXXXX`` in layout version 1 (one process), published with the ``latest`` pointer."""
    directory = root / _layout.step_dir_name(step)
    directory.mkdir(parents=True)
    dcp.save(state, storage_writer=FileSystemWriter(directory), no_dist=True)
    document = {"format": _layout.FORMAT, "version": 1, "step": step, "meta": meta}
    (directory / _layout.META).write_text(json.dumps(document, indent=2) + "\n")
    rewrite_manifest(directory, version=1)
    (root / _layout.LATEST).write_text(directory.name + "\n")
    return directory


def replace_file(directory: Path, relative: str, content: bytes) -> None:
    """Puts ``content`` at ``relative`` in a checkpoint and re-hashes the manifest to match."""
    (directory / relative).write_bytes(content)
    rewrite_manifest(directory)


def set_meta_version(directory: Path, version: int) -> None:
    """Rewrites ``meta.json``'s layout version (the manifest is re-hashed by the caller)."""
    path = directory / _layout.META
    document = json.loads(path.read_text())
    document["version"] = version
    path.write_text(json.dumps(document, indent=2) + "\n")
