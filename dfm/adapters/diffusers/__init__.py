"""diffusers adapters: weight layouts (and, later, the VAE and text encoders) from local directories."""

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
    "load_wan_diffusers",
    "save_wan_diffusers",
    "spec_from_config",
    "spec_to_config",
]
