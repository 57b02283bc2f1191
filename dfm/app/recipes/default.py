"""The ``default`` recipe: what ``python -m dfm.app.train`` trains when no recipe is named."""

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
from dfm.app.recipes.registry import register_recipe
from dfm.domain.diffusion.flow import FlowMatching
from dfm.domain.specs import WanSpec

DEFAULT_SPEC = WanSpec(
    num_layers=4,
    num_attention_heads=4,
    attention_head_dim=32,
    ffn_dim=512,
    text_dim=64,
    freq_dim=64,
    in_channels=3,
    out_channels=3,
)
"""A small WAN (4 layers, 4 heads x 32 = width 128, FFN 512) over RGB pixels (identity codec)."""
FRAMES, HEIGHT, WIDTH, TEXT_LEN = 16, 32, 32, 16


@register_recipe
def default() -> TrainConfig:
    """A small WAN on synthetic videos (16 x 32 x 32 RGB, identity pixel codec) that trains on one CPU.

    The network is :data:`DEFAULT_SPEC` (3 channels in and out, text width 64 from the small
    deterministic text encoder, 16 text tokens); 16 x 16 x 16 = 4096 video tokens per clip. Flow matching with
    the domain defaults (logit-normal(0, 1), no shift, right for this low resolution); AdamW lr 3e-4,
    cosine after 20 warmup steps, 200 steps of batch 4; ``precision: auto`` (bf16 on GPU, fp32 on CPU).
    Sampling: UniPC, 25 steps, guidance 5.0. A later issue tunes these numbers.
    """
    return TrainConfig(
        run=RunConfig(dir="runs/default"),
        runtime="local",
        model=DEFAULT_SPEC,
        diffusion=FlowMatching(),
        train=TrainingConfig(max_steps=200, global_batch_size=4, micro_batch_size=2, log_interval=10),
        optim=OptimConfig(lr=3e-4, schedule="cosine", warmup_steps=20, min_lr_ratio=0.1),
        checkpoint=CheckpointConfig(interval=100, keep_last=2),
        data=DataConfig(
            source="synthetic", frames=FRAMES, height=HEIGHT, width=WIDTH, text_len=TEXT_LEN, num_workers=0
        ),
        sample=SampleConfig(sampler="unipc", steps=25, guidance=5.0, frames=FRAMES, height=HEIGHT, width=WIDTH),
    )
