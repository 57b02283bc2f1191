"""WAN 2.1 text-to-video recipes (1.3B and 14B, pretraining and finetuning).

All train on 81 frames x 480 x 832 clips with 512 text tokens in bf16, sample with UniPC (50 steps,
guidance 5.0, the preset's shift), and read ``mock`` data so that they run (and benchmark) as they
are: train on real data with ``data.source=energon data.path=DIR``. Learning rates: 1e-4 for
pretraining (cosine to 10 % after 1000 warmup steps), 1e-5 for finetuning (constant after 100), 1e-4 for
LoRA (rank 32 on the attention and feed-forward linears, a bf16 frozen base; set ``checkpoint.init_from`` to
the pretrained ``transformer/`` directory, e.g. of ``Wan2.1-T2V-1.3B-Diffusers``).

Text conditioning is WAN 2.1's: captions zero-padded to 512 UMT5 tokens and attended whole, padding
included (``diffusion.mask_text_padding: false``), as the released weights were trained and as diffusers'
WanPipeline samples them; finetuning those weights with the padding masked would change what they see.
"""

from __future__ import annotations

import attrs

from dfm.app.config import (
    CheckpointConfig,
    DataConfig,
    LoraConfig,
    OptimConfig,
    RunConfig,
    SampleConfig,
    TrainConfig,
    TrainingConfig,
)
from dfm.app.recipes.presets import FLOW_FINETUNE, FLOW_PRETRAIN
from dfm.app.recipes.registry import register_recipe
from dfm.domain.diffusion.flow import FlowMatching
from dfm.domain.specs import WAN_1_3B, WAN_14B, WanSpec

FRAMES, HEIGHT, WIDTH, TEXT_LEN = 81, 480, 832, 512

_PRETRAIN_OPTIM = OptimConfig(lr=1e-4, weight_decay=0.01, schedule="cosine", warmup_steps=1000, min_lr_ratio=0.1)
_FINETUNE_OPTIM = OptimConfig(lr=1e-5, weight_decay=0.01, schedule="constant", warmup_steps=100)
_LORA_OPTIM = OptimConfig(lr=1e-4, weight_decay=1e-4, schedule="constant", warmup_steps=100)
_LORA = LoraConfig(rank=32, alpha=32.0, base_dtype="bfloat16")


def _wan_t2v(
    name: str, spec: WanSpec, flow: FlowMatching, optim: OptimConfig, *, max_steps: int, global_batch_size: int
) -> TrainConfig:
    """A WAN text-to-video config at 81 x 480 x 832 on FSDP2 with full activation checkpointing; the text's
    zero padding is attended, not masked (WAN 2.1's conditioning)."""
    return TrainConfig(
        run=RunConfig(dir=f"runs/{name}"),
        runtime="fsdp2",
        model=spec,
        diffusion=attrs.evolve(flow, mask_text_padding=False),
        train=TrainingConfig(
            max_steps=max_steps,
            global_batch_size=global_batch_size,
            micro_batch_size=1,
            precision="bf16",
            activation_checkpointing="full",
        ),
        optim=optim,
        checkpoint=CheckpointConfig(interval=1000 if max_steps > 10_000 else 500),
        data=DataConfig(source="mock", frames=FRAMES, height=HEIGHT, width=WIDTH, text_len=TEXT_LEN, fps=16.0),
        sample=SampleConfig(
            sampler="unipc", steps=50, guidance=5.0, shift=flow.shift, frames=FRAMES, height=HEIGHT, width=WIDTH
        ),
    )


@register_recipe
def wan_1_3b_t2v_pretrain() -> TrainConfig:
    """WAN 2.1 1.3B text-to-video pretraining (flow: logit-normal 1.5, shift 2.5; lr 1e-4 cosine)."""
    return _wan_t2v(
        "wan_1_3b_t2v_pretrain", WAN_1_3B, FLOW_PRETRAIN, _PRETRAIN_OPTIM, max_steps=100_000, global_batch_size=64
    )


@register_recipe
def wan_1_3b_t2v_finetune() -> TrainConfig:
    """WAN 2.1 1.3B text-to-video finetuning (flow: uniform, shift 3.0; lr 1e-5 constant)."""
    return _wan_t2v(
        "wan_1_3b_t2v_finetune", WAN_1_3B, FLOW_FINETUNE, _FINETUNE_OPTIM, max_steps=5_000, global_batch_size=32
    )


@register_recipe
def wan_14b_t2v_pretrain() -> TrainConfig:
    """WAN 2.1 14B text-to-video pretraining (flow: logit-normal 1.5, shift 2.5; lr 1e-4 cosine)."""
    return _wan_t2v(
        "wan_14b_t2v_pretrain", WAN_14B, FLOW_PRETRAIN, _PRETRAIN_OPTIM, max_steps=100_000, global_batch_size=128
    )


@register_recipe
def wan_14b_t2v_finetune() -> TrainConfig:
    """WAN 2.1 14B text-to-video finetuning (flow: uniform, shift 3.0; lr 1e-5 constant)."""
    return _wan_t2v(
        "wan_14b_t2v_finetune", WAN_14B, FLOW_FINETUNE, _FINETUNE_OPTIM, max_steps=5_000, global_batch_size=64
    )


def _wan_lora(name: str, spec: WanSpec, *, global_batch_size: int) -> TrainConfig:
    cfg = _wan_t2v(name, spec, FLOW_FINETUNE, _LORA_OPTIM, max_steps=3_000, global_batch_size=global_batch_size)
    return attrs.evolve(cfg, lora=_LORA)


@register_recipe
def wan_1_3b_t2v_lora() -> TrainConfig:
    """WAN 2.1 1.3B text-to-video LoRA (rank 32, bf16 frozen base; lr 1e-4; set checkpoint.init_from)."""
    return _wan_lora("wan_1_3b_t2v_lora", WAN_1_3B, global_batch_size=8)


@register_recipe
def wan_14b_t2v_lora() -> TrainConfig:
    """WAN 2.1 14B text-to-video LoRA (rank 32, bf16 frozen base; lr 1e-4; set checkpoint.init_from)."""
    return _wan_lora("wan_14b_t2v_lora", WAN_14B, global_batch_size=8)


WAN_I2V_14B = attrs.evolve(WAN_14B, in_channels=36, out_channels=16, image_dim=1280, added_kv_proj_dim=5120)
"""WAN 2.1 I2V 14B (``Wan2.1-I2V-14B-480P-Diffusers``): 16 noisy + 4 mask + 16 condition channels, CLIP ViT-H/14."""


@register_recipe
def wan_i2v_14b_480p_finetune() -> TrainConfig:
    """WAN 2.1 image-to-video 14B at 480p finetuning (flow: uniform, shift 3.0; lr 1e-5 constant; mock data)."""
    return _wan_t2v(
        "wan_i2v_14b_480p_finetune", WAN_I2V_14B, FLOW_FINETUNE, _FINETUNE_OPTIM, max_steps=5_000, global_batch_size=64
    )
