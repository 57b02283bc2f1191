"""Trained models out of checkpoints, and checkpoints out to diffusers.

Both build the network alone (DESIGN.md rule 9): allocated once, on its device and in the dtype asked
for, and filled with one set of a checkpoint's weights (the EMA's or the raw ones); no optimizer state
or EMA copy is ever allocated, so a model samples or exports in about its own weights' memory.

- :func:`load_for_inference`: the training config and the model of a run directory, a checkpoint
  directory, or a diffusers directory that :func:`export_checkpoint` wrote (for generation).
- :func:`export_checkpoint`: a checkpoint's WAN weights (EMA or raw) as a diffusers
  ``WanTransformer3DModel`` directory, with the training config beside them as ``dfm_config.yaml``.
  Under ``torchrun`` it rebuilds the checkpoint's own parallel runtime, so every rank restores and
  writes only its shards (a 14B model never exists whole in one process); in one process it loads the
  checkpoint, whatever layout trained it, into the ``local`` runtime.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.distributed as dist
from torch import nn

from dfm.app import bootstrap
from dfm.app.bootstrap import (
    CONFIG_NAME,
    DistEnv,
    export_wan_distributed,
    load_wan_diffusers,
    read_meta,
    resolve_device,
)
from dfm.app.config import TrainConfig, config_from_yaml, config_to_yaml
from dfm.app.logging import get_logger
from dfm.app.services.lora import load_lora_run, without_lora
from dfm.app.services.resume import restore_first, select_path
from dfm.domain.layout import ParallelLayout
from dfm.domain.networks.attention import AttentionKernel, SDPAAttention
from dfm.domain.networks.wan import WanTransformer
from dfm.domain.specs import WanSpec
from dfm.ports.checkpoint import CheckpointError
from dfm.ports.runtime import ParallelRuntime

log = get_logger("dfm.checkpoints")
EXPORTED_CONFIG = "dfm_config.yaml"
"""The training config an exported diffusers directory carries beside its weights (codecs, sampling)."""


@attrs.frozen(kw_only=True)
class ExportResult:
    """What :func:`export_checkpoint` wrote."""

    out: Path
    """The diffusers directory."""
    checkpoint: Path
    """The checkpoint directory it came from."""
    step: int
    """The checkpoint's training step."""
    weights: str
    """``"ema"`` or ``"model"`` (the raw training weights)."""
    ranks: int
    """Processes that restored and wrote shards."""


# Loading ---------------------------------------------------------------------------------------


def load_for_inference(
    where: Path | str,
    *,
    use_ema: bool = True,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    attention: str | None = None,
) -> tuple[TrainConfig, nn.Module]:
    """The training config and the model (EMA weights if kept and asked for) of a checkpoint, in eval mode.

    ``where`` is a run directory (its newest checkpoint), a checkpoint directory, or a diffusers
    directory written by :func:`export_checkpoint` (``config.json`` + weights + ``dfm_config.yaml``;
    it holds one set of weights, chosen at export, so ``use_ema`` does not apply). A checkpoint loads
    into one process with the ``local`` runtime whatever runtime and layout trained it: the checkpoint's
    DCP metadata records global shapes, so FSDP2 / tensor-parallel / megatron shards load into the full
    model. The network is built alone on ``device`` in ``dtype`` and the chosen weights are read straight
    into it (cast on the way); no optimizer state or EMA copy is allocated.

    Args:
        where: A run directory, a checkpoint directory or an exported diffusers directory.
        use_ema: Load the EMA weights when the checkpoint keeps them (else the raw training weights).
        dtype: The weights' dtype (``None``: float32; ``torch.bfloat16`` halves the memory).
        device: Where the weights live (``None``: the current CUDA device if any, else the CPU).
        attention: The SDPA backend (``auto``, ``cudnn``, ``flash``, ``efficient``, ``math``, ``fa4``; ``None``:
            the training config's ``train.attention_backend``).

    Raises:
        CheckpointError: no checkpoint at ``where``, one that fails verification, or an exported
            directory without its ``dfm_config.yaml``.
        ValueError: an exported directory whose weights do not fit its configs, or an unknown device.
        ConfigError: ``attention="fa4"`` (or a run trained with it) where FlashAttention-4 cannot be activated.
    """
    where = Path(where)
    if attention is not None:  # named by the user: an error names the option
        bootstrap.use_attention_backend(attention, option="--attention")
    if is_exported_dir(where):
        kernel = None if attention is None else SDPAAttention(attention)
        return load_exported(where, attention=kernel, dtype=dtype, device=device)
    selection = select_path(where, bootstrap.checkpoint_store_at, option="--checkpoint")
    found = restore_first(
        selection, lambda info: _load_model(info.path, use_ema=use_ema, dtype=dtype, device=device, attention=attention)
    )
    assert found is not None  # select_path never gives an empty selection
    info, (cfg, model, which) = found
    log.info("loaded checkpoint", path=str(info.path), step=info.step, weights=which)
    return cfg, model


def _load_model(
    directory: Path,
    *,
    use_ema: bool,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
    attention: str | None,
) -> tuple[TrainConfig, nn.Module, str]:
    """The config, the network holding the chosen weights, and which weights (``"ema"`` or ``"model"``)."""
    cfg = _config_of(directory, read_meta(directory))
    local = attrs.evolve(without_lora(cfg), runtime="local")  # plain DCP reads any runtime's model entries
    if attention is not None:
        local = attrs.evolve(local, train=attrs.evolve(local.train, attention_backend=attention))
    runtime = bootstrap.build_runtime(local, device="auto" if device is None else str(device))
    model = runtime.build_network(cfg.model, inference_dtype=dtype or torch.float32)
    if cfg.lora.enabled:
        return cfg, model, load_lora_run(runtime, model, cfg, directory, use_ema=use_ema)
    which = _restore_weights(runtime, local, directory, use_ema=use_ema)
    return cfg, model, which


def is_exported_dir(where: Path) -> bool:
    """Whether ``where`` is a diffusers model directory (``config.json`` or ``diffusion_pytorch_model*`` files)."""
    return where.is_dir() and ((where / CONFIG_NAME).is_file() or any(where.glob("diffusion_pytorch_model*")))


def load_exported(
    where: Path,
    *,
    attention: AttentionKernel | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> tuple[TrainConfig, WanTransformer]:
    """The config and network of a diffusers directory with a ``dfm_config.yaml``, in eval mode.

    The network is built from ``config.json`` (it must equal ``model`` in ``dfm_config.yaml``) on the meta
    device, with the config's attention backend, and takes the file's tensors moved to ``device`` and cast
    to ``dtype`` one at a time (``None``: float32 on the device the ``local`` runtime would pick); the parts the
    network keeps in float32 (``WanTransformer.fp32_modules``) stay float32.

    Raises:
        CheckpointError: ``dfm_config.yaml`` is missing.
        ValueError: A bad diffusers directory, weights that do not fit the configs, or an unknown device.
    """
    config_path = where / EXPORTED_CONFIG
    if not config_path.is_file():
        raise CheckpointError(
            f"{config_path}: missing; generating from a diffusers directory needs the training config beside "
            f"the weights (`python -m dfm.app.convert export --checkpoint RUN_DIR` writes it; for other weights, "
            f"write one with `python -m dfm.app.train --recipe NAME --dry-run > {config_path}`)"
        )
    cfg = config_from_yaml(config_path.read_text(), source=str(config_path))
    target = resolve_device("auto" if device is None else str(device))
    spec, state = load_wan_diffusers(where)
    if cfg.model != spec:
        raise ValueError(
            f"{where}: {CONFIG_NAME} and the model section of {EXPORTED_CONFIG} describe different networks "
            f"({spec} vs {cfg.model})"
        )
    weight_dtype = dtype or torch.float32
    keep = set(WanTransformer.fp32_modules)
    for name in list(state):  # one tensor at a time: the file's copy of it is freed as it moves
        value = state[name]
        if value.is_floating_point():
            state[name] = value.to(target, torch.float32 if keep & set(name.split(".")) else weight_dtype)
        else:
            state[name] = value.to(target)
    if attention is None:
        bootstrap.use_attention_backend(cfg.train.attention_backend)
        attention = SDPAAttention(cfg.train.attention_backend)
    model = build_wan(spec, state, source=where, attention=attention)
    return cfg, model.requires_grad_(False).eval()


def build_wan(
    spec: WanSpec,
    state: Mapping[str, torch.Tensor],
    *,
    source: Path | str,
    attention: AttentionKernel | None = None,
) -> WanTransformer:
    """A :class:`WanTransformer` of ``spec`` holding ``state`` (checked strictly; tensors used in place)."""
    with torch.device("meta"):
        model = WanTransformer(spec, attention=attention)
    check_wan_state(model, state, source=source)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def check_wan_state(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: Path | str) -> None:
    """Raise a ``ValueError`` naming every key of ``state`` that is missing, unexpected or mis-shaped for ``model``."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    problems = []
    if missing := sorted(expected.keys() - got.keys()):
        problems.append(f"missing keys {_some(missing)}")
    if unexpected := sorted(got.keys() - expected.keys()):
        problems.append(f"unexpected keys {_some(unexpected)}")
    common = sorted(expected.keys() & got.keys())
    if mismatched := [f"{k} is {got[k]}, expected {expected[k]}" for k in common if got[k] != expected[k]]:
        problems.append(f"shape mismatches {_some(mismatched)}")
    if problems:
        raise ValueError(f"{source}: weights do not fit the WAN config: " + "; ".join(problems))


def _some(items: list[str], limit: int = 10) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return f"[{', '.join(items[:limit])}]{more}"


# Exporting -------------------------------------------------------------------------------------


def export_checkpoint(
    where: Path | str,
    out: Path | str,
    *,
    use_ema: bool = True,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Write a checkpoint's WAN weights as a diffusers directory, with ``dfm_config.yaml`` beside them.

    Call on every rank when launched by ``torchrun``: with more than one process the checkpoint's own
    runtime is rebuilt (its ``parallel.*`` layout must fit the processes launched; ``data_shard=-1``
    fits any multiple of the other sizes) and each rank restores and writes its shards through DCP's
    Hugging Face writer. One process loads the checkpoint into the ``local`` runtime.

    Args:
        where: A run directory (its newest checkpoint) or a checkpoint directory.
        out: The diffusers directory to write (on a file system every rank sees).
        use_ema: Export the EMA weights when the checkpoint keeps them (else the raw weights).
        dtype: Cast floating weights to this dtype (``None``: as trained, float32).
        max_shard_bytes: Split the weights into files of at most this size, with an index file.
        overwrite: Replace the WAN files of a directory that already holds some.

    Raises:
        CheckpointError: No checkpoint at ``where``, one that fails verification, a DiT checkpoint, or a
            checkpoint whose layout does not fit the processes launched.
        ValueError: ``out`` already holds WAN files and ``overwrite`` is false.
    """
    selection = select_path(Path(where), bootstrap.checkpoint_store_at, option="--checkpoint")
    found = restore_first(selection, lambda info: _export(info.path, out, use_ema, dtype, max_shard_bytes, overwrite))
    assert found is not None  # select_path never gives an empty selection
    return found[1]


def _export(
    directory: Path,
    out: Path | str,
    use_ema: bool,
    dtype: torch.dtype | None,
    max_shard_bytes: int | None,
    overwrite: bool,
) -> ExportResult:
    meta = read_meta(directory)
    cfg = _config_of(directory, meta)
    if not isinstance(cfg.model, WanSpec):
        raise CheckpointError(
            f"{directory} holds a {cfg.model.arch!r} model; only WAN models export to a diffusers "
            "WanTransformer3DModel directory"
        )
    world = DistEnv.from_env().world_size
    if world > 1:
        _check_launch(cfg, directory, world)
    built = without_lora(cfg if world > 1 else attrs.evolve(cfg, runtime="local"))
    runtime = bootstrap.build_runtime(built)
    try:
        model = runtime.build_network(cfg.model, inference_dtype=dtype or torch.float32)  # no optimizer state
        if cfg.lora.enabled:  # the base with the adapters folded in
            which = load_lora_run(runtime, model, cfg, directory, use_ema=use_ema)
        else:
            which = _restore_weights(runtime, built, directory, use_ema=use_ema)
        out = export_wan_distributed(
            runtime.weights(), cfg.model, out, dtype=dtype, max_shard_bytes=max_shard_bytes, overwrite=overwrite
        )
        if runtime.topology.is_main:
            _write_exported_config(cfg, out / EXPORTED_CONFIG, directory, which)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
    finally:
        runtime.close()  # a parallel runtime tears down the process group it created
    return ExportResult(out=out, checkpoint=directory, step=int(meta["step"]), weights=which, ranks=world)


def _check_launch(cfg: TrainConfig, directory: Path, world: int) -> None:
    """Raise a ``CheckpointError`` unless the checkpoint's parallel layout fits ``world`` processes."""
    if cfg.lora.enabled:
        raise CheckpointError(
            f"{directory} holds a LoRA run's adapters; its merged weights export from one process (without "
            f"torchrun), but {world} processes were launched; convert export-lora writes the adapters alone"
        )
    if cfg.runtime == "megatron":
        raise CheckpointError(
            f"{directory} was trained with runtime=megatron; its weights export from one process (they load "
            f"into one process at any layout), but {world} processes were launched; run the export without torchrun"
        )
    if cfg.runtime != "fsdp2":
        raise CheckpointError(
            f"{directory} was trained with runtime={cfg.runtime}, which runs in one process, but {world} "
            "processes were launched; run the export as one process (without torchrun)"
        )
    p = cfg.parallel
    layout = ParallelLayout(
        data_replicate=p.data_replicate, data_shard=p.data_shard, context=p.context, tensor=p.tensor
    )
    if not layout.fits(world):
        trained = (
            f"parallel.data_replicate={p.data_replicate}, parallel.data_shard={p.data_shard}, "
            f"parallel.context={p.context}, parallel.tensor={p.tensor}"
        )
        raise CheckpointError(
            f"{directory} was trained with {trained}, which needs {layout.ranks_needed()} processes, but {world} "
            "were launched; launch the export with a process count that fits (torchrun --nproc-per-node N), or run "
            "it as one process, which loads any layout"
        )


def _restore_weights(runtime: ParallelRuntime, cfg: TrainConfig, directory: Path, *, use_ema: bool) -> str:
    """Read only the EMA (when kept and asked for) or the raw weights of ``directory`` into the runtime's
    network; returns ``"ema"`` or ``"model"``. Collective. The runtime knows where its state keeps them."""
    store = bootstrap.build_checkpoint_store(cfg)
    return runtime.restore_weights(lambda state: store.load(directory, {"runtime": state}), use_ema=use_ema)


def _write_exported_config(cfg: TrainConfig, path: Path, directory: Path, which: str) -> None:
    weights = "EMA weights" if which == "ema" else "raw training weights (no EMA)"
    header = f"# dfm training config of the weights beside it: {weights} of checkpoint {directory}\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(header + config_to_yaml(cfg))
    os.replace(tmp, path)


# Shared ----------------------------------------------------------------------------------------


def _config_of(directory: Path, meta: Mapping[str, Any]) -> TrainConfig:
    return config_from_yaml(meta["config"], source=f"{directory} meta.json")
