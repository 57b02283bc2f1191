"""Networks: WAN 2.1, shared layers, the attention kernel and the parallel plan."""

from dfm.domain.networks.attention import AttentionKernel, SDPAAttention
from dfm.domain.networks.layers import (
    FP32LayerNorm,
    PatchEmbed3d,
    RMSNorm,
    apply_rope,
    modulate,
    patch_grid,
    rope_3d,
    rope_axis_dims,
    timestep_features,
    unpatchify,
)
from dfm.domain.networks.plan import ParallelPlan
from dfm.domain.networks.wan import WAN_PARALLEL_PLAN, WanInputs, WanTransformer

__all__ = [
    "WAN_PARALLEL_PLAN",
    "AttentionKernel",
    "FP32LayerNorm",
    "ParallelPlan",
    "PatchEmbed3d",
    "RMSNorm",
    "SDPAAttention",
    "WanInputs",
    "WanTransformer",
    "apply_rope",
    "modulate",
    "patch_grid",
    "rope_3d",
    "rope_axis_dims",
    "timestep_features",
    "unpatchify",
]
