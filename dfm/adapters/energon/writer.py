"""Writing prepared samples as webdataset shards, and the Energon metadata that makes them a dataset.

Layout of a prepared directory ``OUT``::

    OUT/r000-000000.tar          shards of rank 0, then r000-000001.tar, ...; rank 1 writes r001-*.tar
    OUT/manifests/r000-000000.json   {"shard", "samples", "inputs"}: the source files a finished shard holds
    OUT/.nv-meta/                Energon's metadata (dataset.yaml, split.yaml, .info.json, index.sqlite, ...)

A shard is written to a hidden temporary name (``.r000-000000.tar.tmp``) and appears under its final
name only when complete: its manifest is written (atomically) first, then the tar is renamed. So a
finished shard is exactly a tar with a manifest; a run that stops leaves at most temporary files, which
:func:`remove_unfinished` deletes. Sample keys are ``<shard stem>-<index in shard>`` (unique across
shards, no dots, as webdataset needs).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import attrs
import yaml

MANIFEST_DIR = "manifests"
"""Subdirectory of the manifests, one JSON file per finished shard."""
META_DIR = ".nv-meta"
"""Energon's metadata directory."""
DATASET_YAML = "dataset.yaml"
"""Energon's dataset description inside :data:`META_DIR`."""
_SHARD_RE = re.compile(r"^r(\d{3,})-(\d{6,})\.tar$")


def shard_name(rank: int, index: int) -> str:
    """``r{rank:03d}-{index:06d}.tar``."""
    return f"r{rank:03d}-{index:06d}.tar"


@attrs.frozen(kw_only=True)
class ShardManifest:
    """What one finished shard holds."""

    shard: str
    """File name of the shard in the output directory."""
    samples: int
    """Number of samples in it."""
    inputs: tuple[str, ...] = attrs.field(converter=tuple)
    """Source files of its samples, in order."""

    def to_json(self) -> str:
        """The manifest as JSON."""
        return json.dumps(attrs.asdict(self), indent=1)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def finished_shards(out: Path) -> list[ShardManifest]:
    """Manifests of the finished shards in ``out`` (a tar beside its manifest), sorted by shard name.

    Raises:
        ValueError: A manifest that is not valid JSON of the documented form (naming the file).
    """
    found = []
    for path in sorted((Path(out) / MANIFEST_DIR).glob("r*.json")):
        try:
            record = json.loads(path.read_text())
            manifest = ShardManifest(shard=record["shard"], samples=int(record["samples"]), inputs=record["inputs"])
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a shard manifest ({err}); delete it and its shard to redo them") from None
        if (Path(out) / manifest.shard).is_file():
            found.append(manifest)
    return found


def next_shard_index(out: Path, rank: int) -> int:
    """One past the highest shard index of ``rank`` in ``out`` (0 when it has none)."""
    indices = [int(m.group(2)) for path in Path(out).glob(f"r{rank:03d}-*.tar") if (m := _SHARD_RE.match(path.name))]
    return max(indices, default=-1) + 1


def remove_unfinished(out: Path, rank: int | None = None) -> list[str]:
    """Delete temporary shards and manifests without a shard (of ``rank``, or of every rank when ``None``).

    Returns:
        The names of the files removed.
    """
    out = Path(out)
    prefix = "r" if rank is None else f"r{rank:03d}-"
    removed = []
    for path in [*out.glob(f".{prefix}*.tar.tmp"), *(out / MANIFEST_DIR).glob(f".{prefix}*.json.tmp")]:
        path.unlink(missing_ok=True)
        removed.append(path.name)
    for path in (out / MANIFEST_DIR).glob(f"{prefix}*.json"):
        if not (out / f"{path.stem}.tar").is_file():
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


class ShardWriter:
    """Writes samples (dicts of member name -> bytes) into shards of ``samples_per_shard`` samples.

    Use as a context manager: leaving it normally finishes the last, partial shard; leaving it with an
    exception drops that shard (its temporary file is removed), keeping the finished ones.
    """

    def __init__(self, out: Path, *, rank: int, samples_per_shard: int, start_index: int = 0) -> None:
        """Prepare to write ``out/r{rank:03d}-{index:06d}.tar`` from ``index = start_index`` on.

        Raises:
            ValueError: For ``samples_per_shard < 1`` or a negative rank or index.
        """
        if samples_per_shard < 1 or rank < 0 or start_index < 0:
            raise ValueError(
                f"need samples_per_shard >= 1, rank >= 0, start_index >= 0; got {samples_per_shard}, {rank}, "
                f"{start_index}"
            )
        self.out = Path(out)
        self.rank = rank
        self.samples_per_shard = samples_per_shard
        self.index = start_index
        self.finished: list[ShardManifest] = []
        """Manifests of the shards this writer finished."""
        self._file: BinaryIO | None = None
        self._tar: Any = None
        self._inputs: list[str] = []

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    @property
    def _name(self) -> str:
        return shard_name(self.rank, self.index)

    @property
    def _tmp(self) -> Path:
        return self.out / f".{self._name}.tmp"

    def write(self, source: str, members: Mapping[str, bytes]) -> ShardManifest | None:
        """Add one sample taken from the file ``source``; returns the manifest of a shard this completed.

        Args:
            source: The input file (recorded in the manifest).
            members: Member name (e.g. ``"tensors.safetensors"``) -> bytes.
        """
        if self._tar is None:
            import webdataset

            self.out.mkdir(parents=True, exist_ok=True)
            self._file = self._tmp.open("wb")
            self._tar = webdataset.TarWriter(self._file, encoder=False, mtime=0.0)
        key = f"{Path(self._name).stem}-{len(self._inputs):06d}"
        self._tar.write({"__key__": key, **members})
        self._inputs.append(source)
        if len(self._inputs) >= self.samples_per_shard:
            return self._finish()
        return None

    def close(self) -> ShardManifest | None:
        """Finish the open shard, if any; returns its manifest."""
        return self._finish() if self._tar is not None else None

    def abort(self) -> None:
        """Drop the open shard (remove its temporary file)."""
        if self._tar is not None:
            with contextlib.suppress(Exception):
                self._tar.close()
            self._tar = None
            self._inputs = []
        self._tmp.unlink(missing_ok=True)

    def _finish(self) -> ShardManifest:
        self._tar.close()  # also closes the file
        self._tar = self._file = None
        manifest = ShardManifest(shard=self._name, samples=len(self._inputs), inputs=self._inputs)
        (self.out / MANIFEST_DIR).mkdir(parents=True, exist_ok=True)
        _write_atomic(self.out / MANIFEST_DIR / f"{Path(self._name).stem}.json", manifest.to_json().encode())
        os.replace(self._tmp, self.out / self._name)
        self.finished.append(manifest)
        self._inputs = []
        self.index += 1
        return manifest


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Energon's preparator prints progress lines; keep the caller's stdout clean."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def write_energon_metadata(
    out: Path, shards: Sequence[str], *, subflavors: Mapping[str, Any] | None = None, workers: int = 2
) -> Path:
    """Index ``shards`` like ``energon prepare`` and describe them as a ``CrudeWebdataset``.

    Runs energon's own preparator (``BaseWebdatasetFactory.prepare_dataset``, what
    ``energon prepare OUT --non-interactive --split-ratio 1,0,0`` calls) with every shard in the
    ``train`` split, then writes ``.nv-meta/dataset.yaml`` naming ``CrudeWebdataset`` from
    ``megatron.energon`` with ``subflavors``.

    Args:
        out: The dataset directory.
        shards: Shard file names relative to ``out`` (at least one).
        subflavors: Recorded in ``dataset.yaml``; every loaded sample carries them (``__subflavors__``).
        workers: Processes energon uses to index the shards.

    Returns:
        The path of ``dataset.yaml``.

    Raises:
        ValueError: When there is no shard to index.
    """
    from megatron.energon.flavors.webdataset.base_webdataset import BaseWebdatasetFactory

    out = Path(out)
    if not shards:
        raise ValueError(f"{out}: no shards to index; nothing was prepared")
    with _stdout_to_stderr():
        BaseWebdatasetFactory.prepare_dataset(
            out,
            list(shards),
            split_parts_ratio=[("train", 1.0), ("val", 0.0), ("test", 0.0)],
            shuffle_seed=None,
            workers=max(1, min(workers, len(shards))),
        )
    definition: dict[str, Any] = {"__module__": "megatron.energon", "__class__": "CrudeWebdataset"}
    if subflavors:
        definition["subflavors"] = dict(subflavors)
    path = out / META_DIR / DATASET_YAML
    _write_atomic(path, yaml.safe_dump(definition, sort_keys=False).encode())
    return path
