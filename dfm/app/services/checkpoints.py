"""Loading a trained model from a run directory or checkpoint, for generation and export."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from dfm.adapters.checkpoint import read_meta
from dfm.app import bootstrap
from dfm.app.config import TrainConfig, config_from_yaml
from dfm.ports.checkpoint import CheckpointError


def load_for_inference(where: Path, *, use_ema: bool = True) -> tuple[TrainConfig, nn.Module]:
    """The training config and the model (EMA weights if kept and asked for) of a checkpoint.

    Raises:
        CheckpointError: no checkpoint at ``where``, or one that fails verification.
    """
    root = _checkpoint_root(where)
    meta = read_meta(root)
    cfg = config_from_yaml(meta["config"], source=f"{root} meta.json")
    runtime = bootstrap.build_runtime(cfg)
    runtime.build(cfg.model, bootstrap.optimizer_settings(cfg))
    store = bootstrap.build_checkpoint_store(cfg)
    state = {"runtime": runtime.state_dict()}
    store.load(root, state)
    runtime.load_state_dict(state["runtime"])
    return cfg, runtime.inference_model(use_ema=use_ema)


def _checkpoint_root(where: Path) -> Path:
    where = Path(where)
    if not where.exists():
        raise CheckpointError(f"{where} does not exist (expected a run directory or a checkpoint directory)")
    if (where / "checkpoints").is_dir():
        return where / "checkpoints"
    return where
