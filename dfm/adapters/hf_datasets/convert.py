"""Prepared webdataset shards -> a Hugging Face dataset (``save_to_disk``) with the same samples.

The result has one row per sample, in shard order: ``__key__`` (string), ``tensors.safetensors``
(binary) and ``meta.json`` (string), the member bytes copied unchanged. A sample that lacks a member
gets a null there (the reader counts it as a bad sample). No tensor is decoded.
"""

from __future__ import annotations

import json
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import structlog

from dfm.ports.samples import META, TENSORS

FEATURES = datasets.Features(
    {"__key__": datasets.Value("string"), TENSORS: datasets.Value("binary"), META: datasets.Value("string")}
)
"""Columns of a converted dataset."""
_log = structlog.get_logger(__name__)


def shard_paths(root: Path) -> list[Path]:
    """The shards of a prepared directory: those energon indexed (``.nv-meta/.info.json``), else every ``.tar``."""
    info = root / ".nv-meta" / ".info.json"
    if info.is_file():
        names = sorted(json.loads(info.read_text()).get("shard_counts", {}))
        return [root / name for name in names]
    return sorted(p for p in root.glob("**/*.tar") if ".nv-meta" not in p.parts)


def iter_samples(shards: list[Path]) -> Iterator[dict[str, Any]]:
    """Rows from webdataset shards: members grouped by key (the name up to the first dot of its file name)."""
    for shard in shards:
        with tarfile.open(shard) as tar:
            current: dict[str, Any] | None = None
            for member in tar:
                if not member.isfile():
                    continue
                directory, _, name = member.name.rpartition("/")
                stem, _, suffix = name.partition(".")
                key = f"{directory}/{stem}" if directory else stem
                if current is None or current["__key__"] != key:
                    if current is not None:
                        yield current
                    current = {"__key__": key, TENSORS: None, META: None}
                if suffix in (TENSORS, META):
                    handle = tar.extractfile(member)
                    data = handle.read() if handle is not None else b""
                    current[suffix] = data if suffix == TENSORS else data.decode("utf-8", errors="replace")
            if current is not None:
                yield current


def webdataset_to_hf(src: str | Path, dst: str | Path, *, max_shard_size: str = "500MB") -> int:
    """Convert the prepared shards under ``src`` into a ``save_to_disk`` dataset at ``dst``.

    Args:
        src: Prepared webdataset directory (``python -m dfm.app.prepare`` output).
        dst: Output directory (must not exist yet).
        max_shard_size: Arrow file size of the saved dataset's shards.

    Returns:
        The number of rows written.

    Raises:
        ValueError: ``src`` holds no shards, or ``dst`` exists.
    """
    src, dst = Path(src), Path(dst)
    shards = shard_paths(src)
    if not shards:
        raise ValueError(f"{src}: no .tar shards to convert")
    if dst.exists():
        raise ValueError(f"{dst} exists; choose a new directory for the converted dataset")
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".hf-convert-", dir=dst.parent) as cache:
        table = datasets.Dataset.from_generator(
            _rows, gen_kwargs={"shards": [str(s) for s in shards]}, features=FEATURES, cache_dir=cache
        )
        table.save_to_disk(str(dst), max_shard_size=max_shard_size)
        rows = len(table)
        del table
    _log.info("converted to a Hugging Face dataset", src=str(src), dst=str(dst), rows=rows, shards=len(shards))
    return rows


def _rows(shards: list[str]) -> Iterator[dict[str, Any]]:
    yield from iter_samples([Path(s) for s in shards])
