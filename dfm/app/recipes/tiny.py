"""Tiny recipes for tests and smoke runs: a few steps of a 2-layer network on synthetic videos, on CPU.

The networks are the tiny specs with 3 channels (RGB through the identity pixel codec), so a tiny run
trains, checkpoints, resumes and generates an mp4 in seconds.
"""

from __future__ import annotations

import attrs

from dfm.app.config import (
    CheckpointConfig,
    DataConfig,
    OptimConfig,
    RunConfig,
    SampleConfig,
    TrainConfig,
    TrainingConfig,
)
from dfm.app.config.sample import SamplerName
from dfm.app.recipes.presets import EDM_DEFAULT, FLOW_PRETRAIN
from dfm.app.recipes.registry import register_recipe
from dfm.domain.diffusion.edm import EDM
from dfm.domain.diffusion.flow import FlowMatching
from dfm.domain.specs import DIT_TINY, WAN_TINY, ModelSpec

FRAMES, HEIGHT, WIDTH, TEXT_LEN = 5, 16, 16, 8
WAN_TINY_RGB = attrs.evolve(WAN_TINY, in_channels=3, out_channels=3)
WAN_TINY_I2V = attrs.evolve(
    WAN_TINY, in_channels=3 + 1 + 3, out_channels=3, image_dim=48, added_kv_proj_dim=WAN_TINY.hidden_size
)
"""Tiny image-to-video WAN on synthetic RGB clips: noisy pixels, the frame mask, the first-frame condition
(identity codec, temporal stride 1); image features of 4 x 4 pixel blocks (``PatchImageEncoder``)."""
DIT_TINY_RGB = attrs.evolve(DIT_TINY, in_channels=3, out_channels=3)


def _tiny(name: str, spec: ModelSpec, diffusion: FlowMatching | EDM, sampler: SamplerName) -> TrainConfig:
    """4 fp32 steps of batch 2 (micro-batch 1) on synthetic 5 x 16 x 16 videos; checkpoints every 2 steps.

    Trained from scratch, so the text's padding stays masked (the default ``mask_text_padding``).
    """
    return TrainConfig(
        run=RunConfig(dir=f"runs/{name}"),
        runtime="local",
        model=spec,
        diffusion=diffusion,
        train=TrainingConfig(max_steps=4, global_batch_size=2, micro_batch_size=1, log_interval=1, precision="fp32"),
        optim=OptimConfig(lr=1e-3),
        checkpoint=CheckpointConfig(interval=2, keep_last=2),
        data=DataConfig(
            source="synthetic", frames=FRAMES, height=HEIGHT, width=WIDTH, text_len=TEXT_LEN, num_workers=0
        ),
        sample=SampleConfig(sampler=sampler, steps=4, guidance=5.0, frames=FRAMES, height=HEIGHT, width=WIDTH),
    )


@register_recipe
def wan_tiny_t2v() -> TrainConfig:
    """Tiny WAN (2 layers, width 24) with pretraining flow matching; flow Euler sampler."""
    return _tiny("wan_tiny_t2v", WAN_TINY_RGB, FLOW_PRETRAIN, "flow_euler")


@register_recipe
def dit_tiny_edm() -> TrainConfig:
    """Tiny DiT (2 layers, width 24) with EDM; EDM Heun sampler."""
    return _tiny("dit_tiny_edm", DIT_TINY_RGB, EDM_DEFAULT, "edm_heun")


@register_recipe
def wan_tiny_i2v() -> TrainConfig:
    """Tiny WAN image-to-video (2 layers, width 24): synthetic clips conditioned on their first frame."""
    return _tiny("wan_tiny_i2v", WAN_TINY_I2V, FLOW_PRETRAIN, "flow_euler")
