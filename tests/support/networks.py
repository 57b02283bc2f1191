"""Tiny seeded networks for the network tests."""

from __future__ import annotations

import torch

from dfm.domain.networks.dit import DiT
from dfm.domain.networks.wan import WanTransformer
from dfm.domain.specs import DIT_TINY, WAN_TINY

Network = WanTransformer | DiT


def tiny_network(kind: str) -> Network:
    """``"wan"`` or ``"dit"`` tiny and seeded, with every all-zero parameter (output projections, adaLN-zero)
    randomised so that every path carries signal."""
    model: Network = (
        WanTransformer(WAN_TINY, generator=torch.Generator().manual_seed(0))
        if kind == "wan"
        else DiT(DIT_TINY, generator=torch.Generator().manual_seed(0))
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def inference_dtype_of(name: str, dtype: torch.dtype, network: type = WanTransformer) -> torch.dtype:
    """The dtype a parameter ``name`` has in a network built for inference in ``dtype``: float32 for the parts
    the network declares in ``fp32_modules`` (norms, time embedding, modulation tables), ``dtype`` otherwise."""
    return torch.float32 if set(name.split(".")) & set(network.fp32_modules) else dtype
