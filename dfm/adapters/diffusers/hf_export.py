"""Export a (possibly sharded) WAN state dict as a diffusers directory through DCP's Hugging Face writer.

Every rank passes its own state (plain tensors in one process; FSDP2 / tensor-parallel ``DTensor`` shards
under ``torch.distributed``). :class:`torch.distributed.checkpoint.HuggingFaceStorageWriter` writes each
rank's pieces, rank 0 consolidates them into full safetensors files, and the files are renamed to
diffusers' names (``diffusion_pytorch_model[-0000i-of-0000n].safetensors`` + index) next to a
``config.json`` from the spec. So the full model never has to exist in one process's memory before the
consolidation step, which streams tensor by tensor.

The result is what :func:`~dfm.adapters.diffusers.wan_weights.save_wan_diffusers` writes, loadable by
``diffusers.WanTransformer3DModel.from_pretrained`` and by :func:`load_wan_diffusers`.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageWriter

from dfm.adapters.diffusers.wan_weights import (
    CONFIG_NAME,
    INDEX_NAME,
    atomic_write_json,
    existing_wan_files,
    shard_file_name,
    shard_plan,
    spec_to_config,
)
from dfm.domain.specs import WanSpec

_DCP_NAME = "model-{index:05d}-of-{count:05d}.safetensors"
"""Name of consolidated file ``index`` of ``count`` as DCP's Hugging Face writer writes it."""


def export_wan_distributed(
    model_state: Mapping[str, torch.Tensor],
    spec: WanSpec,
    out_dir: Path | str,
    *,
    dtype: torch.dtype | None = torch.bfloat16,
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model_state`` as a diffusers ``WanTransformer3DModel`` directory; call on every rank.

    Args:
        model_state: This rank's state: parameter name (diffusers names) -> tensor or ``DTensor`` (as
            ``torch.distributed.checkpoint.state_dict.get_model_state_dict`` returns it).
        spec: The architecture, written as ``config.json``.
        out_dir: Target directory (on a file system every rank sees).
        dtype: Cast floating tensors to this dtype (``None``: keep).
        max_shard_bytes: Split the weights into files of at most this size, with an index file.
        overwrite: Replace the WAN files of a directory that already holds some.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: ``out_dir`` is a file, or already holds WAN files and ``overwrite`` is false.
    """
    out = Path(out_dir)
    existing = existing_wan_files(out, overwrite=overwrite)  # every rank sees the same files: same outcome
    state = {
        k: v.detach().to(dtype) if dtype is not None and v.is_floating_point() else v.detach()
        for k, v in model_state.items()
    }
    plan = shard_plan({k: v.numel() * v.element_size() for k, v in state.items()}, max_shard_bytes)
    index = {name: i for i, names in enumerate(plan, start=1) for name in names}
    aside = out.with_name(f".{out.name}.export-tmp")
    distributed = dist.is_available() and dist.is_initialized()
    main = not distributed or dist.get_rank() == 0
    if main:
        shutil.rmtree(aside, ignore_errors=True)
        aside.mkdir(parents=True)
    _barrier(distributed)
    writer = HuggingFaceStorageWriter(
        str(aside), fqn_to_index_mapping=index, save_distributed=True, enable_consolidation=True
    )
    with warnings.catch_warnings():  # one process is the intended case, not a misconfiguration
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, storage_writer=writer, no_dist=not distributed)
    if main:
        _publish(aside, out, plan, state, spec, existing)
    _barrier(distributed)
    return out


def _publish(
    aside: Path,
    out: Path,
    plan: list[list[str]],
    state: Mapping[str, torch.Tensor],
    spec: WanSpec,
    existing: list[str],
) -> None:
    """Rename DCP's consolidated files to diffusers' names and move them into ``out``, ``config.json`` last."""
    count = len(plan)
    out.mkdir(parents=True, exist_ok=True)
    for name in existing:
        (out / name).unlink()
    weight_map = {}
    for i, names in enumerate(plan, start=1):
        target = shard_file_name(i, count)
        os.replace(aside / _DCP_NAME.format(index=i, count=count), out / target)
        weight_map.update(dict.fromkeys(names, target))
    if count > 1:
        total = sum(v.numel() * v.element_size() for v in state.values())
        atomic_write_json({"metadata": {"total_size": total}, "weight_map": weight_map}, out / INDEX_NAME)
    atomic_write_json(spec_to_config(spec), out / CONFIG_NAME)
    shutil.rmtree(aside)


def _barrier(distributed: bool) -> None:
    if distributed:
        dist.barrier()
