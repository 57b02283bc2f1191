"""What the multi-process runtimes share about devices, memory and each rank's share of a batch."""

from __future__ import annotations

import resource
from collections.abc import Sequence

import torch

from dfm.domain.batch import Batch


def device_type(device: str) -> str:
    """``"cpu"`` or ``"cuda"`` for the ``device`` option (``"auto"``: CUDA when available).

    Raises:
        ValueError: For another device kind.
    """
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda' (each rank uses cuda:LOCAL_RANK)")
    return kind


def peak_memory_gib(device: torch.device) -> float:
    """This rank's peak: CUDA memory allocated on ``device``, else the process's resident set, in GiB."""
    if device.type != "cuda":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
    return torch.cuda.max_memory_allocated(device) / 2**30


def check_rank_share(micro_batches: Sequence[Batch], global_batch_size: int, dp: int) -> None:
    """Raise ``ValueError`` unless this data-parallel rank's micro-batches hold ``global_batch_size / dp`` samples."""
    held = sum(b.size for b in micro_batches)
    if not micro_batches or held * dp != global_batch_size:
        raise ValueError(
            f"each of the {dp} data-parallel ranks must hold global_batch_size / {dp} samples: this rank's "
            f"{len(micro_batches)} micro-batches hold {held}, but global_batch_size is {global_batch_size}"
        )
