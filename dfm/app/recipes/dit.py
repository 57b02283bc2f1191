"""DiT recipes trained with EDM (Karras et al., 2022; Peebles & Xie, 2023)."""

from __future__ import annotations

from dfm.app.config import (
    CheckpointConfig,
    DataConfig,
    OptimConfig,
    RunConfig,
    SampleConfig,
    TrainConfig,
    TrainingConfig,
)
from dfm.app.recipes.presets import EDM_DEFAULT
from dfm.app.recipes.registry import register_recipe
from dfm.domain.specs import DIT_XL


@register_recipe
def dit_xl_edm() -> TrainConfig:
    """DiT-XL/2 with EDM (P_mean -1.2, P_std 1.2, sigma_data 0.5) on 17 x 256 x 256 clips; Heun sampler.

    bf16 on FSDP2, AdamW lr 1e-4 (constant after 1000 warmup steps), ``mock`` data until
    ``data.source=energon data.path=DIR``; sampling: EDM Heun, 32 steps, guidance 5.0.
    """
    frames, height, width = 17, 256, 256
    return TrainConfig(
        run=RunConfig(dir="runs/dit_xl_edm"),
        runtime="fsdp2",
        model=DIT_XL,
        diffusion=EDM_DEFAULT,
        train=TrainingConfig(max_steps=400_000, global_batch_size=256, micro_batch_size=8, precision="bf16"),
        optim=OptimConfig(lr=1e-4, weight_decay=0.0, schedule="constant", warmup_steps=1000),
        checkpoint=CheckpointConfig(interval=5000),
        data=DataConfig(source="mock", frames=frames, height=height, width=width, text_len=512),
        sample=SampleConfig(sampler="edm_heun", steps=32, guidance=5.0, frames=frames, height=height, width=width),
    )
