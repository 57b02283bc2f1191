"""What the multi-process runtimes share about devices, memory and each rank's share of a batch."""

from __future__ import annotations

import resource
from collections.abc import Sequence
from typing import TypeVar

import torch

from dfm.domain.batch import Batch, PackedBatch

MicroBatch = TypeVar("MicroBatch", Batch, PackedBatch)

INPUT_DTYPE = torch.float32
"""Dtype of a micro-batch's floating tensors inside every runtime (see :func:`batch_to_device`)."""


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


def batch_to_device(batch: MicroBatch, device: torch.device | str) -> MicroBatch:
    """``batch`` on ``device`` with its floating tensors (latents, text embeddings) in :data:`INPUT_DTYPE`.

    Prepared data are stored in bf16 by default while the weights and the objective's math are float32;
    each runtime casts down to its compute dtype itself (autocast, FSDP2's ``param_dtype``, megatron's
    bf16 stages). Casting every batch to float32 here, before any compute, makes a bf16-stored batch
    train exactly like the same values given in float32, at any precision. Masks and indices keep their
    dtypes.
    """
    return batch.to(device, INPUT_DTYPE)
