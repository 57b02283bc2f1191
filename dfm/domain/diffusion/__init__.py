"""Diffusion processes: flow matching (SD3, WAN 2.1) and EDM (Karras et al., 2022), and CFG text (and image) dropout."""

from dfm.domain.diffusion.conditioning import (
    DenoiserNetwork,
    TrainingTerms,
    drop_image,
    drop_text,
    network_text_mask,
    per_sample_view,
)
from dfm.domain.diffusion.edm import EDM, Preconditioning
from dfm.domain.diffusion.flow import (
    MODE_SCALE_MAX,
    FlowMatching,
    interpolate,
    mode_transform,
    mode_transform_inverse,
    shift_sigma,
    unshift_sigma,
    velocity_target,
)

__all__ = [
    "EDM",
    "MODE_SCALE_MAX",
    "DenoiserNetwork",
    "FlowMatching",
    "Preconditioning",
    "TrainingTerms",
    "drop_image",
    "drop_text",
    "interpolate",
    "mode_transform",
    "mode_transform_inverse",
    "network_text_mask",
    "per_sample_view",
    "shift_sigma",
    "unshift_sigma",
    "velocity_target",
]
