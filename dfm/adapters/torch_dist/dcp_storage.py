"""Where torch DCP keeps a checkpoint's tensors, without pickle: safetensors files, and a refusing reader.

dfm writes DCP checkpoints through torch's Hugging Face storage layer: every rank writes the chunks it
owns into its own ``shard-<rank+1>-model-00001-of-00001.safetensors`` file, the chunk offsets in the
safetensors header; the reader rebuilds DCP's metadata from those headers. Nothing is pickled, and a
safetensors file is raw bytes plus a JSON header, so reading one cannot run code.

Checkpoints of the pickle era (dfm's layout version 1, and megatron's ``torch_dist`` format) keep DCP's
index in a pickled ``.metadata`` file and tensors in ``.distcp`` files. :class:`RefusingFileSystemReader`
reads them with an unpickler that only builds DCP's own metadata types (dataclasses of sizes, offsets,
dtypes and file positions) and refuses every other global, so a crafted ``.metadata`` is reported
instead of executed. Their tensors are read by DCP with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import math
import pickle
import re
from collections.abc import Callable
from pathlib import Path, PosixPath, PurePosixPath
from typing import Any

import torch
from safetensors import safe_open
from torch.distributed.checkpoint import FileSystemReader, HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint import planner as dcp_planner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

from dfm.ports.checkpoint import CheckpointCorruptError, CheckpointError

REOPEN_BYTES = 64 * 2**20
"""Bytes read from one safetensors file before it is reopened (see :meth:`SafetensorsReader.read_data`)."""
_SHARD_FILE = re.compile(r"^shard-(\d+)-model-")
_DISTCP_FILE = re.compile(r"^__(\d+)_")


def safetensors_writer(directory: Path) -> HuggingFaceStorageWriter:
    """A DCP writer putting each rank's chunks into its own safetensors file in ``directory``."""
    return HuggingFaceStorageWriter(str(directory), save_distributed=True)


class SafetensorsReader(HuggingFaceStorageReader):
    """torch's safetensors DCP reader, whose metadata (rebuilt from the files' headers) is read once and kept.

    Callers read it before ``dcp.load``, so a file that is not safetensors fails as a ``CheckpointError``
    naming the directory instead of inside DCP (which logs such failures with a traceback).
    """

    _metadata: dcp_metadata.Metadata | None = None

    def read_metadata(self) -> dcp_metadata.Metadata:
        """The chunks of every tensor the directory's safetensors files hold.

        Raises:
            CheckpointError: A file is not readable safetensors.
        """
        if self._metadata is None:
            try:
                self._metadata = super().read_metadata()
            except Exception as exc:  # safetensors raises its own error types for a bad header
                raise CheckpointCorruptError(
                    f"the tensors in {self.path} cannot be read as safetensors: {type(exc).__name__}: {exc}"
                ) from None
        return self._metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Reads the planned chunks file by file, reopening a file after every :data:`REOPEN_BYTES` read.

        torch's reader keeps one memory map per file for the whole load, so every page read stays in the
        process's resident set until the file closes (a float32 load peaked at twice the weights' size);
        reopening lets the kernel drop the pages already copied into the caller's tensors.
        """
        per_file: dict[str, list[ReadItem]] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        for file_name, items in per_file.items():
            for batch in _batches(items, lambda item: self._item_bytes(item), REOPEN_BYTES):
                with safe_open(filename=file_name, framework="pt") as stream:
                    for item in batch:
                        self._process_read_request(stream, item, planner)
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def _item_bytes(self, item: ReadItem) -> int:
        return math.prod(item.lengths) * self.storage_data[item.storage_index].dtype.itemsize


def _batches(items: list[ReadItem], size: Callable[[ReadItem], int], limit: int) -> list[list[ReadItem]]:
    """``items`` in order, cut into runs of at most ``limit`` bytes (a larger item is a run of its own)."""
    runs: list[list[ReadItem]] = [[]]
    total = 0
    for item in items:
        if runs[-1] and total + size(item) > limit:
            runs.append([])
            total = 0
        runs[-1].append(item)
        total += size(item)
    return runs


def safetensors_reader(directory: Path) -> SafetensorsReader:
    """A DCP reader of what :func:`safetensors_writer` wrote (any layout: chunks are resharded on load)."""
    return SafetensorsReader(str(directory))


def writer_rank(file_name: str) -> int | None:
    """The rank that wrote a DCP data file (``shard-0000N-...safetensors``: N - 1; ``__N_M.distcp``: N), or None."""
    if match := _SHARD_FILE.match(file_name):
        return int(match.group(1)) - 1
    if match := _DISTCP_FILE.match(file_name):
        return int(match.group(1))
    return None


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The globals a DCP ``.metadata`` pickle refers to (measured on dfm's and megatron's checkpoints)."""
    allowed: dict[tuple[str, str], Any] = {}
    for module, names in (
        (dcp_metadata, ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata")),
        (dcp_metadata, ("TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")),
        (dcp_planner, ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")),
    ):
        allowed |= {(module.__name__, name): getattr(module, name) for name in names}
    allowed[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = _StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    allowed[("pathlib", "PosixPath")] = PosixPath
    allowed[("pathlib", "PurePosixPath")] = PurePosixPath
    allowed |= {("torch", name): value for name, value in vars(torch).items() if isinstance(value, torch.dtype)}
    return allowed


_ALLOWED = _allowed_globals()


class _MetadataUnpickler(pickle.Unpickler):
    """An unpickler that builds only DCP metadata types (Python's "restricting globals" recipe)."""

    def find_class(self, module: str, name: str) -> Any:
        """The allowed class or function named ``module.name``; anything else is refused."""
        found = _ALLOWED.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"{module}.{name}")
        return found


def read_legacy_metadata(path: Path) -> dcp_metadata.Metadata:
    """DCP's pickled ``.metadata`` read with :class:`_MetadataUnpickler`.

    Raises:
        CheckpointError: The file refers to anything but DCP's metadata types, or is not DCP metadata.
    """
    try:
        metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} refers to {exc}, which DCP metadata never contains: refusing to unpickle it (the checkpoint "
            "may have been crafted to run code when loaded; only load checkpoints from sources you trust)"
        ) from None
    except FileNotFoundError:
        raise CheckpointCorruptError(f"{path} is missing (a checkpoint of layout version 1 has one)") from None
    except Exception as exc:  # truncated or garbled pickle data
        raise CheckpointCorruptError(f"{path} is not readable DCP metadata: {type(exc).__name__}: {exc}") from None
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise CheckpointCorruptError(f"{path} holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


class RefusingFileSystemReader(FileSystemReader):
    """``FileSystemReader`` for pickle-era DCP directories whose ``.metadata`` goes through the refusing unpickler.

    Only the directory's global ``.metadata`` is read (every dfm and megatron checkpoint has one): the
    method takes no ``rank``, so DCP does not fall back to per-rank metadata files. Callers read it once
    before ``dcp.load`` (a refusal then surfaces as itself, not wrapped and logged by DCP); the result is
    kept for DCP's own call.
    """

    _metadata: dcp_metadata.Metadata | None = None

    def read_metadata(self) -> dcp_metadata.Metadata:  # type: ignore[override]
        """The directory's metadata (see :func:`read_legacy_metadata`).

        Raises:
            CheckpointError: It is refused, missing or unreadable.
        """
        if self._metadata is None:
            metadata = read_legacy_metadata(Path(self._get_metadata_path()))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = dcp_metadata.StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            self._metadata = metadata
        return self._metadata


def load_plain_value(stream: io.BytesIO, key: str) -> Any:
    """A non-tensor value of a pickle-era DCP checkpoint, read with ``torch.load(weights_only=True)``.

    Raises:
        CheckpointError: The value is anything but plain data (numbers, strings, containers, tensors).
    """
    try:
        return torch.load(stream, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"the checkpoint's value of {key} is not plain data ({first}); refusing to load it (the checkpoint "
            "may have been crafted to run code when loaded)"
        ) from None
