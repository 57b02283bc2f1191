"""diffusers adapters: weight layouts (and, later, the VAE and text encoders) from local directories."""

from dfm.adapters.diffusers.hf_export import export_wan_distributed
from dfm.adapters.diffusers.wan_weights import (
    CONFIG_NAME,
    INDEX_NAME,
    WEIGHTS_NAME,
    load_wan_diffusers,
    save_wan_diffusers,
    spec_from_config,
    spec_to_config,
)

__all__ = [
    "CONFIG_NAME",
    "INDEX_NAME",
    "WEIGHTS_NAME",
    "export_wan_distributed",
    "load_wan_diffusers",
    "save_wan_diffusers",
    "spec_from_config",
    "spec_to_config",
]
