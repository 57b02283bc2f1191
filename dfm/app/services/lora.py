"""LoRA adapters in and out of runs: start from a file, export a checkpoint's, merge into weights, sample with them.

A LoRA run's checkpoints hold the adapters alone (with their optimizer state and EMA): the frozen base is
``checkpoint.init_from`` (a diffusers directory) or, without it, the seed's initial weights, rebuilt on resume.

- :func:`initial_adapters`: ``lora.init_from``'s adapters, in the runtime's naming, to start a fresh run from.
- :func:`export_lora`: a checkpoint's adapters (EMA or raw) as a diffusers-format file (``convert export-lora``).
- :func:`merge_lora`: a diffusers directory with adapters folded into its weights (``convert merge-lora``).
- :func:`apply_loras`: adapters folded into a loaded network, in place (``generate --lora``).
- :func:`checkpoint_adapters`: a LoRA checkpoint's adapters, ``alpha / r`` folded into ``B``.
- :func:`load_lora_run`: a LoRA run's base with its adapters folded in, for sampling and full export.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import attrs
import torch
from torch import nn

from dfm.app import bootstrap
from dfm.app.config import ConfigError, LoraConfig, TrainConfig, config_from_yaml
from dfm.app.logging import get_logger
from dfm.app.services.resume import restore_first, select_path
from dfm.ports.checkpoint import CheckpointError
from dfm.ports.runtime import ParallelRuntime

log = get_logger("dfm.lora")


@attrs.frozen(kw_only=True)
class LoraFile:
    """One adapter file to apply, and how strongly."""

    path: Path
    scale: float = 1.0


@attrs.frozen(kw_only=True)
class LoraExport:
    """What :func:`export_lora` wrote."""

    out: Path
    checkpoint: Path
    step: int
    weights: str
    """``"ema"`` or ``"model"``."""
    tensors: int


def initial_adapters(cfg: TrainConfig) -> dict[str, torch.Tensor] | None:
    """The adapters of ``lora.init_from`` in the runtime's (peft's) naming, ``B`` divided by ``alpha / rank``.

    Raises:
        ConfigError: An unreadable file, or adapters of another rank.
    """
    where, settings = cfg.lora.init_from, cfg.lora.settings()
    if where is None or settings is None:
        return None
    try:
        adapters = bootstrap.read_lora_file(where)
    except ValueError as exc:
        raise ConfigError(f"lora.init_from: {exc}") from None
    ranks = sorted({v.shape[0] for k, v in adapters.items() if k.endswith(".lora_A.weight")})
    if ranks != [settings.rank]:
        raise ConfigError(f"lora.init_from: {where} holds adapters of rank {ranks}, but lora.rank={settings.rank}")
    if any(k.endswith(".lora_B.bias") for k in adapters):
        raise ConfigError(f"lora.init_from: {where} holds bias deltas (lora_B.bias), which dfm does not train")
    return {
        bootstrap.from_adapter_key(k): (v / settings.scale if ".lora_B." in k else v).float()
        for k, v in adapters.items()
    }


def checkpoint_adapters(directory: Path, cfg: TrainConfig, *, use_ema: bool) -> tuple[dict[str, torch.Tensor], str]:
    """A LoRA checkpoint's adapters as ``<module>.lora_A.weight`` / ``.lora_B.weight`` with ``alpha / r`` in ``B``.

    Only the adapter tensors are read (the EMA's when kept and ``use_ema``); returns them and ``"ema"``/``"model"``.
    """
    settings = cfg.lora.settings()
    if settings is None:
        raise CheckpointError(f"{directory} is not a LoRA run's checkpoint (its config has no lora.rank)")
    template = bootstrap.adapter_template(cfg.model, settings)
    which = "ema" if use_ema and cfg.train.ema_decay is not None else "model"
    prefix = "module." if which == "ema" else ""
    state = {which: {prefix + k: v for k, v in template.items()}}
    bootstrap.build_checkpoint_store(cfg).load(directory, {"runtime": state})
    adapters = {}
    for name, value in state[which].items():
        key = bootstrap.adapter_key(name.removeprefix(prefix))
        adapters[key] = value * settings.scale if ".lora_B." in key else value
    return adapters, which


def export_lora(where: Path | str, out: Path | str, *, use_ema: bool = True) -> LoraExport:
    """Write a LoRA checkpoint's adapters as a diffusers-format safetensors file (one process).

    Raises:
        CheckpointError: No checkpoint at ``where``, one that fails verification, or not a LoRA run's.
    """
    selection = select_path(Path(where), bootstrap.checkpoint_store_at, option="--checkpoint")
    found = restore_first(selection, lambda info: _export(info.path, Path(out), use_ema))
    assert found is not None  # select_path never gives an empty selection
    return found[1]


def _export(directory: Path, out: Path, use_ema: bool) -> LoraExport:
    meta = bootstrap.read_meta(directory)
    cfg = config_from_yaml(meta["config"], source=f"{directory} meta.json")
    adapters, which = checkpoint_adapters(directory, cfg, use_ema=use_ema)
    settings = cfg.lora.settings()
    assert settings is not None
    info = {
        "rank": settings.rank,
        "alpha": settings.alpha,
        "scale_in_lora_B": settings.scale,
        "step": int(meta["step"]),
        "weights": which,
        "arch": cfg.model.arch,
    }
    bootstrap.write_lora_file(out, adapters, scale=1.0, meta=info)
    log.info("exported LoRA", out=str(out), checkpoint=str(directory), weights=which, tensors=len(adapters))
    return LoraExport(out=out, checkpoint=directory, step=int(meta["step"]), weights=which, tensors=len(adapters))


def merge_lora(
    base: Path | str,
    loras: Sequence[LoraFile],
    out: Path | str,
    *,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """A diffusers WAN directory of ``base``'s weights with each adapter file's ``scale * B A`` added.

    ``dfm_config.yaml`` (if ``base`` has one) is copied along, so ``generate`` samples the result.

    Raises:
        ValueError: An unreadable base or adapter file, adapters that do not fit the base, or an ``out`` already
            holding WAN files without ``overwrite``.
    """
    spec, weights = bootstrap.load_wan_diffusers(base)
    for lora in loras:
        weights = bootstrap.merge_adapters(weights, bootstrap.read_lora_file(lora.path), lora.scale)
    if dtype is not None:
        weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    out = Path(out)
    bootstrap.save_wan_diffusers(weights, spec, out, overwrite=overwrite)
    config = Path(base) / "dfm_config.yaml"
    if config.is_file():
        bootstrap.write_text_atomic(out / config.name, config.read_text())
    return out


@torch.no_grad()
def apply_loras(model: nn.Module, loras: Sequence[LoraFile]) -> None:
    """Fold each adapter file's ``scale * B A`` into ``model``'s weights in place (computed in float32).

    Raises:
        ValueError: An unreadable file, or adapters naming modules (or shapes) ``model`` lacks.
    """
    for lora in loras:
        adapters = bootstrap.read_lora_file(lora.path)
        fold_into(model, adapters, lora.scale)
        log.info("applied LoRA", file=str(lora.path), scale=lora.scale, tensors=len(adapters))


@torch.no_grad()
def fold_into(model: nn.Module, adapters: dict[str, torch.Tensor], scale: float) -> None:
    """``model``'s adapted weights (and biases) += ``scale * B A`` (``scale *`` bias deltas), in place."""
    params = dict(model.named_parameters())
    touched = {k.rsplit(".lora_", 1)[0] for k in adapters}
    own = {
        f"{m}.{leaf}": params[f"{m}.{leaf}"] for m in touched for leaf in ("weight", "bias") if f"{m}.{leaf}" in params
    }
    merged = bootstrap.merge_adapters(own, adapters, scale)
    for name, value in merged.items():
        params[name].copy_(value)


def without_lora(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with LoRA off: the plain network that samples and exports a LoRA run (adapters folded in)."""
    return attrs.evolve(cfg, lora=LoraConfig())


def load_lora_run(
    runtime: ParallelRuntime, model: nn.Module, cfg: TrainConfig, directory: Path, *, use_ema: bool
) -> str:
    """Fill ``model`` (built alone by ``runtime``, without LoRA) with a LoRA run's base and its adapters folded in.

    The base is the run's ``checkpoint.init_from`` or, without one, its seed's initial weights. Returns which
    adapters (``"ema"`` or ``"model"``).

    Raises:
        CheckpointError: The run's base directory is gone.
    """
    where = cfg.checkpoint.init_from
    if where is not None and not Path(where).exists():
        raise CheckpointError(
            f"{directory} holds a LoRA run's adapters alone, and its base weights ({where}, checkpoint.init_from) "
            "are gone: restore that directory, or export the adapters with convert export-lora"
        )
    if where is not None:
        base = bootstrap.initial_weights(cfg) or {}
    else:
        seeded = bootstrap.build_runtime(attrs.evolve(without_lora(cfg), runtime="local"), device="cpu")
        seeded.build_network(cfg.model)
        base = seeded.weights(use_ema=False)
    runtime.load_weights(base)
    del base
    adapters, which = checkpoint_adapters(directory, cfg, use_ema=use_ema)
    fold_into(model, adapters, 1.0)
    return which
