"""What the diffusers peer benchmarks (``bench_peer_generate.py``, ``bench_peer_train.py``) share."""

from __future__ import annotations

import torch
from diffusers import WanTransformer3DModel

from dfm.adapters.diffusers.wan_weights import spec_to_config
from dfm.domain.specs import ModelSpec


def build_peer(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> WanTransformer3DModel:
    """diffusers' WAN transformer of ``spec`` with random weights, cast as ``from_pretrained(torch_dtype=dtype)``."""
    config = {k: v for k, v in spec_to_config(spec).items() if not k.startswith("_")}
    with torch.device(device):
        model = WanTransformer3DModel(**config)
    keep = model._keep_in_fp32_modules
    for name, module in model.named_modules():
        fp32 = any(part in keep for part in name.split("."))
        for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
            if tensor.is_floating_point():
                tensor.data = tensor.data.to(torch.float32 if fp32 else dtype)
    return model


def sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()
