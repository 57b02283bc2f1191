"""Unreadable samples (truncated or corrupt ``.tar`` shards) as bad samples, through energon's own skip path.

Energon reads a sample's bytes in its sample loader (``WebdatasetSampleLoaderDataset``), outside every
error handler: a ``tarfile.ReadError`` there ends the loader whatever the ``WorkerConfig``'s error
handlers say. The loader does skip a sample its reader returns as ``None`` (what energon's
``split.yaml`` excludes do). :func:`guard_reads` wraps the loader's tar readers so that a read error
becomes a call of ``on_error(sample_id, where, exc)``, which either raises (strict) or records the sample
and returns ``None`` (skipped). :class:`~dfm.adapters.energon.task_encoder.DfmTaskEncoder` installs it
from energon's ``TaskEncoder.build_cook_crude_sample`` hook, so it runs inside each loader worker.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable
from typing import Any

from megatron.energon.flavors.webdataset.sample_loader import WebdatasetSampleLoaderDataset

READ_ERRORS: tuple[type[Exception], ...] = (tarfile.TarError, OSError, EOFError, ValueError)
"""What reading a sample of a truncated, corrupt or missing shard raises (tarfile, the file system, energon)."""

OnReadError = Callable[[str, str, Exception], None]
"""``(sample id, where, error) -> None`` (skip the sample); raises to stop."""


def sample_id(shard: str, index: Any) -> str:
    """The identity of a sample in a prepared dataset: ``shard[index]`` (energon's index of the sample)."""
    return f"{shard}[{index}]"


class GuardedReader:
    """An energon tar reader whose read errors go to ``on_error`` instead of ending the loader.

    Args:
        inner: Energon's reader (``reader[index]`` -> the sample's raw members, or ``None`` to skip it).
        on_error: Called with the sample's id (:func:`sample_id`), where it is (``the sample at byte B of
            SHARD``) and the error; returns to skip the sample.
    """

    def __init__(self, inner: Any, on_error: OnReadError) -> None:
        self.inner, self.on_error = inner, on_error

    def __getitem__(self, index: int) -> Any:
        try:
            return self.inner[index]
        except READ_ERRORS as exc:
            shard, where = self.locate(index)
            self.on_error(sample_id(shard, index), where, exc)
            return None

    def __len__(self) -> int:
        return len(self.inner)

    def locate(self, index: int) -> tuple[str, str]:
        """``(shard, "the sample at byte B of SHARD")`` of sample ``index``, from energon's index of the shards."""
        try:
            pointer = self.inner._get_itar_sample_pointer(index)
            shard = str(self.inner.tar_filenames[pointer.tar_file_id])
        except Exception:
            return "?", f"sample {index} (its shard is unknown: energon's index cannot say)"
        return shard, f"the sample at byte {pointer.byte_offset} of {shard}"

    def __repr__(self) -> str:
        return f"GuardedReader({self.inner})"


def guard_reads(dataset: Any, on_error: OnReadError) -> bool:
    """Wrap the tar readers of the energon sample loader in ``dataset`` (itself or wrapped) with :class:`GuardedReader`.

    Returns:
        Whether a sample loader was found (energon datasets of other kinds are left alone).
    """
    loader = dataset
    if not isinstance(loader, WebdatasetSampleLoaderDataset):
        find = getattr(dataset, "_find_wrapped_dataset", None)
        loader = find(WebdatasetSampleLoaderDataset) if find is not None else None
    if loader is None:
        return False
    loader.join_readers = [
        r if isinstance(r, GuardedReader) else GuardedReader(r, on_error) for r in loader.join_readers
    ]
    return True
