"""diffusers adapters: WAN weight layouts, the WAN VAE and the UMT5 text encoder, all from local directories."""

from dfm.adapters.diffusers.hf_export import export_wan_distributed
from dfm.adapters.diffusers.umt5 import UMT5TextEncoder
from dfm.adapters.diffusers.wan_vae import WanVAECodec, save_random_wan_vae
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
    "UMT5TextEncoder",
    "WanVAECodec",
    "export_wan_distributed",
    "load_wan_diffusers",
    "save_random_wan_vae",
    "save_wan_diffusers",
    "spec_from_config",
    "spec_to_config",
]
